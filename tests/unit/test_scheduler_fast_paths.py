"""The scheduler's fast paths agree with the plain code they stand in for.

Each shortcut of the hot path (the LRU's batched puts, ``route`` beside ``choose_replica``,
the lease built without its ``__init__``, the free-slot count kept per model instead of a
scan) is checked here against the straightforward version, on random inputs.
"""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.errors import AiriError
from airi_ray.core.routing import (
    BoundedLRU,
    ReplicaState,
    ReplicaView,
    choose_replica,
    route,
)
from airi_ray.core.scheduling import AcquireRequest, Lease, Scheduler, _new_lease


@given(
    st.integers(1, 8),
    st.lists(st.integers(0, 12), max_size=10),
    st.lists(st.integers(0, 12), max_size=20),
)
def test_touch_all_is_the_puts_one_by_one(maxsize: int, before: list[int], keys: list[int]) -> None:
    a: BoundedLRU[int, bool] = BoundedLRU(maxsize)
    b: BoundedLRU[int, bool] = BoundedLRU(maxsize)
    for k in before:
        a.put(k, True)
        b.put(k, True)
    for k in keys:
        a.put(k, True)
    b.touch_all(keys, True)
    assert list(a._data.items()) == list(b._data.items())


@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_count_leading_counts_the_present_run(present: list[int], keys: list[int]) -> None:
    lru: BoundedLRU[int, bool] = BoundedLRU(16)
    for k in present:
        lru.put(k, True)
    order = list(lru._data)
    expected = 0
    for k in keys:
        if k not in present:
            break
        expected += 1
    assert lru.count_leading(keys) == expected
    assert list(lru._data) == order  # counting does not mark anything used


def _replica(rng: random.Random, rid: str) -> ReplicaState:
    cap = rng.choice((1, 2, 4, 8))
    kv = rng.choice((None, 100, 1000))
    r = ReplicaState(
        ReplicaView(rid, "m", cap, rng.choice(("CPU", "L4", "H100")), kv_capacity_tokens=kv),
        BoundedLRU(8),
        rng.randint(0, cap),
        rng.randint(0, 900),
    )
    r.remember_prefix(tuple(rng.sample(range(6), rng.randint(0, 4))))
    return r


@settings(max_examples=300)
@given(st.integers(0, 2**32))
def test_route_is_choose_replica(seed: int) -> None:
    rng = random.Random(seed)
    cands = [_replica(rng, f"r{i}") for i in rng.sample(range(5), rng.randint(1, 4))]
    session = rng.choice((None, "r0", "r1", "gone"))
    hashes = tuple(rng.sample(range(6), rng.randint(0, 4)))
    preferred = rng.sample(("CPU", "L4", "H100"), rng.randint(0, 2))
    margin = rng.choice((0.0, 0.25, 1.0, -0.5))
    choice = choose_replica(
        cands,
        session_replica=session,
        prefix_hashes=hashes,
        preferred_accelerators=preferred,
        prefix_load_margin=margin,
    )
    assert choice is not None
    got = route(cands, session, hashes, preferred, margin)
    assert (got[0], got[1], got[2]) == (choice.replica, choice.reason, choice.prefix_blocks)


def test_new_lease_equals_the_dataclass() -> None:
    args = ("r", "m", "t", "x", 1.0, 2.5, "prefix", 30, 2, 1, "v2", True, 3)
    fast, plain = _new_lease(*args), Lease(*args)  # type: ignore[arg-type]
    assert fast == plain and hash(fast) == hash(plain) and repr(fast) == repr(plain)
    assert pickle.loads(pickle.dumps(fast)) == plain
    assert fast.queue_wait_s == 1.5


def _recount(s: Scheduler, model: str) -> int:
    return sum(
        max(r.view.max_concurrency - r.in_flight, 0)
        for r in s._models[model].replicas
        if r.view.ready
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_free_slot_count_matches_a_recount(seed: int) -> None:
    """Through grants, releases, requeues, readiness changes and replica sets that shrink
    capacity below what is in flight, the kept count equals the scan it replaces."""
    rng = random.Random(seed)
    s = Scheduler(max_queue_per_model=100, max_queued_per_tenant=100)

    def views(model: str) -> list[ReplicaView]:
        return [
            ReplicaView(f"{model}-{i}", model, rng.randint(1, 4), ready=rng.random() < 0.8)
            for i in rng.sample(range(4), rng.randint(1, 3))
        ]

    for model in ("a", "b"):
        s.set_replicas(model, views(model))
    leased: list[str] = []
    for n in range(150):
        op = rng.random()
        model = rng.choice(("a", "b"))
        if op < 0.4:
            try:
                s.enqueue(AcquireRequest(f"q{n}", model, rng.choice("xyz"), 1, 1), float(n))
            except AiriError:
                pass
        elif op < 0.6:
            leased += [x.request_id for x in s.dispatch(float(n))]
        elif op < 0.75 and leased:
            s.release(leased.pop(rng.randrange(len(leased))), 1)
        elif op < 0.8 and leased:
            s.requeue(leased.pop(rng.randrange(len(leased))))
        elif op < 0.9:
            s.set_replicas(model, views(model))
        elif s.replicas(model):
            s.mark_unready(rng.choice(s.replicas(model)).replica_id)
        for m in ("a", "b"):
            assert s._models[m].free_slots == _recount(s, m)


def test_a_replica_id_moved_to_another_model_frees_there() -> None:
    s = Scheduler()
    s.set_replicas("a", [ReplicaView("r", "a", 1)])
    s.enqueue(AcquireRequest("q", "a", "t"), 0.0)
    [lease] = s.dispatch(0.0)
    s.set_replicas("a", [])
    s.set_replicas("b", [ReplicaView("r", "b", 2)])  # counts the lease still held on it
    assert s._models["b"].free_slots == 1
    s.release(lease.request_id)
    assert s._models["b"].free_slots == 2 == _recount(s, "b")
    assert s._models["a"].free_slots == 0
