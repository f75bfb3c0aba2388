"""The global scheduler core: fairness, admission, routing, backpressure, requeue. Fake clock."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.errors import InvalidRequest, Overloaded, ReplicaUnavailable
from airi_ray.core.kv_events import CacheDelta
from airi_ray.core.scheduling import (
    AcquireRequest,
    Lease,
    ReplicaView,
    Scheduler,
    block_hashes,
)


def rv(rid: str, cap: int = 8, **kw: Any) -> ReplicaView:
    return ReplicaView(rid, "m", cap, **kw)


def req(
    rid: str, tenant: str = "t", prompt: int = 10, max_tokens: int = 5, **kw: Any
) -> AcquireRequest:
    return AcquireRequest(rid, "m", tenant, prompt, max_tokens, **kw)


def sched(*views: ReplicaView, **kw: Any) -> Scheduler:
    s = Scheduler(**kw)
    s.set_replicas("m", list(views) or [rv("r1")])
    return s


def serve_one_at_a_time(s: Scheduler, n: int, completion: int = 0) -> list[str]:
    """Dispatch and release ``n`` times on a single-slot model; the order of service."""
    order = []
    for i in range(n):
        [lease] = s.dispatch(float(i))
        order.append(lease.request_id)
        s.release(lease.request_id, completion)
    return order


# -- fairness (VTC) and order within a tenant -------------------------------------------


def test_smallest_counter_goes_first_so_tenants_alternate() -> None:
    s = sched(rv("r1", 1))
    for i in range(3):
        s.enqueue(req(f"a{i}", "A", prompt=10), 0.0)
    for i in range(3):
        s.enqueue(req(f"b{i}", "B", prompt=10), 1.0)
    assert serve_one_at_a_time(s, 6) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert s.virtual_counter("m", "A") == s.virtual_counter("m", "B") == 30.0


def test_fcfs_policy_serves_global_arrival_order() -> None:
    s = sched(rv("r1", 1), policy="fcfs")
    for i in range(3):
        s.enqueue(req(f"a{i}", "A", priority="batch"), 0.0)
    for i in range(3):
        s.enqueue(req(f"b{i}", "B"), 1.0)
    assert serve_one_at_a_time(s, 6) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    # Counters still tally service (no lift), so benchmarks can compare both policies.
    assert s.virtual_counter("m", "A") == 30.0


def test_policy_switch_only_when_nothing_is_queued() -> None:
    s = sched(rv("r1", 1))
    s.enqueue(req("a"), 0.0)
    with pytest.raises(ValueError, match="1 requests are queued"):
        s.set_policy("fcfs")
    s.cancel("a")
    s.set_policy("fcfs")
    assert s.policy == "fcfs"
    with pytest.raises(ValueError, match="vtc, fcfs"):
        s.set_policy("lottery")  # type: ignore[arg-type]


def test_tenant_weights_divide_the_charge() -> None:
    s = sched(rv("r1", 1), max_queued_per_tenant=100)
    s.set_tenants({"A": 2.0})
    for i in range(40):
        s.enqueue(req(f"a{i}", "A", prompt=100), 0.0)
        s.enqueue(req(f"b{i}", "B", prompt=100), 0.0)
    served = serve_one_at_a_time(s, 30)
    assert sum(r.startswith("a") for r in served) == 20  # twice B's share
    assert abs(s.virtual_counter("m", "A") - s.virtual_counter("m", "B")) <= 100


def test_output_tokens_are_charged_at_release_with_their_weight() -> None:
    s = sched(output_weight=3.0)
    s.set_tenants({"A": 2.0})
    s.enqueue(req("a", "A", prompt=40), 0.0)
    s.dispatch(1.0)
    assert s.virtual_counter("m", "A") == 20.0  # 40 input tokens / weight 2
    s.release("a", completion_tokens=10)
    assert s.virtual_counter("m", "A") == 20.0 + 3.0 * 10 / 2.0
    assert s.release("a", 10) is None  # a second release charges nothing
    assert s.virtual_counter("m", "A") == 35.0


def test_default_output_weight_is_two() -> None:
    s = sched()
    s.enqueue(req("a", prompt=0), 0.0)
    s.dispatch(0.0)
    s.release("a", completion_tokens=7)
    assert s.virtual_counter("m", "t") == 14.0


def test_returning_tenant_is_lifted_to_the_smallest_backlogged_counter() -> None:
    s = sched(rv("r1", 1))
    for i in range(5):
        s.enqueue(req(f"a{i}", "A", prompt=100), 0.0)
        s.enqueue(req(f"c{i}", "C", prompt=100), 0.0)
    serve_one_at_a_time(s, 6)  # A and C at 300 each
    assert s.virtual_counter("m", "B") == 0.0
    s.enqueue(req("b0", "B", prompt=100), 10.0)
    assert s.virtual_counter("m", "B") == 300.0  # idle time is not banked
    # ... so B gets its turn but does not monopolise the replica for 3 requests.
    for i in range(1, 4):
        s.enqueue(req(f"b{i}", "B", prompt=100), 10.0)
    # Ties at 300 go by arrival, so B alternates with A and C instead of taking 4 turns.
    assert serve_one_at_a_time(s, 6) == ["a3", "c3", "b0", "a4", "c4", "b1"]


def test_lift_uses_in_flight_tenants_when_none_is_backlogged_and_never_lowers() -> None:
    s = sched(rv("r1", 4))
    s.enqueue(req("a0", "A", prompt=500), 0.0)
    s.dispatch(0.0)  # A: 500, in flight, nothing queued
    s.enqueue(req("b0", "B", prompt=10), 1.0)
    assert s.virtual_counter("m", "B") == 500.0
    s.dispatch(1.0)  # B: 510
    s.release("a0")
    s.release("b0")
    # Nothing queued, nothing in flight: B keeps its own counter (no lift, no reset).
    s.enqueue(req("b1", "B"), 2.0)
    assert s.virtual_counter("m", "B") == 510.0
    # A returns while B (510) is backlogged: lifted from 500 to 510.
    s.enqueue(req("a1", "A"), 3.0)
    assert s.virtual_counter("m", "A") == 510.0


def test_priority_then_deadline_then_arrival_within_a_tenant() -> None:
    s = sched(rv("r1", 1))
    s.enqueue(req("batch", priority="batch", deadline_s=0.1), 0.0)
    s.enqueue(req("plain1"), 1.0)
    s.enqueue(req("late", deadline_s=100.0), 2.0)
    s.enqueue(req("plain2"), 3.0)
    s.enqueue(req("soon", deadline_s=10.0), 4.0)
    assert serve_one_at_a_time(s, 5) == ["soon", "late", "plain1", "plain2", "batch"]


def test_unknown_priority_is_a_user_error() -> None:
    with pytest.raises(InvalidRequest, match="interactive, batch"):
        req("x", priority="urgent")


# -- admission by slots and KV tokens --------------------------------------------------


def test_kv_capacity_limits_tokens_in_flight() -> None:
    s = sched(rv("r1", 10, kv_capacity_tokens=1000))
    for i in range(3):
        s.enqueue(req(f"q{i}", prompt=300, max_tokens=100), 0.0)
    granted = s.dispatch(0.0)
    assert [lease.request_id for lease in granted] == ["q0", "q1"]  # 800 of 1000
    assert s.replicas("m")[0].in_flight_tokens == 800
    # each lease knows the load it runs under (the anomaly detector judges latency by it)
    assert [lease.replica_in_flight for lease in granted] == [1, 2]
    assert s.dispatch(1.0) == []
    s.release("q0", 50)
    assert [lease.request_id for lease in s.dispatch(2.0)] == ["q2"]


def test_slot_limit_applies_when_kv_capacity_is_unknown() -> None:
    s = sched(rv("r1", 2))
    for i in range(3):
        s.enqueue(req(f"q{i}", prompt=10**6), 0.0)
    assert len(s.dispatch(0.0)) == 2


def test_idle_replica_takes_an_oversized_request() -> None:
    s = sched(rv("r1", 4, kv_capacity_tokens=1000))
    s.enqueue(req("huge", prompt=3000, max_tokens=100), 0.0)
    [lease] = s.dispatch(0.0)
    assert lease.cost_tokens == 3100
    s.enqueue(req("small", prompt=1), 1.0)
    assert s.dispatch(1.0) == []  # the replica is over its KV budget now


def test_head_of_line_blocks_smaller_requests_behind_a_large_one() -> None:
    s = sched(rv("r1", 4, kv_capacity_tokens=1000))
    s.enqueue(req("a0", "A", prompt=500), 0.0)
    s.dispatch(0.0)
    s.enqueue(req("b-big", "B", prompt=900), 1.0)  # lifted to A's 500; earlier arrival
    s.enqueue(req("a-small", "A", prompt=10), 2.0)
    assert s.dispatch(2.0) == []  # the small one would fit, but does not overtake
    s.release("a0")
    assert [lease.request_id for lease in s.dispatch(3.0)] == ["b-big", "a-small"]


def test_prompts_past_the_prefill_budget_wait_in_the_fair_queue() -> None:
    s = sched(rv("r1", 64, prefill_budget_tokens=1000))
    for i in range(4):
        s.enqueue(req(f"a{i}", "A", prompt=900), 0.0)
    assert [lease.request_id for lease in s.dispatch(0.0)] == ["a0"]  # alone: any length
    assert s.replicas("m")[0].in_flight == 1
    # a1 waits for room here, in the fair queue, and not in the engine's first-come queue.
    s.enqueue(req("b0", "B", prompt=50), 1.0)
    assert s.dispatch(1.0) == []
    assert s.prefilled(["a0"])
    # B was lifted to A's counter as it came back, and A's head is older: b0 waited behind
    # it, and now goes beside a1's prefill (950 of 1000); a2 waits.
    assert {lease.request_id for lease in s.dispatch(2.0)} == {"a1", "b0"}
    assert not s.prefilled(["a0", "unknown"])  # told twice, or never leased: no change
    s.prefilled(["b0"])
    assert s.dispatch(2.5) == []
    s.release("a1")  # ended before its first token: its prefill is handed back too
    assert [lease.request_id for lease in s.dispatch(3.0)] == ["a2"]
    assert s.prefill_pending() == (1, 900)
    s.requeue("a2")  # its replica failed it: nothing is left counted there
    assert s.prefill_pending() == (0, 0)


def test_cached_prompt_blocks_do_not_count_against_the_prefill_budget() -> None:
    s = sched(rv("r1", 64, prefill_budget_tokens=200))
    ids = list(range(320))  # 20 blocks of 16 tokens
    hashes = block_hashes(ids)
    s.enqueue(req("first", prompt=320, prefix_hashes=hashes), 0.0)
    assert len(s.dispatch(0.0)) == 1
    s.prefilled(["first"])
    s.enqueue(req("long", prompt=300), 1.0)
    assert len(s.dispatch(1.0)) == 1  # 300 tokens to prefill: fits only as the one
    # The same prompt again: every block is cached there, so one token to prefill.
    s.enqueue(req("again", prompt=320, prefix_hashes=hashes), 2.0)
    assert [lease.request_id for lease in s.dispatch(2.0)] == []  # 300 + 320 over 200
    s.prefilled(["long"])
    s.enqueue(req("third", prompt=150), 3.0)
    granted = [lease.request_id for lease in s.dispatch(3.0)]
    assert granted[0] == "again" and "third" in granted  # "again" counted as 1 token


def test_without_a_prefill_budget_prompts_go_to_the_engine_at_once() -> None:
    s = sched(rv("r1", 64))
    for i in range(4):
        s.enqueue(req(f"a{i}", prompt=900), 0.0)
    assert len(s.dispatch(0.0)) == 4
    assert not s.prefilled(["a0"])


def test_a_prefill_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prefill_budget_tokens must be positive"):
        rv("r1", prefill_budget_tokens=0)


def test_adopted_calls_hold_their_replicas_slots_and_tokens_until_dropped() -> None:
    """A restarted scheduler counts the calls its callers still run under the previous
    process's leases, so it neither overfills their replica nor routes as if it idled."""
    s = sched(rv("a", 2, kv_capacity_tokens=1000), rv("b", 2, kv_capacity_tokens=1000))
    s.adopt("old-1", "m", "a", 300)
    s.adopt("old-2", "m", "a", 300)
    s.adopt("old-2", "m", "a", 300)  # named by the next heartbeat too: counted once
    assert {v.replica_id: (v.in_flight, v.in_flight_tokens) for v in s.replicas("m")} == {
        "a": (2, 600),
        "b": (0, 0),
    }
    for i in range(3):
        s.enqueue(req(f"q{i}"), 0.0)
    assert [lease.replica_id for lease in s.dispatch(0.0)] == ["b", "b"]  # a is full
    assert s.in_flight("m") == 4 and [x.request_id for x in s.leases("m")] == ["q0", "q1"]
    assert s.drop_adopted("old-1") and not s.drop_adopted("old-1")
    assert [lease.replica_id for lease in s.dispatch(1.0)] == ["a"]
    assert s.release("old-2") is None  # not a lease of this scheduler
    assert s.drop_adopted("old-2") and s.in_flight("m") == 3


