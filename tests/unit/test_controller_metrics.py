"""The controller's loop metrics: a duration per step and a count of failed steps."""

from __future__ import annotations

from airi_ray.obs.metrics import ControllerMetrics


def test_step_durations_and_failures_are_exported_by_step() -> None:
    m = ControllerMetrics()
    m.step_seconds.labels("rollouts").observe(0.01)
    m.step_seconds.labels("reconcile").observe(0.2)
    m.step_failures.labels("rollouts").inc()
    text = m.text().decode()
    assert 'airi_controller_step_seconds_count{step="rollouts"} 1.0' in text
    assert 'airi_controller_step_seconds_count{step="reconcile"} 1.0' in text
    assert 'airi_controller_step_failures_total{step="rollouts"} 1.0' in text
    assert 'airi_controller_step_failures_total{step="reconcile"}' not in text
