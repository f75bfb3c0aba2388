"""Replica choice: admission by slots and KV tokens, then session, prefix, hardware, load.

The router sees small values, never actor handles: a frozen ``ReplicaView`` pushed by the
controller, plus ``ReplicaState``, the scheduler's own mutable bookkeeping of what it sent
to that replica (requests and tokens in flight, the prompt blocks it routed there).

Order of preference among the replicas that can take the request now:

1. session: the replica that served this conversation before (its KV cache holds it);
2. prefix: the replica that was sent the longest leading run of the prompt's block hashes,
   unless it is more loaded than the least-loaded candidate by more than a margin;
3. hardware and load: the least relative load; equal loads go to the model's preferred
   accelerator types, then to the lowest id (so ties are deterministic).

``block_hashes`` is how callers describe a prompt: chained hashes of full 16-token blocks,
as vLLM's prefix cache keys them, so equal leading hashes mean an equal token prefix.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat, takewhile
from typing import Generic, Literal, TypeVar

RouteReason = Literal["session", "prefix", "hardware", "load", "round_robin"]
ROUTE_REASONS: tuple[RouteReason, ...] = ("session", "prefix", "hardware", "load", "round_robin")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Root of the hash chain. Not ``None``: before Python 3.12 ``hash(None)`` depends on the
# object's address, so it would differ between the caller's process and the scheduler's.
ROOT_HASH = 0


# Tokens per prompt block, as callers hash prompts (``block_hashes``) and vLLM's prefix
# cache keys them by default.
BLOCK_TOKENS = 16


def block_hashes(
    token_ids: Sequence[int], block_size: int = BLOCK_TOKENS, parent: int = ROOT_HASH
) -> tuple[int, ...]:
    """Chained hashes of the full ``block_size``-token blocks of a prompt.

    Block ``i``'s hash covers blocks ``0..i`` (it hashes its parent's hash with its own
    tokens), so two prompts share their first ``k`` hashes exactly when they share their
    first ``k`` blocks. A trailing partial block is left out: a cache cannot reuse it
    either. Only ints are hashed, so the values agree across processes.

    ``parent``: the hash of the block before ``token_ids`` (the root by default), to hash
    a prompt's blocks from the middle on, as ``core.kv_events`` does for an engine's
    stored blocks.

    Raises:
        ValueError: ``block_size`` is not positive.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return tuple(hashes)


# Runs whose moves ``BoundedLRU.touch_run`` may hold back; beyond it the oldest is applied.
_PENDING_RUNS = 32


