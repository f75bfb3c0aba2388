"""The adaptive batching window for embedding calls, with a fake clock."""

from __future__ import annotations

import pytest

from airi_ray.core.batching import BatchWindow


def run_arrivals(w: BatchWindow, rate: float, duration: float, start: float = 0.0) -> float:
    """Add items at a steady ``rate``, taking batches whenever ready; returns the end time."""
    n = int(rate * duration)
    now = start
    for i in range(n):
        now = start + i / rate
        while w.ready(now):
            w.take(now)
        w.add(f"x{start}-{i}", now)
    return now


def test_light_load_waits_the_minimum() -> None:
    w = BatchWindow(max_batch=32, min_wait_s=0.002, max_wait_s=0.05)
    w.add("a", 100.0)
    flush = w.next_flush_at(100.0)
    assert flush is not None and flush == pytest.approx(100.002, abs=1e-4)
    assert not w.ready(100.001) and w.ready(100.0021)
    assert w.take(100.0021) == ["a"] and w.next_flush_at(100.0021) is None


def test_heavy_load_waits_longer_up_to_the_maximum() -> None:
    w = BatchWindow(max_batch=32, min_wait_s=0.002, max_wait_s=0.05)
    now = run_arrivals(w, rate=2000.0, duration=2.0)
    assert w.wait_s(now) == pytest.approx(0.05)
    # A moderate rate lands in between.
    m = BatchWindow(max_batch=32, min_wait_s=0.002, max_wait_s=0.05)
    now_m = run_arrivals(m, rate=200.0, duration=5.0)
    assert 0.002 < m.wait_s(now_m) < 0.05
    # After a quiet spell the window is short again.
    assert w.wait_s(now + 30.0) == pytest.approx(0.002, abs=1e-4)


def test_full_batch_flushes_at_once() -> None:
    w = BatchWindow(max_batch=4, min_wait_s=0.01, max_wait_s=0.01)
    for i in range(6):
        w.add(f"i{i}", 0.0)
    assert w.ready(0.0) and w.next_flush_at(0.0) == 0.0
    assert w.take(0.0) == ["i0", "i1", "i2", "i3"]
    assert len(w) == 2 and not w.ready(0.0)
    assert w.take(0.02) == ["i4", "i5"]
    assert w.batch_sizes == {4: 1, 2: 1}


def test_never_waits_past_the_earliest_deadline() -> None:
    w = BatchWindow(max_batch=64, min_wait_s=0.01, max_wait_s=0.5)
    now = run_arrivals(w, rate=5000.0, duration=0.5)
    w.take(now)
    w.add("late", now, deadline=now + 1.0)
    w.add("soon", now, deadline=now + 0.003)
    flush = w.next_flush_at(now)
    assert flush is not None and flush == pytest.approx(now + 0.003)
    assert w.take(now + 0.003) == ["late", "soon"]
    # The cap goes with the items: the next batch has no deadline.
    w.add("next", now + 0.004)
    flush = w.next_flush_at(now + 0.004)
    assert flush is not None and flush > now + 0.005


def test_remaining_items_keep_their_own_arrival_time() -> None:
    w = BatchWindow(max_batch=2, min_wait_s=0.01, max_wait_s=0.01)
    w.add("a", 0.0)
    w.add("b", 0.0)
    w.add("c", 0.005)
    w.take(0.0)
    assert w.next_flush_at(0.005) == pytest.approx(0.015)


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchWindow(max_batch=0)
    with pytest.raises(ValueError, match="min_wait_s"):
        BatchWindow(min_wait_s=0.1, max_wait_s=0.01)
    with pytest.raises(ValueError, match="rate_window_s"):
        BatchWindow(rate_window_s=0)