def test_an_adopted_call_on_a_replica_not_known_yet_counts_once_it_is() -> None:
    s = Scheduler()
    s.adopt("old", "m", "r1", 500)  # the heartbeat came before the controller's views
    s.set_replicas("m", [rv("r1", 1, kv_capacity_tokens=1000)])
    assert s.replicas("m")[0].in_flight == 1
    s.enqueue(req("q"), 0.0)
    assert s.dispatch(0.0) == []
    s.drop_adopted("old")
    assert [lease.request_id for lease in s.dispatch(1.0)] == ["q"]
    with pytest.raises(ValueError, match="cost_tokens"):
        s.adopt("bad", "m", "r1", -1)


# -- routing ------------------------------------------------------------------------------


def test_prefix_memory_holds_no_more_blocks_than_the_replicas_kv_cache() -> None:
    """A prompt the engine must have evicted is not taken for a cache hit: each replica
    remembers at most as many blocks as its KV cache holds (64 tokens: 4 blocks here)."""
    s = sched(rv("a", 8, kv_capacity_tokens=64), rv("b", 8, kv_capacity_tokens=64))
    first, second = tuple(range(4)), tuple(range(10, 14))

    def route(rid: str, hashes: tuple[int, ...]) -> tuple[str, str, int]:
        s.enqueue(req(rid, prefix_hashes=hashes), 0.0)
        [lease] = s.dispatch(0.0)
        s.release(rid)
        return lease.replica_id, lease.route, lease.prefix_blocks

    assert route("q1", first) == ("a", "load", 0)
    assert route("q2", first) == ("a", "prefix", 4)
    assert route("q3", second) == ("a", "load", 0)  # a's cache now holds these 4 blocks
    assert route("q4", first) == ("a", "load", 0)  # not "prefix": evicted by q3's


