"""Callers that go away without handing back their leases: found and taken back. Fake clock.

The leak this covers: a caller process (a driver, a graph executor, an ingress replica)
ended or died holding a lease or a queued request. Ray never closes the grant stream of a
dead caller, so nothing handed the lease back and the model's in-flight count stayed up
for good (main was red on it: a later test waited for ``in_flight == 0`` in vain).
"""

from __future__ import annotations

import pytest

from airi_ray.core.callers import CallerBook
from airi_ray.core.scheduling import AcquireRequest, ReplicaView, Scheduler


def setup(slots: int = 1) -> tuple[Scheduler, CallerBook]:
    s = Scheduler()
    s.set_replicas("m", [ReplicaView("r1", "m", slots)])
    return s, CallerBook(ttl_s=10.0)


def take_back(s: Scheduler, book: CallerBook, caller: str) -> None:
    """What the scheduler actor does with an expired caller's requests."""
    for rid in book.drop(caller):
        if s.lease(rid) is not None:
            s.release(rid)
        else:
            s.cancel(rid)


def test_a_lease_of_a_caller_that_went_silent_is_taken_back() -> None:
    s, book = setup()
    s.enqueue(AcquireRequest("a", "m", "t", 10, 5), 0.0)
    book.add("driver-1", "a", 0.0)
    [lease] = s.dispatch(0.0)
    assert lease.request_id == "a" and s.in_flight("m") == 1
    # The driver exits before its release is sent: nothing more is heard from it.
    assert book.expired(9.0) == []
    assert book.expired(10.5) == ["driver-1"]
    take_back(s, book, "driver-1")
    assert s.in_flight("m") == 0 and s.leases() == [] and len(book) == 0
    assert s.replicas("m")[0].in_flight == 0 and s.replicas("m")[0].in_flight_tokens == 0


def test_queued_requests_of_a_silent_caller_are_dropped_and_others_go_on() -> None:
    s, book = setup(slots=1)
    for rid, caller in [("a", "gone"), ("b", "gone"), ("c", "alive")]:
        s.enqueue(AcquireRequest(rid, "m", rid, 10, 5), 0.0)
        book.add(caller, rid, 0.0)
    [first] = s.dispatch(0.0)
    assert first.request_id == "a"  # arrival order among equal counters
    for now in (4.0, 8.0, 12.0):  # the live caller beats, the other is silent
        book.heard("alive", now)
    assert book.expired(12.0) == ["gone"]
    take_back(s, book, "gone")
    assert s.queue_depth("m") == 1 and s.in_flight("m") == 0
    [lease] = s.dispatch(12.0)  # the slot the silent caller held serves the live one
    assert lease.request_id == "c" and book.requests("alive") == ["c"]


def test_a_caller_heard_within_the_ttl_keeps_its_leases() -> None:
    s, book = setup()
    s.enqueue(AcquireRequest("a", "m", "t", 10, 5), 0.0)
    book.add("ingress", "a", 0.0)
    s.dispatch(0.0)
    for now in range(2, 60, 2):  # a long stream, a heartbeat every 2 s
        book.heard("ingress", float(now))
        assert book.expired(float(now) + 0.5) == []
    assert s.in_flight("m") == 1


def test_released_requests_leave_the_book_and_idle_callers_are_forgotten() -> None:
    book = CallerBook(ttl_s=10.0)
    book.add("c1", "a", 0.0)
    book.add("c1", "b", 0.0)
    assert book.remove("a") == "c1" and book.caller_of("b") == "c1"
    assert book.remove("b") == "c1" and book.remove("b") is None
    # Holding nothing, a silent caller is not reported (nothing to take back), only forgotten.
    assert book.expired(100.0) == [] and book.requests("c1") == []
    assert book.drop("c1") == []


def test_a_request_id_belongs_to_one_caller() -> None:
    book = CallerBook()
    book.add("c1", "a", 0.0)
    book.add("c1", "a", 1.0)  # a requeue: the same caller again
    with pytest.raises(ValueError, match="belongs to caller c1"):
        book.add("c2", "a", 1.0)
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        CallerBook(ttl_s=0)


def test_held_counts_each_callers_requests_and_forgets_empty_callers() -> None:
    book = CallerBook()
    book.add("driver:7:a", "r1", 0.0)
    book.add("driver:7:a", "r2", 0.0)
    book.add("ingress:9:b", "r3", 0.0)
    assert book.held() == {"driver:7:a": 2, "ingress:9:b": 1}
    book.remove("r3")
    assert book.held() == {"driver:7:a": 2}


def test_a_lease_whose_release_was_lost_is_taken_back_from_a_live_caller() -> None:
    """The caller lives and heartbeats, but a release of one of its leases never took
    effect: its next report of what it holds no longer names that lease."""
    s, book = setup(slots=2)
    for rid in ("a", "b"):
        s.enqueue(AcquireRequest(rid, "m", "t", 10, 5), 0.0)
        book.add("ingress:9:x", rid, 0.0)
    assert len(s.dispatch(0.0)) == 2

    def granted_at(rid: str) -> float | None:
        lease = s.lease(rid)
        return lease.granted_at if lease is not None else None

    # Within the grace a lease may still be on its way to the caller: never taken.
    assert book.unheld("ingress:9:x", ["b"], granted_at, 5.0) == []
    book.heard("ingress:9:x", 12.0)
    assert book.unheld("ingress:9:x", ["b"], granted_at, 12.0) == ["a"]
    assert book.expired(12.0) == []  # the caller itself is alive
    for rid in book.unheld("ingress:9:x", ["b"], granted_at, 12.0):
        book.remove(rid)
        s.release(rid)
    assert s.in_flight("m") == 1 and [x.request_id for x in s.leases()] == ["b"]
    assert book.unheld("ingress:9:x", ["b"], granted_at, 20.0) == []


def test_queued_requests_are_never_unheld() -> None:
    s, book = setup(slots=1)
    for rid in ("a", "b"):
        s.enqueue(AcquireRequest(rid, "m", "t", 10, 5), 0.0)
        book.add("c", rid, 0.0)
    s.dispatch(0.0)  # "a" leased, "b" waits

    def granted_at(rid: str) -> float | None:
        lease = s.lease(rid)
        return lease.granted_at if lease is not None else None

    assert book.unheld("c", ["a"], granted_at, 100.0) == []