class BoundedLRU(Generic[K, V]):
    """A mapping that forgets its least recently used keys beyond ``maxsize``.

    Every affinity table (sessions, prefix blocks per replica) is one of these, so memory
    stays bounded however many conversations or prompts pass through.

    Runs of keys (a prompt's block hashes) can be put as a whole with ``touch_run``, which
    holds back the reordering: what is present is always exact, and the recency order only
    matters when something is evicted or moved on its own, so the held-back moves are
    applied then, oldest run first (see ``touch_run``).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        # Runs put by ``touch_run`` whose moves to the end are not applied yet, oldest
        # first; every key of each is present (nothing was removed since it was put).
        self._runs: OrderedDict[tuple[K, ...], bool] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (marking it recently used), or None."""
        if self._runs:
            self._settle()
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Set ``key`` as the most recently used entry; evict the oldest beyond the bound."""
        if self._runs:
            self._settle()
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def swap(self, key: K, value: V) -> V | None:
        """``get(key)``, then ``put(key, value)``, in one call: the value ``key`` had (None
        if none), the key now most recently used with ``value``."""
        if self._runs:
            self._settle()
        data = self._data
        old = data.get(key)
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.maxsize:
            data.popitem(last=False)
        return old

    def resize(self, maxsize: int) -> None:
        """Hold at most ``maxsize`` keys from now on, forgetting the least recently used
        beyond it at once.

        Raises:
            ValueError: ``maxsize`` is below 1.
        """
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if self._runs:
            self._settle()
        self.maxsize = maxsize
        while len(self._data) > maxsize:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        if self._runs:
            self._settle()
        return self._data.pop(key, None)

    def discard_all(self, keys: Iterable[K]) -> None:
        """Remove each of ``keys`` that is present."""
        if self._runs:
            self._settle()
        pop = self._data.pop
        for key in keys:
            pop(key, None)

    def clear(self) -> None:
        self._runs.clear()
        self._data.clear()

    def count_leading(self, keys: Iterable[K]) -> int:
        """How many of ``keys``, from the first, are present (without marking them used)."""
        # takewhile over the dict's own __contains__, drained by list(): the walk runs in C,
        # which matters on the scheduler's hot path (16 blocks per prompt, per replica).
        return len(list(takewhile(self._data.__contains__, keys)))

    def touch_all(self, keys: Sequence[K], value: V, present: int = 0) -> None:
        """``put(key, value)`` for each of ``keys`` in order, evicting once at the end.

        ``present``: how many of the last keys the caller knows to be here with ``value``
        already (it just counted them); they are only moved, not written again.

        The same contents and order as the separate puts, in three C-level passes: the
        update inserts the new keys and sets every value, then each key is moved to the end
        in order (a repeated key ends where its last put would leave it), and an LRU keeps
        the ``maxsize`` most recently put keys whenever it evicts, so evicting once at the
        end leaves what evicting after each put would.
        """
        if self._runs:
            self._settle()
        data = self._data
        data.update(zip(keys[: len(keys) - present], repeat(value)))
        deque(map(data.move_to_end, keys), maxlen=0)
        while len(data) > self.maxsize:
            data.popitem(last=False)

    def count_leading_run(self, run: tuple[K, ...]) -> int:
        """``count_leading(run)``, at once for a run put by ``touch_run`` and not evicted
        since: one tuple hash instead of a lookup per key."""
        if run in self._runs:
            return len(run)
        return len(list(takewhile(self._data.__contains__, run)))

    def touch_run(self, run: tuple[K, ...], value: V, present: int = 0) -> None:
        """``touch_all(run[::-1], value, present)``, with the moves held back: the same
        contents at once, and the same order whenever the order is looked at.

        ``present``: how many of the first keys the caller knows to be here with ``value``
        (it just counted them). The new keys are written now; moving the run's keys to the
        end is recorded instead, a run put again only moving to the end of that record.
        The recorded moves are applied oldest first when an eviction, a single-key
        operation or ``touch_all`` needs the order, and the oldest beyond
        ``_PENDING_RUNS``. Applying them in record order at any pace gives the order the
        eager puts give: each key ends up placed by the last run it was put in, which a
        later move never undoes. So a prompt prefix routed again and again costs a tuple
        hash, not a move per block.
        """
        runs = self._runs
        if run in runs:  # recorded already: it only moves to the end of the record
            runs.move_to_end(run)
            if present == len(run):  # every key is there (the usual case for a hot prompt)
                return
        else:
            runs[run] = True
            if len(runs) > _PENDING_RUNS:
                oldest, _ = runs.popitem(last=False)
                deque(map(self._data.move_to_end, reversed(oldest)), maxlen=0)
        data = self._data
        if present < len(run):
            data.update(zip(run[present:], repeat(value)))
            if len(data) > self.maxsize:
                self._settle()
                while len(data) > self.maxsize:
                    data.popitem(last=False)

    def count_and_touch_run(self, run: tuple[K, ...], value: V) -> int:
        """``count_leading_run(run)``, then ``touch_run(run, value, that count)``, in one
        call; for a run recorded already (a prompt routed here again) one lookup of it and
        a move in the record. Returns the count."""
        runs = self._runs
        if run in runs:
            runs.move_to_end(run)
            return len(run)
        present = len(list(takewhile(self._data.__contains__, run)))
        self.touch_run(run, value, present)
        return present

    def _settle(self) -> None:
        """Apply every move ``touch_run`` held back, oldest run first."""
        data = self._data
        for run in self._runs:
            deque(map(data.move_to_end, reversed(run)), maxlen=0)
        self._runs.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class ReplicaView:
    """What the controller tells the scheduler about one replica: never an actor handle.

    Attributes:
        replica_id: unique id of the replica.
        model: the model it serves.
        max_concurrency: requests it may run at once (at least 1).
        accelerator: accelerator type, e.g. ``"H100"``, ``"L4"``, ``"CPU"``.
        ready: it passed its health probe and may be given work.
        in_flight: requests leased to it (filled in by the scheduler; ignored on input).
        kv_capacity_tokens: tokens its KV cache holds, None if unknown (then only the slot
            limit applies).
        in_flight_tokens: token cost leased to it (filled in by the scheduler).
        starting: it is loading and expected to become ready, so requests may queue for it
            instead of being refused with 503.
        version: the model version it serves, ``""`` if unnamed; a traffic split between
            versions (``Scheduler.set_traffic``) decides which versions take new requests.
        cache_events: its engine reports what its prefix cache holds
            (``Scheduler.observe_cache``), so routing reads that instead of remembering
            what it sent there.
        prefill_budget_tokens: prompt tokens that may wait for their prefill on it at once
            (about one engine step's worth), None for no limit. Beyond it, requests wait
            in the scheduler's fair queue instead of the engine's first-come queue, so a
            tenant's flood of long prompts cannot queue ahead of another tenant's call.
    """

    replica_id: str
    model: str
    max_concurrency: int
    accelerator: str = "CPU"
    ready: bool = True
    in_flight: int = 0
    kv_capacity_tokens: int | None = None
    in_flight_tokens: int = 0
    starting: bool = False
    version: str = ""
    cache_events: bool = False
    prefill_budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(
                f"replica {self.replica_id}: max_concurrency must be at least 1, "
                f"got {self.max_concurrency}"
            )
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise ValueError(
                f"replica {self.replica_id}: kv_capacity_tokens must be positive or None, "
                f"got {self.kv_capacity_tokens}"
            )
        if self.prefill_budget_tokens is not None and self.prefill_budget_tokens < 1:
            raise ValueError(
                f"replica {self.replica_id}: prefill_budget_tokens must be positive or None, "
                f"got {self.prefill_budget_tokens}"
            )

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - self.in_flight if self.ready else 0

    @property
    def load(self) -> float:
        """Relative load in [0, 1+]: the fuller of its slots and its KV cache."""
        return relative_load(
            self.in_flight, self.max_concurrency, self.in_flight_tokens, self.kv_capacity_tokens
        )


def relative_load(
    in_flight: int, max_concurrency: int, in_flight_tokens: int, kv_capacity: int | None
) -> float:
    """The fuller of the slot and KV-token budgets, as a fraction of each."""
    load = in_flight / max_concurrency
    if kv_capacity is not None:
        load = max(load, in_flight_tokens / kv_capacity)
    return load


@dataclass(slots=True)
class ReplicaState:
    """The scheduler's mutable record of one replica (mutated in place: it is on the hot path).

    ``prefixes`` holds the block hashes recently routed here, a stand-in for the replica's
    prefix cache that the scheduler can read without asking the replica; for a replica
    with ``view.cache_events``, the hashes its engine reports it holds instead.
    ``cache_synced``: those reports started from a full snapshot of its cache.
    """

    view: ReplicaView
    prefixes: BoundedLRU[int, bool]
    in_flight: int = 0
    in_flight_tokens: int = 0
    cache_synced: bool = False
    prefill_tokens: int = 0  # prompt tokens leased here whose first token is not out yet

    @property
    def replica_id(self) -> str:
        return self.view.replica_id

    @property
    def load(self) -> float:
        v = self.view
        return relative_load(
            self.in_flight, v.max_concurrency, self.in_flight_tokens, v.kv_capacity_tokens
        )

    def has_slot(self) -> bool:
        return self.view.ready and self.in_flight < self.view.max_concurrency

    def fits(self, cost_tokens: int, prompt_tokens: int = 0) -> bool:
        """Whether a request of ``cost_tokens`` (``prompt_tokens`` of them to prefill) may
        start here now.

        An idle replica takes any one request: a request bigger than the KV capacity but
        within the context window would otherwise wait forever. The engine then runs it
        alone, which is the best it can do. Likewise a replica with no prefill pending
        takes any one prompt, however long.
        """
        v = self.view
        if not v.ready:
            return False
        if self.in_flight == 0:
            return True
        if self.in_flight >= v.max_concurrency:
            return False
        kv = v.kv_capacity_tokens
        if kv is not None and self.in_flight_tokens + cost_tokens > kv:
            return False
        return self.prefill_fits(prompt_tokens)

    def prefill_fits(self, prompt_tokens: int) -> bool:
        """Whether ``prompt_tokens`` more may wait for their prefill here now."""
        budget = self.view.prefill_budget_tokens
        return (
            budget is None
            or self.prefill_tokens == 0
            or self.prefill_tokens + prompt_tokens <= budget
        )

    def prefix_match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` were routed here and are still remembered."""
        return self.prefixes.count_leading(hashes)

    def remember_prefix(self, hashes: Sequence[int]) -> None:
        """Record that these blocks now sit in this replica's cache.

        Inserted from the last block to the first, so the first (shared) blocks are the most
        recently used and eviction trims prompts from their tails, as vLLM's cache does.
        """
        self.prefixes.touch_all(hashes[::-1], True)


@dataclass(frozen=True)
class RouteChoice:
    """A routing decision: the replica, why it was chosen, and the prefix blocks it holds."""

    replica: ReplicaState = field(compare=False)
    reason: RouteReason
    prefix_blocks: int = 0


LOAD_EPS = 1e-9  # loads are ratios of small ints; this makes "equal" robust to rounding


def choose_replica(
    candidates: Sequence[ReplicaState],
    *,
    session_replica: str | None = None,
    prefix_hashes: Sequence[int] = (),
    preferred_accelerators: Sequence[str] = (),
    prefix_load_margin: float = 0.25,
) -> RouteChoice | None:
    """Pick one of ``candidates`` (replicas that can take the request now), or None if empty.

    Args:
        candidates: ready, non-excluded replicas with room for the request.
        session_replica: the replica this request's session last went to, if remembered.
        prefix_hashes: the prompt's ``block_hashes``.
        preferred_accelerators: the model's preferred accelerator types, best first.
        prefix_load_margin: how much more relative load (e.g. 0.25 = a quarter of the
            replica's capacity) the prefix-affine replica may carry than the least-loaded
            candidate before load wins over the cache hit.

    O(len(candidates) * matched blocks): no state outside the candidates is read.
    """
    if not candidates:
        return None
    return RouteChoice(
        *route(
            candidates,
            session_replica,
            tuple(prefix_hashes),
            preferred_accelerators,
            prefix_load_margin,
        )
    )


def route(
    candidates: Sequence[ReplicaState],
    session_replica: str | None,
    prefix_hashes: tuple[int, ...],
    preferred_accelerators: Sequence[str],
    prefix_load_margin: float,
) -> tuple[ReplicaState, RouteReason, int]:
    """``choose_replica`` for a non-empty ``candidates``, as ``(replica, reason, blocks)``.

    The scheduler's hot path: positional arguments and a plain tuple, so a decision
    allocates no ``RouteChoice``. The same choice as ``choose_replica`` in every case.
    ``prefix_hashes`` is a tuple, so a run the replica was sent before is found whole
    (``BoundedLRU.count_leading_run``).
    """
    if len(candidates) == 1:
        # One candidate (the usual case when a single slot frees up): it is chosen, and
        # only the reason needs working out. With one replica the least load is its own,
        # and the hardware preference cannot have decided anything.
        r = candidates[0]
        blocks = r.prefixes.count_leading_run(prefix_hashes) if prefix_hashes else 0
        if session_replica is not None and r.view.replica_id == session_replica:
            return r, "session", blocks
        if blocks > 0 and prefix_load_margin + LOAD_EPS >= 0.0:
            return r, "prefix", blocks
        return r, "load", blocks

    if session_replica is not None:
        for r in candidates:
            if r.view.replica_id == session_replica:
                return r, "session", r.prefixes.count_leading_run(prefix_hashes)

    # One pass for each candidate's load (``relative_load``, inlined: this runs whenever
    # several replicas are free), hardware rank (its type's place among the preferred
    # ones, unlisted types last) and prefix match.
    n_preferred = len(preferred_accelerators)
    loads: list[float] = []
    ranks: list[int] = []
    matches: list[int] = []
    # The longest prefix match; among equal matches the least loaded, then hardware, id.
    best_i, best_match, best_key = -1, 0, (0.0, 0, "")
    for i, r in enumerate(candidates):
        v = r.view
        load = r.in_flight / v.max_concurrency
        kv = v.kv_capacity_tokens
        if kv is not None:
            kv_load = r.in_flight_tokens / kv
            if kv_load > load:
                load = kv_load
        accelerator = v.accelerator
        rank = (
            preferred_accelerators.index(accelerator)
            if accelerator in preferred_accelerators
            else n_preferred
        )
        loads.append(load)
        ranks.append(rank)
        if prefix_hashes:
            m = r.prefixes.count_leading_run(prefix_hashes)
            matches.append(m)
            if m > best_match or (
                m == best_match and m > 0 and (load, rank, v.replica_id) < best_key
            ):
                best_i, best_match, best_key = i, m, (load, rank, v.replica_id)
    min_load = min(loads)
    if best_match > 0 and loads[best_i] - min_load <= prefix_load_margin + LOAD_EPS:
        return candidates[best_i], "prefix", best_match

    # Among the least loaded, the most preferred hardware, then the lowest id. "hardware"
    # only when the preference decided it: an equally loaded replica on a less preferred
    # type would otherwise have been the pick.
    chosen, chosen_key, worst_tied_rank = -1, (0, ""), -1
    for i, load in enumerate(loads):
        if load - min_load <= LOAD_EPS:
            key = (ranks[i], candidates[i].view.replica_id)
            if chosen < 0 or key < chosen_key:
                chosen, chosen_key = i, key
            if ranks[i] > worst_tied_rank:
                worst_tied_rank = ranks[i]
    reason: RouteReason = "hardware" if worst_tied_rank > ranks[chosen] else "load"
    return candidates[chosen], reason, matches[chosen] if prefix_hashes else 0