def test_prefix_memory_shrinks_once_the_kv_capacity_is_known() -> None:
    s = sched(rv("a", 8))  # capacity unknown: the configured bound
    for i, hashes in enumerate((tuple(range(4)), tuple(range(10, 14)))):
        s.enqueue(req(f"q{i}", prefix_hashes=hashes), 0.0)
        s.dispatch(0.0)
        s.release(f"q{i}")
    s.set_replicas("m", [rv("a", 8, kv_capacity_tokens=64)])  # reported once it started
    # The most recent prompt's 4 blocks were kept, the older one's forgotten.
    s.enqueue(req("recent", prefix_hashes=tuple(range(10, 14))), 0.0)
    s.enqueue(req("older", prefix_hashes=tuple(range(4))), 0.0)
    routed = [(x.request_id, x.prefix_blocks) for x in s.dispatch(0.0)]
    assert routed == [("recent", 4), ("older", 0)]


def test_least_relative_load_then_id() -> None:
    s = sched(rv("a", 4), rv("b", 8), rv("c", 8))
    for i in range(3):
        s.enqueue(req(f"q{i}"), 0.0)
    leases = s.dispatch(0.0)
    assert [(lease.replica_id, lease.route) for lease in leases] == [
        ("a", "load"),
        ("b", "load"),
        ("c", "load"),
    ]
    s.enqueue(req("q3"), 1.0)
    [lease] = s.dispatch(1.0)
    assert lease.replica_id == "b"  # 1/8 beats a's 1/4; b before c on the id


