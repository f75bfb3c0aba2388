"""The scheduler's fast paths agree with the plain code they stand in for.

Each shortcut of the hot path (the LRU's batched puts, ``route`` beside ``choose_replica``,
the lease built without its ``__init__``, the open replicas kept per model instead of a
scan) is checked here against the straightforward version, on random inputs.
"""

from __future__ import annotations

import copy
import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.errors import AiriError
from airi_ray.core.fairness import FairQueue
from airi_ray.core.routing import (
    BoundedLRU,
    ReplicaState,
    ReplicaView,
    block_hashes,
    choose_replica,
    route,
)
from airi_ray.core.scheduling import (
    AcquireRequest,
    Lease,
    Scheduler,
    _can_take_new_work,
    _new_lease,
)


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
    # The caller may say how many of the last keys are there already (with the value).
    present = 0
    while present < len(keys) and keys[len(keys) - 1 - present] in b:
        present += 1
    for k in keys:
        a.put(k, True)
    b.touch_all(keys, True, present)
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


@settings(max_examples=200)
@given(st.integers(0, 2**32), st.sampled_from((1, 3, 8, 30, 200)))
def test_held_back_runs_are_the_puts_one_by_one(seed: int, maxsize: int) -> None:
    """Runs put with ``touch_run`` (their moves held back), mixed with single-key puts,
    gets, pops and eager ``touch_all``: the same contents at every step, the same order
    whenever it is looked at, and ``count_leading_run`` is ``count_leading``."""
    rng = random.Random(seed)
    lazy: BoundedLRU[int, bool] = BoundedLRU(maxsize)
    plain: BoundedLRU[int, bool] = BoundedLRU(maxsize)
    # Up to 40 runs: more than are held back, so the oldest are applied as others come.
    runs = [tuple(rng.sample(range(30), rng.randint(1, 5))) for _ in range(rng.randint(1, 40))]
    touching = rng.choice((0.6, 0.98))  # at times long stretches of runs alone
    for _ in range(120):
        op = rng.random()
        run = rng.choice(runs)
        other = (op - touching) / (1 - touching)  # which other operation, in [0, 1)
        if op < touching:
            present = plain.count_leading(run)
            if rng.random() < 0.5:
                assert lazy.count_leading_run(run) == present == lazy.count_leading(run)
                lazy.touch_run(run, True, rng.randint(0, present))
            else:
                assert lazy.count_and_touch_run(run, True) == present
            for k in reversed(run):
                plain.put(k, True)
        elif other < 0.2:
            k = rng.randrange(30)
            assert lazy.swap(k, True) == plain.get(k)  # a get, then a put
            plain.put(k, True)
        elif other < 0.25:
            k = rng.randrange(30)
            lazy.put(k, True)
            plain.put(k, True)
        elif other < 0.5:
            k = rng.randrange(30)
            assert lazy.get(k) == plain.get(k)
        elif other < 0.75:
            k = rng.randrange(30)
            assert lazy.pop(k) == plain.pop(k)
        elif other < 0.9:
            lazy.touch_all(run, True)
            plain.touch_all(run, True)
        else:  # applying the held-back moves at any time gives the order of the puts
            lazy._settle()
            assert list(lazy._data.items()) == list(plain._data.items())
        assert set(lazy._data.items()) == set(plain._data.items())
        assert len(lazy._runs) <= 32
        settled = copy.deepcopy(lazy)  # what the order would be if it were looked at now
        settled._settle()
        assert list(settled._data.items()) == list(plain._data.items())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32))
def test_runs_held_back_beyond_the_bound_are_applied_oldest_first(seed: int) -> None:
    """Many more distinct runs than are held back, with no eviction to apply them all: the
    oldest are applied as new ones come, and the order stays the one of the puts."""
    rng = random.Random(seed)
    lazy: BoundedLRU[int, bool] = BoundedLRU(1000)
    plain: BoundedLRU[int, bool] = BoundedLRU(1000)
    runs = [tuple(rng.sample(range(300), rng.randint(1, 8))) for _ in range(100)]
    for _ in range(200):
        run = rng.choice(runs)
        present = plain.count_leading(run)
        assert lazy.count_leading_run(run) == present
        lazy.touch_run(run, True, present)
        for k in reversed(run):
            plain.put(k, True)
        settled = copy.deepcopy(lazy)
        settled._settle()
        assert list(settled._data.items()) == list(plain._data.items())
    assert len(lazy._runs) == 32


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
    # The dispatcher passes the open replicas in no particular order: it must not matter.
    rng.shuffle(cands)
    assert route(cands, session, hashes, preferred, margin) == got


