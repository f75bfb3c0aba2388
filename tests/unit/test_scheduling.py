"""FCFS scheduling and least-loaded replica choice, with a fake clock."""

import pytest

from airi_ray.core.errors import Overloaded
from airi_ray.core.scheduling import AcquireRequest, FcfsScheduler, ReplicaView, least_loaded


def views(*specs: tuple[str, int]) -> list[ReplicaView]:
    return [ReplicaView(rid, "m", cap) for rid, cap in specs]


def req(rid: str, model: str = "m", exclude: frozenset[str] = frozenset()) -> AcquireRequest:
    return AcquireRequest(rid, model, "t", 10, 5, exclude)


def test_least_loaded_prefers_relative_load_then_id() -> None:
    a, b, c = (
        ReplicaView("a", "m", 4, in_flight=2),
        ReplicaView("b", "m", 8, in_flight=2),
        ReplicaView("c", "m", 8, in_flight=2),
    )
    assert least_loaded([a, b, c]).replica_id == "b"
    assert least_loaded([ReplicaView("x", "m", 1, in_flight=1)]) is None
    assert least_loaded([ReplicaView("x", "m", 4, ready=False)]) is None


def test_fcfs_order_and_capacity() -> None:
    s = FcfsScheduler()
    s.set_replicas("m", views(("r1", 1), ("r2", 1)))
    for i in range(4):
        s.enqueue(req(f"q{i}"), now=float(i))
    granted = s.dispatch(now=10.0)
    assert [lease.request_id for lease in granted] == ["q0", "q1"]
    assert {lease.replica_id for lease in granted} == {"r1", "r2"}
    assert granted[0].queue_wait_s == 10.0
    assert s.queue_depth("m") == 2 and s.in_flight("m") == 2
    assert s.dispatch(now=11.0) == []
    s.release("q0")
    assert [lease.request_id for lease in s.dispatch(now=12.0)] == ["q2"]
    assert s.release("q0") is None  # releasing twice is harmless


def test_spreads_load_across_replicas() -> None:
    s = FcfsScheduler()
    s.set_replicas("m", views(("a", 10), ("b", 10)))
    for i in range(6):
        s.enqueue(req(f"q{i}"), now=0.0)
    leases = s.dispatch(now=0.0)
    assert sorted(lease.replica_id for lease in leases).count("a") == 3


def test_queue_limit_raises_overloaded_with_a_clear_message() -> None:
    s = FcfsScheduler(max_queue_per_model=2)
    s.enqueue(req("a"), 0.0)
    s.enqueue(req("b"), 0.0)
    with pytest.raises(Overloaded, match="limit is 2"):
        s.enqueue(req("c"), 0.0)


def test_excluded_replica_is_skipped_and_others_still_served() -> None:
    s = FcfsScheduler()
    s.set_replicas("m", views(("a", 5)))
    s.enqueue(req("retry", exclude=frozenset({"a"})), 0.0)
    s.enqueue(req("fresh"), 1.0)
    assert [lease.request_id for lease in s.dispatch(2.0)] == ["fresh"]
    s.set_replicas("m", views(("a", 5), ("b", 5)))
    [lease] = s.dispatch(3.0)
    assert (lease.request_id, lease.replica_id) == ("retry", "b")


def test_cancel_and_unready_replicas() -> None:
    s = FcfsScheduler()
    s.set_replicas("m", views(("a", 1)))
    s.mark_unready("a")
    s.enqueue(req("x"), 0.0)
    assert s.dispatch(0.0) == []
    assert s.cancel("x") and not s.cancel("x")
    assert s.queue_depth("m") == 0


def test_set_replicas_keeps_in_flight_counts() -> None:
    s = FcfsScheduler()
    s.set_replicas("m", views(("a", 1)))
    s.enqueue(req("x"), 0.0)
    s.dispatch(0.0)
    s.set_replicas("m", views(("a", 1)))
    assert s.replicas("m")[0].in_flight == 1
    s.enqueue(req("y"), 0.0)
    assert s.dispatch(0.0) == []


def test_duplicate_request_id_is_refused() -> None:
    s = FcfsScheduler()
    s.enqueue(req("x"), 0.0)
    with pytest.raises(ValueError):
        s.enqueue(req("x"), 0.0)