def test_kv_fill_counts_in_relative_load() -> None:
    s = sched(rv("a", 8, kv_capacity_tokens=1000), rv("b", 8, kv_capacity_tokens=10_000))
    s.enqueue(req("q0", prompt=400), 0.0)
    s.enqueue(req("q1", prompt=10), 0.0)
    s.enqueue(req("q2", prompt=10), 0.0)
    routed = {lease.request_id: lease.replica_id for lease in s.dispatch(0.0)}
    assert routed == {"q0": "a", "q1": "b", "q2": "b"}  # a is 40% full by tokens


def test_session_affinity_beats_load_and_prefix() -> None:
    s = sched(rv("a"), rv("b"))
    h = block_hashes(list(range(64)))
    s.enqueue(req("p", prefix_hashes=h), 0.0)
    s.enqueue(req("s1", session_id="conv"), 0.0)
    first = {lease.request_id: lease.replica_id for lease in s.dispatch(0.0)}
    assert first == {"p": "a", "s1": "b"}
    s.enqueue(req("s2", session_id="conv", prefix_hashes=h), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.route) == ("b", "session")


def test_session_replica_that_is_full_or_excluded_is_not_forced() -> None:
    s = sched(rv("a", 1), rv("b", 1))
    s.enqueue(req("s1", session_id="conv"), 0.0)
    [first] = s.dispatch(0.0)
    s.enqueue(req("s2", session_id="conv"), 1.0)
    [second] = s.dispatch(1.0)
    assert second.replica_id != first.replica_id and second.route == "load"


