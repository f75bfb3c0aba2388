"""Traffic split between model versions in the scheduler core: shares, sessions, canary
retries, draining versions and head of line. Fake clock."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from airi_ray.core.errors import ReplicaUnavailable
from airi_ray.core.scheduling import AcquireRequest, Lease, ReplicaView, Scheduler


def rv(rid: str, version: str, cap: int = 100, **kw: Any) -> ReplicaView:
    return ReplicaView(rid, "m", cap, version=version, **kw)


def req(
    rid: str, tenant: str = "t", prompt: int = 10, max_tokens: int = 5, **kw: Any
) -> AcquireRequest:
    return AcquireRequest(rid, "m", tenant, prompt, max_tokens, **kw)


def sched(*views: ReplicaView, **kw: Any) -> Scheduler:
    s = Scheduler(max_queue_per_model=10_000, max_queued_per_tenant=10_000, **kw)
    s.set_replicas("m", list(views))
    return s


def grant_one(s: Scheduler, rid: str, now: float, **kw: Any) -> Lease:
    s.enqueue(req(rid, **kw), now)
    [lease] = s.dispatch(now)
    return lease


def versions_of(s: Scheduler, n: int, release: bool = True, **kw: Any) -> list[str]:
    """Grant ``n`` requests one at a time; the version each one got."""
    out = []
    for i in range(n):
        lease = grant_one(s, f"q{i}", float(i), **kw)
        out.append(lease.version)
        if release:
            s.release(lease.request_id, 1, now=float(i))
    return out


# -- shares ---------------------------------------------------------------------------------


def test_ninety_ten_split_is_exact_over_a_hundred_grants() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 0.9, "v2": 0.1})
    got = versions_of(s, 100)
    assert Counter(got) == {"v1": 90, "v2": 10}
    # Smooth: the canary's turns are spread out, not bunched at the start or end.
    assert Counter(got[:10]) == {"v1": 9, "v2": 1}
    assert s.stats(100.0)["m"].versions == {"v1": 90, "v2": 10}


def test_exact_while_leases_are_held() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 3, "v2": 1})
    for i in range(40):
        s.enqueue(req(f"q{i}"), 0.0)
    leases = s.dispatch(0.0)  # 40 grants in one round, nothing released
    assert Counter(lease.version for lease in leases) == {"v1": 30, "v2": 10}


def test_fifty_fifty_alternates() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v2": 1.0, "v1": 1.0})
    assert versions_of(s, 6) == ["v1", "v2"] * 3  # ties go to the first name


def test_requests_go_to_replicas_of_the_chosen_version() -> None:
    s = sched(rv("a1", "v1"), rv("a2", "v1"), rv("b1", "v2"))
    s.set_traffic("m", {"v1": 1, "v2": 1})
    for i in range(4):
        lease = grant_one(s, f"q{i}", float(i))
        expected = {"v1": {"a1", "a2"}, "v2": {"b1"}}[lease.version]
        assert lease.replica_id in expected


def test_a_session_stays_on_one_version_and_sessions_spread() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 0.5, "v2": 0.5})
    for sid in ("s1", "s2", "s3"):
        assert len(set(versions_of(s, 20, session_id=sid))) == 1
    chosen = {}
    for i in range(200):
        lease = grant_one(s, f"x{i}", 100.0 + i, session_id=f"conv-{i}")
        chosen[f"conv-{i}"] = lease.version
        s.release(lease.request_id)
    share = Counter(chosen.values())
    assert set(share) == {"v1", "v2"} and 60 <= share["v1"] <= 140
    # The choice depends on the session id only: a fresh scheduler agrees (no salted hash).
    again = sched(rv("a", "v1"), rv("b", "v2"))
    again.set_traffic("m", {"v1": 0.5, "v2": 0.5})
    for i in range(0, 200, 17):
        lease = grant_one(again, f"y{i}", 0.0, session_id=f"conv-{i}")
        again.release(lease.request_id)
        assert lease.version == chosen[f"conv-{i}"]


def test_sessions_do_not_move_the_round_robin() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 1, "v2": 1})
    assert versions_of(s, 1) == ["v1"]
    versions_of(s, 5, session_id="s")
    assert grant_one(s, "next", 50.0).version == "v2"


# -- versions without traffic ---------------------------------------------------------------


def test_weight_zero_version_gets_nothing_new_but_its_leases_release() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    old = grant_one(s, "held", 0.0)  # no split yet: any replica
    assert (old.replica_id, old.version) == ("a", "v1")
    s.set_traffic("m", {"v1": 0.0, "v2": 1.0})
    assert set(versions_of(s, 10)) == {"v2"}
    assert s.release("held", 3) is not None
    assert s.replicas("m")[0].in_flight == 0 and s.in_flight("m") == 0


def test_unnamed_version_takes_no_traffic_under_a_split() -> None:
    s = sched(rv("a", "v1"), rv("warming", "v2"))
    s.set_traffic("m", {"v1": 1.0})
    assert {lease.replica_id for lease in (grant_one(s, f"q{i}", 0.0) for i in range(5))} == {"a"}


def test_enqueue_is_503_when_only_weight_zero_versions_have_replicas() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2", ready=False))
    s.set_traffic("m", {"v1": 0, "v2": 1})
    with pytest.raises(
        ReplicaUnavailable, match=r"no ready replica of a version with traffic \(v2\)"
    ) as e:
        s.enqueue(req("x"), 0.0)
    assert e.value.status == 503
    s.set_replicas("m", [rv("a", "v1"), rv("b", "v2", ready=False, starting=True)])
    s.enqueue(req("x"), 1.0)  # the version with traffic is starting: the request may wait
    assert s.dispatch(1.0) == []


def test_request_sits_out_when_no_version_is_eligible() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 1, "v2": 1})
    s.enqueue(req("stuck", "A", exclude_versions=frozenset({"v1", "v2"})), 0.0)
    s.enqueue(req("other", "B"), 1.0)
    assert [lease.request_id for lease in s.dispatch(1.0)] == ["other"]
    assert s.is_queued("m", "stuck")


# -- canary retry -----------------------------------------------------------------------------


def test_canary_failure_is_requeued_onto_the_stable_version() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 1, "v2": 1}, stable="v1")
    first = grant_one(s, "warm", 0.0)
    assert (first.version, first.canary) == ("v1", False)
    s.release("warm")
    lease = grant_one(s, "x", 1.0)
    assert (lease.replica_id, lease.version, lease.canary) == ("b", "v2", True)
    assert s.requeue("x", exclude_version=True)
    [again] = s.dispatch(2.0)
    assert (again.request_id, again.version, again.canary, again.requeues) == ("x", "v1", False, 1)
    s.release("x")
    assert s.stats(3.0)["m"].versions == {"v1": 2, "v2": 1}


def test_plain_requeue_keeps_other_replicas_of_the_same_version() -> None:
    s = sched(rv("a", "v1"), rv("b1", "v2"), rv("b2", "v2"))
    s.set_traffic("m", {"v2": 1.0})
    lease = grant_one(s, "x", 0.0)
    assert s.requeue("x")
    [again] = s.dispatch(1.0)
    assert (lease.version, again.version) == ("v2", "v2") and again.replica_id != lease.replica_id


def test_no_canary_without_a_stable_version_or_a_split() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    assert not grant_one(s, "nosplit", 0.0).canary
    s.set_traffic("m", {"v1": 1, "v2": 1})
    assert not any(grant_one(s, f"q{i}", 1.0).canary for i in range(4))


# -- head of line -----------------------------------------------------------------------------


def test_picked_version_full_means_the_request_waits_for_it() -> None:
    s = sched(rv("a", "v1", cap=1), rv("b", "v2", cap=1))
    s.set_traffic("m", {"v1": 1, "v2": 1})
    assert grant_one(s, "q0", 0.0).version == "v1"
    s.release("q0")
    s.enqueue(req("q1"), 1.0)
    s.enqueue(req("q2"), 1.0)
    leases = s.dispatch(1.0)
    assert [(x.request_id, x.version) for x in leases] == [("q1", "v2"), ("q2", "v1")]
    s.release("q2")  # v1 is free again, v2 (next in turn) is still busy with q1
    s.enqueue(req("q3"), 2.0)
    s.enqueue(req("q4"), 2.0)
    assert s.dispatch(2.0) == []  # q3's version is v2: it waits, and q4 does not pass it
    s.release("q1")
    leases = s.dispatch(3.0)
    assert [(x.request_id, x.version) for x in leases] == [("q3", "v2"), ("q4", "v1")]


# -- configuration ----------------------------------------------------------------------------


def test_clearing_the_split_restores_every_replica() -> None:
    s = sched(rv("a", "v1", cap=1), rv("b", "v2", cap=1))
    s.set_traffic("m", {"v2": 1.0})
    assert s.traffic("m") == {"v2": 1.0}
    assert grant_one(s, "x", 0.0).version == "v2"
    s.set_traffic("m", {})
    assert s.traffic("m") == {}
    s.enqueue(req("y"), 1.0)
    [lease] = s.dispatch(1.0)  # v1 takes requests again
    assert (lease.version, lease.canary) == ("v1", False)


def test_traffic_for_an_unseen_model_is_kept_until_its_replicas_arrive() -> None:
    s = Scheduler()
    s.set_traffic("m", {"v1": 0.0, "v2": 1.0}, stable="v1")
    assert s.traffic("m") == {"v1": 0.0, "v2": 1.0} and "m" in s.models()
    assert s.traffic("unknown") == {}
    s.set_replicas("m", [rv("a", "v1"), rv("b", "v2")])
    lease = grant_one(s, "x", 0.0)
    assert (lease.version, lease.canary) == ("v2", True)


def test_resetting_the_same_split_keeps_the_turn() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 1, "v2": 1})
    assert versions_of(s, 1) == ["v1"]
    s.set_traffic("m", {"v1": 1, "v2": 1})  # a controller re-sends its state every loop
    assert grant_one(s, "next", 9.0).version == "v2"


@pytest.mark.parametrize(
    ("weights", "stable", "message"),
    [
        ({"v1": -0.1, "v2": 1.0}, None, "weight of version 'v1' must be a finite number >= 0"),
        ({"v1": math.nan}, None, "weight of version 'v1' must be a finite number >= 0, got nan"),
        ({"v1": math.inf}, None, "must be a finite number"),
        ({"v1": 0.0, "v2": 0}, None, "needs a traffic weight > 0, all of v1, v2 are 0"),
        ({"v1": 1.0}, "v9", r"stable version 'v9' must be one of the versions .*\(v1\)"),
        ({}, "v1", r"stable version 'v1' must be one of the versions .*\(none\)"),
    ],
)
def test_invalid_split_says_what_is_wrong(
    weights: dict[str, float], stable: str | None, message: str
) -> None:
    s = sched(rv("a", "v1"))
    s.set_traffic("m", {"v1": 1.0})
    with pytest.raises(ValueError, match=message):
        s.set_traffic("m", weights, stable=stable)
    assert s.traffic("m") == {"v1": 1.0}  # a rejected split changes nothing


def test_a_pinned_request_runs_on_its_version_whatever_the_split() -> None:
    s = sched(rv("a", "v1"), rv("b", "v2"))
    s.set_traffic("m", {"v1": 1.0, "v2": 0.0}, stable="v1")
    # v2 takes no traffic, but a data job pinned to it runs there (and only there).
    lease = grant_one(s, "pinned", 0.0, version="v2")
    assert lease.version == "v2" and not lease.canary  # a failure is not retried elsewhere
    s.release("pinned", 1, now=0.0)
    assert versions_of(s, 3, version="v2") == ["v2"] * 3
    assert versions_of(s, 4) == ["v1"] * 4
    s.set_replicas("m", [rv("a", "v1")])
    with pytest.raises(ReplicaUnavailable):
        s.enqueue(req("p", version="v2"), 10.0)


def test_a_model_scaled_to_zero_queues_requests_for_its_next_replica() -> None:
    s = sched()
    with pytest.raises(ReplicaUnavailable):
        s.enqueue(req("early"), 0.0)
    s.set_cold_start("m", True)
    s.enqueue(req("waits"), 0.0)  # queued: the autoscaler sees it and starts a replica
    assert s.dispatch(1.0) == []
    s.set_replicas("m", [rv("a", "v1")])
    [lease] = s.dispatch(2.0)
    assert lease.request_id == "waits" and lease.queue_wait_s == 2.0


# -- a stream that goes on after its replica died --------------------------------------------


def test_a_migrated_stream_stays_on_its_version_whatever_the_split() -> None:
    s = sched(rv("a1", "v1"), rv("a2", "v1"), rv("b1", "v2"))
    s.set_traffic("m", {"v1": 0.0, "v2": 1.0})  # v1 is draining: new requests go to v2
    s.enqueue(req("x", version="v1"), 0.0)
    [lease] = s.dispatch(0.0)
    assert lease.replica_id in ("a1", "a2")
    assert s.requeue("x", pin_version=True)
    s.mark_unready(lease.replica_id)
    [again] = s.dispatch(1.0)
    assert again.version == "v1" and again.replica_id != lease.replica_id


def test_a_stream_whose_version_has_no_other_replica_cannot_migrate() -> None:
    s = sched(rv("a1", "v1"), rv("b1", "v2"))
    lease = grant_one(s, "x", 0.0, version="v1")
    with pytest.raises(ReplicaUnavailable, match="no other replica of m version v1"):
        s.requeue("x", pin_version=True)
    assert s.lease("x") == lease  # still held, for the caller to release
    s.set_replicas("m", [rv("a1", "v1"), rv("a3", "v1", starting=True), rv("b1", "v2")])
    assert s.requeue("x", pin_version=True)  # one is starting: it waits for it
