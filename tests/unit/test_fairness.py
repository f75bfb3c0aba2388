"""The fair queue on its own: VTC selection, lift, refund, FCFS order, lazy deletion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.fairness import FairQueue


def push(
    q: FairQueue[str], tenant: str, rid: str, seq: int, rank: int = 0, dl: float = 1e9
) -> None:
    q.push(tenant, rid, rid, rank=rank, deadline=dl, seq=seq)


def take(q: FairQueue[str], charge: float = 0.0) -> str:
    tenant = q.select()
    assert tenant is not None
    rid, _ = q.start(tenant, charge)
    return rid


def test_select_smallest_counter_then_head_arrival() -> None:
    q: FairQueue[str] = FairQueue()
    push(q, "A", "a1", 1)
    push(q, "B", "b1", 2)
    push(q, "A", "a2", 3)
    assert take(q, 10) == "a1"  # tie at 0: earlier head
    assert take(q, 10) == "b1"  # B at 0 < A at 10
    assert take(q, 10) == "a2"
    assert q.select() is None and len(q) == 0


def test_lift_on_becoming_backlogged() -> None:
    q: FairQueue[str] = FairQueue()
    push(q, "A", "a1", 1)
    push(q, "A", "a2", 2)
    take(q, 100)
    assert q.counter("A") == 100
    push(q, "B", "b1", 3)
    assert q.counter("B") == 100  # A is backlogged at 100
    q.finish("A", 50)  # A's first request ends: 150
    push(q, "A", "a3", 4)  # A was backlogged already: no lift, no change
    assert q.counter("A") == 150


def test_items_count_a_request_queued_again_after_a_cancel_once() -> None:
    q: FairQueue[str] = FairQueue()
    push(q, "A", "r2", seq=1)
    push(q, "A", "r1", seq=2)
    assert q.remove("r1") == "r1"  # not the head: its key stays in the heap, stale
    push(q, "A", "r1", seq=3)
    assert sorted(q.items("A")) == ["r1", "r2"]


def test_refund_is_the_only_decrease() -> None:
    q: FairQueue[str] = FairQueue()
    push(q, "A", "a1", 1)
    take(q, 30)
    q.refund("A", 30)
    assert q.counter("A") == 0 and q.in_flight("A") == 0
    with pytest.raises(AssertionError):
        q.finish("A", 1)  # nothing in flight any more


def test_requeue_front_beats_priority() -> None:
    q: FairQueue[str] = FairQueue()
    push(q, "A", "hi", 2, rank=0)
    q.push("A", "retry", "retry", rank=1, deadline=1e9, seq=1, front=True)
    assert take(q) == "retry"
    assert take(q) == "hi"


def test_fcfs_ignores_priority_and_deadline() -> None:
    q: FairQueue[str] = FairQueue("fcfs")
    push(q, "A", "a-batch", 1, rank=1)
    push(q, "B", "b-urgent", 2, rank=0, dl=0.0)
    assert take(q, 1000) == "a-batch"
    push(q, "A", "a2", 3)
    assert take(q) == "b-urgent"  # arrival order, whatever A's counter
    with pytest.raises(ValueError, match="policy"):
        FairQueue("random")  # type: ignore[arg-type]


def test_put_back_and_cancel_keep_the_order() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(5):
        push(q, "A", f"a{i}", i)
    t = q.select()
    assert t == "A" and q.head("A") == ("a0", "a0")
    q.put_back("A")
    assert q.remove("a0") == "a0" and q.remove("a0") is None
    assert q.remove("a2") == "a2"
    assert [take(q) for _ in range(3)] == ["a1", "a3", "a4"]


def test_heaps_stay_proportional_to_what_is_queued() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(2000):
        push(q, f"t{i % 10}", f"r{i}", i)
        if i % 2:
            q.remove(f"r{i}")
    for _ in range(300):
        t = q.select()
        assert t is not None
        q.start(t, 1.0)
        q.finish(t, 1.0)
    assert len(q._select) <= 2 * 10 + 64
    assert all(len(t.heap) <= 2 * t.depth + 64 for t in q._tenants.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("AB"), st.integers(1, 100)), min_size=20, max_size=200))
def test_backlogged_tenants_stay_within_one_request_of_each_other(
    costs: list[tuple[str, int]],
) -> None:
    """The VTC bound for continuously backlogged tenants: the gap stays below the largest
    single charge (here one request's cost), whatever the request sizes."""
    q: FairQueue[str] = FairQueue()
    for seq, (tenant, cost) in enumerate(costs):
        push(q, tenant, f"{tenant}{seq}:{cost}", seq)
    push(q, "A", "A-tail:1", 10_000)
    push(q, "B", "B-tail:1", 10_001)
    biggest = max(c for _, c in costs)
    while q.depth("A") > 1 and q.depth("B") > 1:  # both backlogged
        t = q.select()
        assert t is not None
        rid, _ = q.head(t)
        q.start(t, float(rid.split(":")[1]))
        q.finish(t, 0.0)
        assert abs(q.counter("A") - q.counter("B")) <= biggest