def test_prefix_affinity_within_the_load_margin() -> None:
    s = sched(rv("a"), rv("b"))  # 8 slots: one request is 0.125 of load
    h = block_hashes(list(range(100)))
    s.enqueue(req("q0", prefix_hashes=h), 0.0)
    s.dispatch(0.0)  # to a (tie on load, id)
    s.enqueue(req("q1", prefix_hashes=h[:3] + (1, 2)), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.route, lease.prefix_blocks) == ("a", "prefix", 3)


def test_prefix_affinity_yields_to_load_beyond_the_margin() -> None:
    s = sched(rv("a"), rv("b"), prefix_load_margin=0.1)
    h = block_hashes(list(range(100)))
    s.enqueue(req("q0", prefix_hashes=h), 0.0)
    s.dispatch(0.0)
    s.enqueue(req("q1", prefix_hashes=h), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.route) == ("b", "load")  # 0.125 over b's load > 0.1


def test_prefix_prefers_the_longest_leading_match() -> None:
    s = sched(rv("a"), rv("b"))
    h = block_hashes(list(range(160)))  # 10 blocks
    s.enqueue(req("short", prefix_hashes=h[:2]), 0.0)
    s.enqueue(req("long", prefix_hashes=h[:6], exclude=frozenset({"a"})), 0.0)
    placed = {lease.request_id: lease.replica_id for lease in s.dispatch(0.0)}
    assert placed == {"short": "a", "long": "b"}
    s.release("short")
    s.release("long")
    s.enqueue(req("q", prefix_hashes=h), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.route, lease.prefix_blocks) == ("b", "prefix", 6)


def test_hardware_preference_breaks_load_ties_only() -> None:
    s = sched(rv("a", accelerator="CPU"), rv("b", accelerator="L4"))
    s.set_preferred_accelerators("m", ["H100", "L4"])
    s.enqueue(req("q0"), 0.0)
    [lease] = s.dispatch(0.0)
    assert (lease.replica_id, lease.route) == ("b", "hardware")
    s.enqueue(req("q1"), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.route) == ("a", "load")  # b is busier now


def test_route_counts_and_excluded_replicas() -> None:
    s = sched(rv("a"), rv("b"))
    s.enqueue(req("q0", exclude=frozenset({"a"})), 0.0)
    [lease] = s.dispatch(0.0)
    assert lease.replica_id == "b"
    assert s.stats(0.0)["m"].routes == {
        "session": 0,
        "prefix": 0,
        "hardware": 0,
        "load": 1,
        "round_robin": 0,
    }


def test_unready_replicas_get_nothing() -> None:
    s = sched(rv("a", 1))
    s.enqueue(req("x"), 0.0)
    s.mark_unready("a")
    assert s.dispatch(0.0) == []
    assert s.cancel("x") and not s.cancel("x")
    assert s.queue_depth("m") == 0


# -- backpressure ----------------------------------------------------------------------


def test_tenant_queue_limit_is_429_with_retry_after() -> None:
    s = sched(rv("r1", 1), max_queued_per_tenant=2)
    s.enqueue(req("a", "A"), 0.0)
    s.enqueue(req("b", "A"), 0.0)
    with pytest.raises(Overloaded, match="tenant 'A' has 2 requests waiting") as e:
        s.enqueue(req("c", "A"), 0.0)
    assert "per-tenant limit is 2" in e.value.message
    assert e.value.status == 429 and e.value.retry_after_s is not None
    assert e.value.retry_after_s >= 1.0
    s.enqueue(req("d", "B"), 0.0)  # other tenants are unaffected
    s.set_tenants({}, max_queued={"A": 3})
    s.enqueue(req("c", "A"), 0.0)


def test_model_queue_limit_is_429() -> None:
    s = sched(rv("r1", 1), max_queue_per_model=2)
    s.enqueue(req("a", "A"), 0.0)
    s.enqueue(req("b", "B"), 0.0)
    with pytest.raises(Overloaded, match="model 'm' has 2 requests waiting, the limit is 2"):
        s.enqueue(req("c", "C"), 0.0)
    counts = s.stats(0.0)["m"].tenants
    assert (counts["C"].refused, counts["A"].admitted) == (1, 1)


def test_a_full_tenant_is_named_before_a_full_model() -> None:
    s = sched(rv("r1", 1), max_queue_per_model=2, max_queued_per_tenant=2)
    s.enqueue(req("a", "A"), 0.0)
    s.enqueue(req("b", "A"), 0.0)
    with pytest.raises(Overloaded, match="tenant 'A' has 2 requests waiting"):
        s.enqueue(req("c", "A"), 0.0)
    with pytest.raises(Overloaded, match="model 'm' has 2 requests waiting"):
        s.enqueue(req("d", "B"), 0.0)
    counts = s.stats(0.0)["m"].tenants
    assert (counts["A"].refused, counts["B"].refused, counts["A"].admitted) == (1, 1, 2)


