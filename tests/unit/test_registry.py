"""The controller's registry entry: lifecycle moves and the round trip through saved state."""

from __future__ import annotations

import json

import pytest

from airi_ray.config import ModelSpec
from airi_ray.core.rollout import IllegalTransition, Rollout, RolloutLimits
from airi_ray.core.registry import Model


def _entry() -> Model:
    spec = ModelSpec(name="m", version="v1", model="x", versions={"v2": {"replicas": 2}})
    return Model("v1", {v.version: v for v in spec.all_versions()})


def test_versions_follow_the_lifecycle() -> None:
    e = _entry()
    e.set_state("m", "v1", "loading")
    e.set_state("m", "v1", "ready")
    with pytest.raises(IllegalTransition, match="cannot go from ready to loading"):
        e.set_state("m", "v1", "loading")
    e.set_state("m", "v1", "draining")
    e.set_state("m", "v1", "retired")
    e.set_state("m", "v1", "loading")  # rolled back to: a new life, from pending
    assert e.states["v1"] == "loading"


def test_an_entry_survives_its_saved_form() -> None:
    e = _entry()
    e.set_state("m", "v1", "loading")
    e.rollout = Rollout("m", "v1", "v2", "canary", (25, 100), RolloutLimits(step_hold_s=5))
    e.history = ["v0"]
    e.drain_started = {"v0": 12.5}
    saved = json.loads(json.dumps(e.to_dict()))  # what ControlState stores
    again = Model.from_dict(saved, ModelSpec.model_validate)
    assert again == e
    assert again.specs["v2"].replicas == 2


def test_a_draining_version_comes_back_when_traffic_returns() -> None:
    e = _entry()
    for state in ("loading", "ready", "draining", "ready"):
        e.set_state("m", "v1", state)  # type: ignore[arg-type]
    assert e.states["v1"] == "ready"