def _route_by_lists(
    candidates: list[ReplicaState],
    session_replica: str | None,
    prefix_hashes: tuple[int, ...],
    preferred_accelerators: list[str],
    prefix_load_margin: float,
) -> tuple[ReplicaState, str, int]:
    """``route`` for several candidates as it was written before its one-pass form: lists
    of loads and ranks, a key function for the tie-break. The reference it must agree with."""
    if session_replica is not None:
        for r in candidates:
            if r.replica_id == session_replica:
                return r, "session", r.prefix_match(prefix_hashes)

    loads = [r.load for r in candidates]
    min_load = min(loads)
    ranks = [_rank(r.view.accelerator, preferred_accelerators) for r in candidates]

    if prefix_hashes:
        # Longest match; among equal matches the least loaded, then hardware, then id.
        best_i, best_match = -1, 0
        for i, r in enumerate(candidates):
            m = r.prefix_match(prefix_hashes)
            if m > best_match or (
                m == best_match
                and m > 0
                and (loads[i], ranks[i], r.replica_id)
                < (loads[best_i], ranks[best_i], candidates[best_i].replica_id)
            ):
                best_i, best_match = i, m
        if best_match > 0 and loads[best_i] - min_load <= prefix_load_margin + 1e-9:
            return candidates[best_i], "prefix", best_match

    tied = [i for i, load in enumerate(loads) if load - min_load <= 1e-9]
    chosen = min(tied, key=lambda i: (ranks[i], candidates[i].replica_id))
    # "hardware" only when the preference decided it: an equally loaded replica on a less
    # preferred type would otherwise have been the pick.
    reason = "hardware" if any(ranks[i] > ranks[chosen] for i in tied) else "load"
    r = candidates[chosen]
    return r, reason, r.prefix_match(prefix_hashes) if prefix_hashes else 0


def _rank(accelerator: str, preferred: list[str]) -> int:
    for i, p in enumerate(preferred):
        if p == accelerator:
            return i
    return len(preferred)


@settings(max_examples=400)
@given(st.integers(0, 2**32))
def test_route_over_several_replicas_is_the_list_version(seed: int) -> None:
    rng = random.Random(seed)
    cands = [_replica(rng, f"r{i}") for i in rng.sample(range(6), rng.randint(2, 5))]
    session = rng.choice((None, "r0", "r1", "gone"))
    hashes = tuple(rng.sample(range(6), rng.randint(0, 4)))
    preferred = rng.sample(("CPU", "L4", "H100"), rng.randint(0, 3))
    margin = rng.choice((0.0, 0.25, 1.0, -0.5))
    for r in cands:  # some were sent this prompt through the dispatcher's record of runs
        if hashes and rng.random() < 0.3:
            r.prefixes.touch_run(hashes, True, r.prefix_match(hashes))
    expected = _route_by_lists(cands, session, hashes, preferred, margin)
    assert route(cands, session, hashes, preferred, margin) == expected


def test_new_lease_equals_the_dataclass() -> None:
    args = ("r", "m", "t", "x", 1.0, 2.5, "prefix", 30, 2, 1, "v2", True, 3)
    fast, plain = _new_lease(*args), Lease(*args)  # type: ignore[arg-type]
    assert fast == plain and hash(fast) == hash(plain) and repr(fast) == repr(plain)
    assert pickle.loads(pickle.dumps(fast)) == plain
    assert fast.queue_wait_s == 1.5


def _open(s: Scheduler, model: str) -> set[str]:
    """The replicas of ``model`` with a free slot, by a scan."""
    return {
        r.replica_id
        for r in s._models[model].replicas
        if r.view.ready and r.in_flight < r.view.max_concurrency
    }


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_kept_replica_state_matches_a_scan(seed: int) -> None:
    """Through grants, releases, requeues, readiness changes, replica sets that shrink
    capacity below what is in flight, cold-start flags and traffic splits, what the model
    keeps (its open replicas, whether it takes work) equals the scan it replaces."""
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
        if op < 0.05:
            s.cancel(f"q{rng.randrange(n + 1)}")
        elif op < 0.4:
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
        elif op < 0.85:
            s.set_replicas(model, views(model))
        elif op < 0.9:
            s.set_cold_start(model, rng.random() < 0.5)
        elif op < 0.95:  # a split to a version no replica has: only cold start takes work
            s.set_traffic(model, rng.choice(({}, {"v1": 1.0}, {"": 1.0, "v1": 1.0})))
        elif s.replicas(model):
            s.mark_unready(rng.choice(s.replicas(model)).replica_id)
        for m in ("a", "b"):
            assert set(s._models[m].open) == _open(s, m)
            assert s._models[m].accepting == _can_take_new_work(s._models[m])
            assert s._models[m].queued == len(s._models[m].queue)