def test_retry_after_follows_observed_hold_time() -> None:
    s = sched(rv("r1", 1), max_queue_per_model=10)
    for i in range(20):
        s.enqueue(req(f"w{i}"), float(i))
        [lease] = s.dispatch(float(i))
        s.release(lease.request_id, 1, now=float(i) + 5.0)  # each call holds 5 s
    for i in range(10):
        s.enqueue(req(f"q{i}"), 100.0)
    with pytest.raises(Overloaded) as e:
        s.enqueue(req("over"), 100.0)
    assert e.value.retry_after_s is not None and 30.0 <= e.value.retry_after_s <= 60.0


def test_overloaded_pickles_with_retry_after() -> None:
    e = pickle.loads(pickle.dumps(Overloaded("full", retry_after_s=2.5)))
    assert type(e) is Overloaded and e.message == "full" and e.retry_after_s == 2.5
    assert e.status == 429 and e.to_body()["error"]["code"] == "queue_full"


def test_no_ready_replica_is_503_but_starting_ones_queue() -> None:
    s = sched(rv("a", ready=False))
    with pytest.raises(ReplicaUnavailable, match="model 'm' has no ready replica") as e:
        s.enqueue(req("x"), 0.0)
    assert e.value.status == 503
    with pytest.raises(ReplicaUnavailable, match="'other'"):
        s.enqueue(AcquireRequest("y", "other", "t"), 0.0)
    s.set_replicas("m", [rv("a", ready=False, starting=True)])
    s.enqueue(req("x"), 0.0)
    assert s.dispatch(0.0) == []
    s.set_replicas("m", [rv("a")])
    assert [lease.request_id for lease in s.dispatch(1.0)] == ["x"]


def test_duplicate_request_id_is_a_caller_bug() -> None:
    s = sched()
    s.enqueue(req("x"), 0.0)
    with pytest.raises(ValueError, match="already queued"):
        s.enqueue(req("x"), 0.0)


# -- failure handling --------------------------------------------------------------------


def test_requeue_goes_to_the_head_of_its_tenant_avoiding_the_dead_replica() -> None:
    s = sched(rv("r1", 1), rv("r2", 1))
    s.enqueue(req("a0", "A", prompt=100, priority="batch"), 0.0)
    [lease] = s.dispatch(0.0)
    assert lease.replica_id == "r1"
    s.enqueue(req("a1", "A"), 1.0)  # interactive: would normally go before a batch request
    s.enqueue(req("a2", "A"), 1.0)
    before = s.virtual_counter("m", "A")
    assert s.requeue("a0") and not s.requeue("a0")
    s.mark_unready("r1")
    assert s.virtual_counter("m", "A") == before - 100.0  # the prompt charge is refunded
    assert s.is_queued("m", "a0") and s.in_flight("m") == 0
    [again] = s.dispatch(2.0)
    assert (again.request_id, again.replica_id, again.requeues) == ("a0", "r2", 1)
    assert again.enqueued_at == 0.0  # the wait counts from the first enqueue
    assert s.stats(2.0)["m"].tenants["A"].requeued == 1


def test_request_whose_replicas_are_all_excluded_does_not_block_others() -> None:
    s = sched(rv("a", 5))
    s.enqueue(req("fresh0", "B"), 0.0)
    [lease] = s.dispatch(0.0)
    s.requeue("fresh0")  # now excludes a, the only replica
    s.enqueue(req("other", "C"), 1.0)
    assert [lease.request_id for lease in s.dispatch(2.0)] == ["other"]
    s.set_replicas("m", [rv("a", 5), rv("b", 5)])
    [lease] = s.dispatch(3.0)
    assert (lease.request_id, lease.replica_id) == ("fresh0", "b")


def test_in_flight_counts_survive_replica_set_changes() -> None:
    s = sched(rv("a", 2))
    s.enqueue(req("x", prompt=50), 0.0)
    s.dispatch(0.0)
    s.set_replicas("m", [rv("b", 2)])  # a removed while x runs on it
    s.set_replicas("m", [rv("a", 2), rv("b", 2)])  # and back
    view = {v.replica_id: v for v in s.replicas("m")}["a"]
    assert (view.in_flight, view.in_flight_tokens) == (1, 55)
    s.release("x")
    assert s.replicas("m")[0].in_flight == 0
    with pytest.raises(ValueError, match="belongs to"):
        s.set_replicas("m", [ReplicaView("z", "other", 1)])


# -- bounded state ------------------------------------------------------------------------


def test_session_memory_is_bounded() -> None:
    s = sched(rv("a"), rv("b"), max_sessions=2)
    for sid in ("s1", "s2", "s3"):
        s.enqueue(req(sid, session_id=sid), 0.0)
        s.dispatch(0.0)
        s.release(sid)
    # s1 was forgotten: routing falls back to load; s3 is remembered.
    s.enqueue(req("s1-again", session_id="s1"), 1.0)
    s.enqueue(req("s3-again", session_id="s3"), 1.0)
    routes = {lease.request_id: lease.route for lease in s.dispatch(1.0)}
    assert routes == {"s1-again": "load", "s3-again": "session"}


def test_prefix_memory_is_bounded_and_keeps_leading_blocks() -> None:
    s = sched(rv("a"), rv("b"), prefix_blocks_per_replica=4)
    h = block_hashes(list(range(16 * 8)))
    s.enqueue(req("q0", prefix_hashes=h), 0.0)
    s.dispatch(0.0)
    s.release("q0")
    s.enqueue(req("q1", prefix_hashes=h), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.prefix_blocks) == ("a", 4)


def test_released_and_cancelled_state_is_dropped() -> None:
    s = sched(rv("a", 1))
    s.enqueue(req("x"), 0.0)
    s.enqueue(req("y"), 0.0)
    s.dispatch(0.0)
    s.cancel("y")
    s.release("x", 3)
    assert s.lease("x") is None and s.queued_model("y") is None
    assert (s.queue_depth("m"), s.in_flight("m")) == (0, 0)
    v = s.replicas("m")[0]
    assert (v.in_flight, v.in_flight_tokens) == (0, 0)


def test_stats_snapshot() -> None:
    s = sched(rv("a", 1))
    s.enqueue(req("x", "A"), 0.0)
    s.enqueue(req("y", "A"), 2.0)
    s.enqueue(req("z", "B"), 5.0)
    s.dispatch(6.0)
    st_m = s.stats(10.0)["m"]
    assert (st_m.queue_depth, st_m.in_flight, st_m.in_flight_tokens) == (2, 1, 15)
    a, b = st_m.tenants["A"], st_m.tenants["B"]
    assert (a.queue_depth, a.oldest_wait_s, a.in_flight, a.virtual_counter) == (1, 8.0, 1, 10.0)
    assert (b.queue_depth, b.oldest_wait_s, b.admitted) == (1, 5.0, 1)


# -- properties ----------------------------------------------------------------------------

_op = st.one_of(
    st.tuples(
        st.just("enqueue"),
        st.integers(0, 3),  # tenant
        st.integers(0, 400),  # prompt tokens
        st.integers(0, 200),  # max tokens
        st.sampled_from(["interactive", "batch"]),
        st.sampled_from([None, 1.0, 5.0]),
        st.sampled_from([None, "s1", "s2"]),  # session
        st.integers(0, 2),  # which shared prompt
    ),
    st.tuples(st.just("dispatch")),
    st.tuples(st.just("release"), st.integers(0, 50), st.integers(0, 300)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("requeue"), st.integers(0, 50)),
    st.tuples(st.just("unready"), st.integers(0, 2)),
    st.tuples(st.just("reset_replicas")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80), st.sampled_from(["vtc", "fcfs"]))