def test_a_replica_id_moved_to_another_model_frees_there() -> None:
    s = Scheduler()
    s.set_replicas("a", [ReplicaView("r", "a", 1)])
    s.enqueue(AcquireRequest("q", "a", "t"), 0.0)
    [lease] = s.dispatch(0.0)
    s.set_replicas("a", [])
    s.set_replicas("b", [ReplicaView("r", "b", 2)])  # counts the lease still held on it
    s.enqueue(AcquireRequest("q2", "b", "t"), 0.0)
    assert len(s.dispatch(0.0)) == 1 and not s._models["b"].open  # both slots taken
    s.release(lease.request_id)
    assert set(s._models["b"].open) == {"r"} == _open(s, "b")
    assert not s._models["a"].open


class _ScanQueue:
    """The fair queue's contract, by scanning: the reference its heaps must agree with."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.counter: dict[str, float] = {}
        self.queued: dict[str, tuple[str, tuple[int, float, int]]] = {}  # rid -> tenant, key
        self.in_flight: dict[str, int] = {}
        self.out: set[str] = set()

    def depth(self, tenant: str) -> int:
        return sum(1 for t, _ in self.queued.values() if t == tenant)

    def push(self, tenant: str, rid: str, rank: int, deadline: float, seq: int, front: bool):
        if self.policy == "fcfs":
            rank, deadline = 0, 0.0
        c = self.counter.setdefault(tenant, 0.0)
        if self.depth(tenant) == 0 and self.policy == "vtc":
            floor = [self.counter[t] for t, _ in self.queued.values()] or [
                self.counter[t] for t, n in self.in_flight.items() if n and t != tenant
            ]
            if floor and min(floor) > c:
                self.counter[tenant] = min(floor)
        self.queued[rid] = (tenant, (-1 if front else rank, deadline, seq))

    def head(self, tenant: str) -> str:
        return min((k, rid) for rid, (t, k) in self.queued.items() if t == tenant)[1]

    def select(self) -> str | None:
        keys = [
            ((self.counter[t] if self.policy == "vtc" else 0.0, *k), t)
            for t, k in (
                (t, self.queued[self.head(t)][1])
                for t in {t for t, _ in self.queued.values()} - self.out
            )
        ]
        if not keys:
            return None
        t = min(keys)[1]
        self.out.add(t)
        return t

    def start(self, tenant: str, charge: float) -> str:
        rid = self.head(tenant)
        del self.queued[rid]
        self.out.discard(tenant)
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        self.counter[tenant] += charge
        return rid

    def end(self, tenant: str, charge: float) -> None:
        self.in_flight[tenant] -= 1
        self.counter[tenant] += charge


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(("vtc", "fcfs")))
def test_fair_queue_agrees_with_a_scan(seed: int, policy: str) -> None:
    """Random pushes (some to the front), cancels, selections that start or put back,
    finishes and refunds: the heaps give the order a scan of every tenant gives."""
    rng = random.Random(seed)
    q: FairQueue[str] = FairQueue(policy)  # type: ignore[arg-type]
    ref = _ScanQueue(policy)
    started: list[tuple[str, float]] = []
    for seq in range(300):
        op = rng.random()
        if op < 0.4:
            tenant, rid = rng.choice("ABCDE"), f"r{seq}"
            rank, dl, front = rng.randint(0, 1), rng.choice((1.0, 5.0, 9.0)), rng.random() < 0.1
            q.push(tenant, rid, rid, rank=rank, deadline=dl, seq=seq, front=front)
            ref.push(tenant, rid, rank, dl, seq, front)
        elif op < 0.5 and ref.queued:
            rid = rng.choice(sorted(ref.queued))
            del ref.queued[rid]
            assert q.remove(rid) == rid
        elif op < 0.8:
            # A dispatch round: some tenants sit out (put back), then one starts.
            out = []
            while True:
                t = q.select()
                assert t == ref.select()
                if t is None:
                    break
                assert q.head(t)[0] == ref.head(t)
                if rng.random() < 0.3:
                    out.append(t)
                    continue
                charge = float(rng.randint(0, 50))
                assert q.start(t, charge)[0] == ref.start(t, charge)
                started.append((t, charge))
                break
            for t in out:
                q.put_back(t)
                ref.out.discard(t)
        elif started:
            t, charge = started.pop(rng.randrange(len(started)))
            if rng.random() < 0.7:
                extra = float(rng.randint(0, 80))
                q.finish(t, extra)
                ref.end(t, extra)
            else:
                q.refund(t, charge)
                ref.end(t, -charge)
        for t in "ABCDE":
            assert q.counter(t) == ref.counter.get(t, 0.0)
            assert q.depth(t) == ref.depth(t)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32))
def test_requeues_keep_their_seq_and_items_are_never_compared(seed: int) -> None:
    """Requests started, given back (often refunding nothing, as for prompt_tokens=0) and
    queued again first in their tenant with their seq, as the scheduler's requeue does,
    with tenants sitting out rounds: the order a scan gives, and the items (unorderable
    here) are never compared, however the heaps' entries tie."""
    rng = random.Random(seed)
    q: FairQueue[object] = FairQueue()
    ref = _ScanQueue("vtc")
    started: list[tuple[str, str, int, float]] = []  # tenant, request id, seq, charge
    seq_of: dict[str, int] = {}
    for seq in range(300):
        op = rng.random()
        if op < 0.3:
            tenant, rid = rng.choice("ABC"), f"r{seq}"
            seq_of[rid] = seq
            q.push(tenant, rid, object(), rank=0, deadline=1.0, seq=seq)
            ref.push(tenant, rid, 0, 1.0, seq, False)
        elif op < 0.6:  # a dispatch round: maybe one tenant sits out, then one starts
            out = None
            if rng.random() < 0.3:
                out = q.select()
                assert out == ref.select()
            picked = q.peek()
            expected = ref.select()
            assert (picked[0] if picked else None) == expected
            if picked is not None and expected is not None:
                charge = float(rng.choice((0, 0, 1, 5)))
                rid = picked[1]
                q.start_peeked(charge)
                assert rid == ref.start(expected, charge)
                started.append((expected, rid, seq_of[rid], charge))
            if out is not None:
                q.put_back(out)
                ref.out.discard(out)
        elif started:
            tenant, rid, seq0, charge = started.pop(rng.randrange(len(started)))
            if rng.random() < 0.4:
                extra = float(rng.choice((0, 5)))
                q.finish(tenant, extra)
                ref.end(tenant, extra)
            else:  # requeued: refunded, then first in its tenant, with its seq
                q.refund(tenant, charge)
                ref.end(tenant, -charge)
                q.push(tenant, rid, object(), rank=0, deadline=1.0, seq=seq0, front=True)
                ref.push(tenant, rid, 0, 1.0, seq0, True)
        for t in "ABC":
            assert q.counter(t) == ref.counter.get(t, 0.0)
            assert q.depth(t) == ref.depth(t)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_one_open_replica_is_routed_as_route_routes_it(seed: int) -> None:
    """The dispatcher works out the reason itself when one replica can take the head: the
    same replica, reason and prefix blocks as ``route`` with that one candidate, through
    sessions, shared prefixes and margins (0 gives the prefix reason at equal load)."""
    rng = random.Random(seed)
    s = Scheduler(max_queue_per_model=500, prefix_load_margin=rng.choice((0.0, 0.25)))
    s.set_replicas("m", [ReplicaView(f"r{i}", "m", rng.randint(1, 2)) for i in range(3)])
    prompts = [
        block_hashes(list(range(p * 100, p * 100 + 16 * rng.randint(1, 3)))) for p in range(3)
    ]
    leased: list[str] = []
    checked = 0
    for n in range(400):
        sid = rng.choice((None, "s1", "s2", "s3"))
        hashes = rng.choice(((), *prompts))
        s.enqueue(
            AcquireRequest(
                f"q{n}", "m", rng.choice("AB"), 1, 1, session_id=sid, prefix_hashes=hashes
            ),
            0.0,
        )
        m = s._models["m"]
        picked = m.queue.peek()
        assert picked is not None
        head = picked[2][0]
        cost = head.prompt_tokens + head.max_tokens
        fits = [r for r in m.open.values() if r.fits(cost)]
        expected = None
        if len(fits) == 1:
            remembered = s._sessions._data.get(("m", head.session_id)) if head.session_id else None
            expected = route(fits, remembered, head.prefix_hashes, (), s.prefix_load_margin)
        granted = s.dispatch(0.0)
        if expected is not None:
            first = granted[0]
            assert (first.replica_id, first.route, first.prefix_blocks) == (
                expected[0].replica_id,
                expected[1],
                expected[2],
            )
            checked += 1
        leased += [x.request_id for x in granted]
        while leased and rng.random() < 0.6:
            s.release(leased.pop(rng.randrange(len(leased))), 1)
    assert checked > 0  # the path was taken (6 times at least over 1,500 seeds)