def test_no_request_is_lost_or_duplicated(ops: list[tuple[Any, ...]], policy: str) -> None:
    views = [
        rv("r0", 2, kv_capacity_tokens=600),
        rv("r1", 3, accelerator="L4"),
        rv("r2", 1, kv_capacity_tokens=300),
    ]
    s = sched(*views, policy=policy, max_queued_per_tenant=6, max_queue_per_model=15)
    s.set_tenants({"t0": 1.0, "t1": 2.0, "t2": 0.5})
    queued: set[str] = set()
    leased: dict[str, Lease] = {}
    excluded: dict[str, set[str]] = {}  # replicas each request was requeued from
    counters: dict[str, float] = {}
    now = 0.0
    for n, op in enumerate(ops):
        now += 0.5
        kind = op[0]
        if kind == "enqueue":
            _, t, prompt, mx, prio, dl, sid, p = op
            rid = f"q{n}"
            hashes = block_hashes([p] * 16 * (p + 1))
            r = req(rid, f"t{t}", prompt, mx, priority=prio, deadline_s=dl, session_id=sid)
            try:
                s.enqueue(replace(r, prefix_hashes=hashes), now)
            except (Overloaded, ReplicaUnavailable):
                continue
            queued.add(rid)
            excluded[rid] = set()
        elif kind == "dispatch":
            for lease in s.dispatch(now):
                assert lease.request_id in queued and lease.request_id not in leased
                assert lease.replica_id not in excluded[lease.request_id]
                queued.remove(lease.request_id)
                leased[lease.request_id] = lease
        elif kind in ("release", "requeue") and leased:
            rid = sorted(leased)[op[1] % len(leased)]
            lease = leased.pop(rid)
            if kind == "release":
                assert s.release(rid, op[2]) == lease
            else:
                assert s.requeue(rid)
                queued.add(rid)
                excluded[rid].add(lease.replica_id)
        elif kind == "cancel" and queued:
            rid = sorted(queued)[op[1] % len(queued)]
            assert s.cancel(rid)
            queued.remove(rid)
        elif kind == "unready":
            s.mark_unready(f"r{op[1]}")
        elif kind == "reset_replicas":
            s.set_replicas("m", views)

        # Every request is in exactly one place, and the books balance.
        assert s.queue_depth("m") == len(queued) and s.in_flight("m") == len(leased)
        assert all(s.is_queued("m", r) for r in queued)
        assert all(s.lease(r) == leased[r] for r in leased)
        for v in s.replicas("m"):
            mine = [x for x in leased.values() if x.replica_id == v.replica_id]
            assert v.in_flight == len(mine) <= v.max_concurrency
            assert v.in_flight_tokens == sum(x.cost_tokens for x in mine)
            if v.kv_capacity_tokens is not None and v.in_flight > 1:
                assert v.in_flight_tokens <= v.kv_capacity_tokens
        # Counters never decrease, except by a requeue's refund.
        for tenant in ("t0", "t1", "t2", "t3"):
            c = s.virtual_counter("m", tenant)
            if kind != "requeue":
                assert c >= counters.get(tenant, 0.0) - 1e-9
            counters[tenant] = c

    # Once every replica is ready, everything drains except requests that excluded them all.
    s.set_replicas("m", views)
    for rid in leased:
        s.release(rid, 1)
    leased.clear()
    while granted := s.dispatch(now):
        for lease in granted:
            queued.remove(lease.request_id)
            s.release(lease.request_id, 1)
    all_replicas = {v.replica_id for v in views}
    assert all(excluded[rid] == all_replicas for rid in queued)
    assert s.queue_depth("m") == len(queued) and s.in_flight("m") == 0


def test_round_robin_routing_rotates_and_ignores_affinity() -> None:
    s = Scheduler(routing="round_robin")
    s.set_replicas("m", [ReplicaView("a", "m", 8), ReplicaView("b", "m", 8)])
    hashes = block_hashes(list(range(64)))
    picks = []
    for i in range(4):
        s.enqueue(AcquireRequest(f"r{i}", "m", "t", 64, 8, prefix_hashes=hashes), now=0.0)
        (lease,) = s.dispatch(now=0.0)
        picks.append((lease.replica_id, lease.route))
    assert picks == [("a", "round_robin"), ("b", "round_robin")] * 2
    with pytest.raises(ValueError, match="routing must be one of affinity, round_robin"):
        Scheduler(routing="random")  # type: ignore[arg-type]


# -- prefix tables from the engines' own cache reports -------------------------------------


def test_a_replica_that_reports_its_cache_is_routed_by_what_it_holds() -> None:
    s = sched(rv("a", cache_events=True), rv("b", cache_events=True))
    h = tuple(range(100, 108))
    # Not synced yet: a change is refused, and the replica is asked for a snapshot.
    assert not s.observe_cache("b", CacheDelta(stored=h))
    assert not s.observe_cache("gone", CacheDelta(stored=h, cleared=True))
    assert s.observe_cache("b", CacheDelta(stored=h[:5], cleared=True))
    assert s.observe_cache("a", CacheDelta(cleared=True))
    s.enqueue(req("q0", prefix_hashes=h), 0.0)
    [lease] = s.dispatch(0.0)
    assert (lease.replica_id, lease.route, lease.prefix_blocks) == ("b", "prefix", 5)
    s.release("q0", 1)
    # Routing wrote nothing of its own: b still holds 5 blocks, until b evicts them.
    assert s.observe_cache("b", CacheDelta(removed=h[3:5]))
    s.enqueue(req("q1", prefix_hashes=h), 1.0)
    [lease] = s.dispatch(1.0)
    assert (lease.replica_id, lease.prefix_blocks) == ("b", 3)


def test_cache_reports_are_ignored_for_a_replica_that_does_not_send_them() -> None:
    s = sched(rv("a"))
    assert not s.observe_cache("a", CacheDelta(stored=(1, 2), cleared=True))
