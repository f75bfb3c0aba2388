"""The global scheduler's decisions: fair queues, token-aware admission, routing, leases.

One ``Scheduler`` object holds, per model, a fair queue of waiting requests (Virtual Token
Counters per tenant, see ``fairness``) and the replicas that may serve them (see
``routing``). A request waits until a ready replica has room for its token cost, then gets
a ``Lease`` naming that replica and the reason it was chosen; the caller streams from the
replica itself and hands the lease back with ``release`` and the real completion token
count, which charges the tenant. The scheduler decides, it never proxies tokens.

Life of a request (what the actor calls, and when):

    enqueue(request, now)     # refused at once with Overloaded (429) / ReplicaUnavailable (503)
    dispatch(now)             # after every change: returns the leases granted
    release(id, completion_tokens, now)   # the call ended (any way) after it was granted
    requeue(id)               # its replica died before the first token: back to the head
    requeue(id, exclude_version=True)     # it failed on a canary: retry on another version
    cancel(id)                # its caller gave up while it was still queued

Traffic split: ``set_traffic(model, weights, stable)`` gives each model version a share of
new requests. With more than one version taking traffic, ``dispatch`` first picks the head
request's version (from a hash of its session id, so a conversation stays on one version,
else by smooth weighted round robin), then a replica of that version as usual. A lease on a
version other than ``stable`` is marked ``canary``, so its caller can retry a failure on the
stable version instead of failing the client.

The clock is an argument everywhere, so tests need no sleeps. Per decision the cost is
O(log tenants + log queued + replicas + versions): no scan of the queued requests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NoReturn

from airi_ray.core.errors import InvalidRequest, Overloaded, ReplicaUnavailable
from airi_ray.core.fairness import POLICIES, FairQueue, Policy
from airi_ray.core.kv_events import CacheDelta
from airi_ray.core.requests import PRIORITIES
from airi_ray.core.routing import (
    BLOCK_TOKENS,
    LOAD_EPS,
    ROUTE_REASONS,
    BoundedLRU,
    ReplicaState,
    ReplicaView,
    RouteReason,
    block_hashes,
    route,
)

__all__ = [
    "PRIORITIES",
    "AcquireRequest",
    "Lease",
    "ModelStats",
    "ReplicaView",
    "Scheduler",
    "TenantStats",
    "block_hashes",
]

Routing = Literal["affinity", "round_robin"]
ROUTINGS: tuple[Routing, ...] = ("affinity", "round_robin")

# Priority classes are most urgent first; the index is the rank used for ordering.
_RANK = {p: i for i, p in enumerate(PRIORITIES)}

# Retry-After hint: how long the queued work takes to drain at the observed hold time per
# lease, clamped so a cold start (no observation yet) or a wild estimate stays sensible.
_RETRY_AFTER_MIN_S = 1.0
_RETRY_AFTER_MAX_S = 60.0
_HOLD_EWMA_ALPHA = 0.1
_HOLD_DEFAULT_S = 1.0


@dataclass(frozen=True)
class AcquireRequest:
    """One model call asking for a replica.

    Attributes:
        request_id: unique among queued and leased requests.
        model, tenant: what is called and who pays.
        prompt_tokens: prompt length in the model's tokens (charged at dispatch).
        max_tokens: the output budget; ``prompt_tokens + max_tokens`` is the KV cost.
        exclude: replicas not to use (they failed this request before).
        priority: ``"interactive"`` (first) or ``"batch"``, within the tenant's queue.
        deadline_s: seconds from enqueue by which it should start, None for none. Relative,
            because the caller's clock is not the scheduler's.
        session_id: conversation id for session affinity, None for none.
        prefix_hashes: ``block_hashes`` of the prompt's tokens, for prefix-cache affinity.
        requested_max_tokens, messages, stop, prompt_chars: the caller's own ``max_tokens``
            (None if unset), chat messages, stop sequences and prompt characters, for the
            tenant's request-shape limits.
        inputs: texts of an embeddings request (0: a generation), for the tenant's limits.
        exclude_versions: model versions not to use (a canary version failed this request).
        version: run only on this version, whatever the traffic split (None: the split
            decides). For the runtime's data jobs, which must embed with one version.
    """

    request_id: str
    model: str
    tenant: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    exclude: frozenset[str] = field(default_factory=frozenset)
    priority: str = "interactive"
    deadline_s: float | None = None
    session_id: str | None = None
    prefix_hashes: tuple[int, ...] = ()
    requested_max_tokens: int | None = None  # the request's shape, checked against the
    messages: int = 0  # tenant's limits
    stop: int = 0
    prompt_chars: int = 0
    inputs: int = 0
    exclude_versions: frozenset[str] = frozenset()  # immutable: a plain default is safe
    version: str | None = None

    def __post_init__(self) -> None:
        if self.priority not in _RANK:
            raise InvalidRequest(
                f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}"
            )
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise InvalidRequest(
                f"token counts must not be negative, got prompt_tokens={self.prompt_tokens} "
                f"and max_tokens={self.max_tokens}"
            )

    @property
    def cost_tokens(self) -> int:
        """KV-cache tokens the request may occupy: prompt plus the whole output budget."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Lease:
    """The right to run one request on one replica until it is released.

    ``route`` says why the replica was chosen (session, prefix, hardware or load);
    ``prefix_blocks`` is how many leading prompt blocks that replica was sent before.
    ``version`` is the model version the replica serves (its ``ReplicaView.version``);
    ``canary`` is True when the model has a traffic split with a stable version and this
    lease is on another version: a failure there may be retried on the stable version
    (``Scheduler.requeue(request_id, exclude_version=True)``) instead of failing the client.
    ``replica_in_flight`` is the replica's requests in flight once this one was granted
    (itself included): the load it runs under, which latency is judged against.
    """

    request_id: str
    model: str
    tenant: str
    replica_id: str
    enqueued_at: float
    granted_at: float
    route: RouteReason = "load"
    cost_tokens: int = 0
    prefix_blocks: int = 0
    requeues: int = 0
    version: str = ""
    canary: bool = False
    replica_in_flight: int = 1

    @property
    def queue_wait_s(self) -> float:
        return self.granted_at - self.enqueued_at


@dataclass(frozen=True)
class TenantStats:
    """One tenant's state on one model, for metrics."""

    queue_depth: int
    oldest_wait_s: float
    in_flight: int
    virtual_counter: float
    admitted: int
    refused: int
    requeued: int  # retried elsewhere before their first token
    migrated: int = 0  # moved to another replica mid-stream


@dataclass(frozen=True)
class ModelStats:
    """One model's scheduling state, for metrics: totals, routes by reason, tenants, and
    leases granted per model version since start (an unnamed version counts under ``""``)."""

    queue_depth: int
    in_flight: int
    in_flight_tokens: int
    routes: dict[str, int]
    tenants: dict[str, TenantStats]
    queued_tokens: int = 0  # prompt + max_tokens of every queued request
    versions: dict[str, int] = field(default_factory=dict)
    # Blocks the engines report holding, over the replicas that report (``cache_events``).
    engine_cache_blocks: int = 0


# A queued request: ``(request, enqueued_at, deadline, seq, requeues)``; ``deadline`` is
# absolute, on the scheduler's clock (inf for none), ``seq`` the arrival number (the last
# tie-break, kept across requeues). A held lease: ``(lease, queued, input_charge)``, the
# charge being what dispatch added to the tenant's counter (refunded on requeue). Plain
# tuples rather than classes: one of each is built per request on the hot path, where a
# class's ``__init__`` is a Python call.
_Queued = tuple[AcquireRequest, float, float, int, int]
_Granted = tuple[Lease, _Queued, float]


@dataclass(slots=True)
class _Counts:
    admitted: int = 0
    refused: int = 0
    requeued: int = 0
    migrated: int = 0


@dataclass(slots=True)
class _Model:
    queue: FairQueue[_Queued]
    replicas: list[ReplicaState] = field(default_factory=list)  # sorted by id
    preferred: tuple[str, ...] = ()
    in_flight: int = 0
    hold_s: float = _HOLD_DEFAULT_S  # EWMA of how long a lease is held
    counts: dict[str, _Counts] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTE_REASONS, 0))
    next_rr: int = 0  # round-robin position among ``replicas``
    traffic: dict[str, float] = field(default_factory=dict)  # version -> weight; {}: no split
    stable: str | None = None
    live: tuple[str, ...] = ()  # versions with weight > 0, by name; () when there is no split
    wrr: dict[str, float] = field(default_factory=dict)  # smooth weighted round-robin scores
    versions: dict[str, int] = field(default_factory=dict)  # leases granted per version
    cold_start: bool = False  # scaled to zero: requests wait for the autoscaler's replica
    # What the hot path would otherwise scan the replicas for, recomputed by
    # ``Scheduler._refresh`` whenever the replicas, their readiness or the split change.
    # ``open``: the ready replicas with a free slot, by id, also kept by each grant and
    # release; only these can take a request (an idle replica has a slot too), so under a
    # backlog dispatch looks at one or two replicas.
    open: dict[str, ReplicaState] = field(default_factory=dict)
    accepting: bool = False  # ``_can_take_new_work(m)``: a request naming no version is taken
    queued: int = 0  # ``len(queue)``, kept by enqueue, requeue, cancel and each grant

    def tenant_counts(self, tenant: str) -> _Counts:
        c = self.counts.get(tenant)
        if c is None:
            c = self.counts[tenant] = _Counts()
        return c


class Scheduler:
    """Fair, token-aware scheduling of model calls over replicas, with bounded queues.

    Args:
        max_queue_per_model: requests allowed to wait per model; one more raises
            ``Overloaded`` (429).
        max_queued_per_tenant: requests one tenant may have waiting per model, unless
            ``set_tenants`` gives it another limit; one more raises ``Overloaded``.
        policy: ``"vtc"`` (fair across tenants) or ``"fcfs"`` (arrival order, the baseline).
        output_weight: cost of one output token relative to one input token in the
            virtual counters.
        prefix_load_margin: relative load (fraction of a replica's capacity) by which the
            prefix-affine replica may exceed the least-loaded one and still be chosen.
        prefix_blocks_per_replica: prompt blocks remembered per replica (LRU).
        max_sessions: conversations remembered for session affinity (LRU).
        routing: ``"affinity"`` (session, prefix, hardware, then load) or ``"round_robin"``
            (the baseline a plain load balancer gives; admission limits still apply).

    Raises:
        ValueError: a setting is out of range.
    """

    def __init__(
        self,
        max_queue_per_model: int = 1024,
        *,
        max_queued_per_tenant: int = 256,
        policy: Policy = "vtc",
        output_weight: float = 2.0,
        prefix_load_margin: float = 0.25,
        prefix_blocks_per_replica: int = 4096,
        max_sessions: int = 65536,
        routing: Routing = "affinity",
    ) -> None:
        if max_queue_per_model < 1:
            raise ValueError("max_queue_per_model must be at least 1")
        if max_queued_per_tenant < 1:
            raise ValueError("max_queued_per_tenant must be at least 1")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if output_weight < 0:
            raise ValueError(f"output_weight must not be negative, got {output_weight}")
        if prefix_load_margin < 0:
            raise ValueError(f"prefix_load_margin must not be negative, got {prefix_load_margin}")
        if prefix_blocks_per_replica < 1 or max_sessions < 1:
            raise ValueError("prefix_blocks_per_replica and max_sessions must be at least 1")
        self.max_queue_per_model = max_queue_per_model
        self.max_queued_per_tenant = max_queued_per_tenant
        self.output_weight = output_weight
        self.prefix_load_margin = prefix_load_margin
        self.prefix_blocks_per_replica = prefix_blocks_per_replica
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {routing!r}")
        self.routing: Routing = routing
        self._policy: Policy = policy
        self._weights: dict[str, float] = {}
        self._tenant_limits: dict[str, int] = {}
        self._models: dict[str, _Model] = {}
        self._replicas: dict[str, ReplicaState] = {}
        self._queued_in: dict[str, str] = {}  # request id -> model, while queued
        self._leases: dict[str, _Granted] = {}
        # Leases on replicas with a prefill budget whose first token is not out yet:
        # request id -> (replica id, prompt tokens it counts against the budget).
        self._prefilling: dict[str, tuple[str, int]] = {}
        # Leases another scheduler process granted, still running (``adopt``): they take
        # their replica's slot and tokens until ``drop_adopted``.
        self._adopted: dict[str, Lease] = {}
        self._sessions: BoundedLRU[tuple[str, str], str] = BoundedLRU(max_sessions)
        self._seq = 0

    # -- configuration --------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Switch between ``"vtc"`` and ``"fcfs"``; only while nothing is queued.

        Raises:
            ValueError: unknown policy, or requests are queued (their order keys depend on it).
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if self._queued_in:
            raise ValueError(
                f"cannot switch policy while {len(self._queued_in)} requests are queued"
            )
        self._policy = policy
        for m in self._models.values():
            m.queue.policy = policy

    def set_tenants(
        self, weights: Mapping[str, float], max_queued: Mapping[str, int] | None = None
    ) -> None:
        """Tenant weights (default 1.0) and per-tenant queue limits (default
        ``max_queued_per_tenant``). Replaces the previous settings; new weights apply to
        tokens charged from now on.

        Raises:
            ValueError: a weight is not positive or a limit is below 1.
        """
        for tenant, w in weights.items():
            if not w > 0:
                raise ValueError(f"tenant {tenant!r}: weight must be positive, got {w}")
        for tenant, n in (max_queued or {}).items():
            if n < 1:
                raise ValueError(f"tenant {tenant!r}: max_queued must be at least 1, got {n}")
        self._weights = dict(weights)
        self._tenant_limits = dict(max_queued or {})

    def set_cold_start(self, model: str, allowed: bool) -> None:
        """Whether ``model`` may have no replica at all (scaled to zero): its requests then
        wait in the queue for a replica to start instead of being refused with 503."""
        m = self._model(model)
        m.cold_start = allowed
        self._refresh(m)

    def set_preferred_accelerators(self, model: str, types: Sequence[str]) -> None:
        """Accelerator types ``model`` prefers, best first; they win ties on load."""
        self._model(model).preferred = tuple(types)

    def set_traffic(
        self, model: str, weights: Mapping[str, float], stable: str | None = None
    ) -> None:
        """The share of new requests each version of ``model`` gets, e.g. ``{"v1": 0.9,
        "v2": 0.1}`` (weights are relative; they need not sum to 1).

        Only replicas of a version with weight > 0 take new requests; a version with weight
        0 or not named (draining, or still warming up) gets none, but leases already held on
        it are released as usual. ``stable`` names the version a failed canary request is
        retried on: leases on any other version are marked ``canary``. An empty ``weights``
        clears the split, so every replica takes requests whatever its version. Setting the
        same split again keeps the round-robin position; a new split starts it afresh.

        Raises:
            ValueError: a weight is negative or not finite, every weight is 0, or ``stable``
                is not one of the versions in ``weights``.
        """
        for version, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(
                    f"model {model!r}: traffic weight of version {version!r} must be a finite "
                    f"number >= 0, got {w}"
                )
        if weights and not any(w > 0 for w in weights.values()):
            raise ValueError(
                f"model {model!r}: at least one version needs a traffic weight > 0, all of "
                f"{', '.join(sorted(weights))} are 0; pass an empty mapping to clear the split"
            )
        if stable is not None and stable not in weights:
            known = ", ".join(sorted(weights)) or "none"
            raise ValueError(
                f"model {model!r}: stable version {stable!r} must be one of the versions in "
                f"the traffic weights ({known})"
            )
        m = self._model(model)
        if dict(weights) != m.traffic:
            m.wrr = {}
        m.traffic = dict(weights)
        m.stable = stable if weights else None
        m.live = tuple(sorted(v for v, w in weights.items() if w > 0))
        self._refresh(m)

    def traffic(self, model: str) -> dict[str, float]:
        """The traffic split of ``model``: weight per version, {} if there is none."""
        m = self._models.get(model)
        return dict(m.traffic) if m is not None else {}

    # -- replica set ----------------------------------------------------------------------

    def set_replicas(self, model: str, views: Sequence[ReplicaView]) -> None:
        """Replace the replica set of ``model`` with the controller's current views.

        Kept replicas keep their in-flight counts and prefix memory; a replica seen for the
        first time (or again after removal) counts the leases still held on it. The
        ``in_flight`` fields of the views are ignored: the scheduler keeps its own.

        Raises:
            ValueError: a view belongs to another model or an id is repeated.
        """
        m = self._model(model)
        old = {r.replica_id: r for r in m.replicas}
        new_ids = [v.replica_id for v in views]
        if len(set(new_ids)) != len(new_ids):
            raise ValueError(f"replica ids of model {model!r} repeat: {new_ids}")
        fresh: list[ReplicaState] = []
        kept: list[ReplicaState] = []
        for v in views:
            if v.model != model:
                raise ValueError(f"replica {v.replica_id} belongs to {v.model!r}, not {model!r}")
            other = self._replicas.get(v.replica_id)
            if other is not None and other.view.model != model:
                raise ValueError(
                    f"replica id {v.replica_id} is already used by model {other.view.model!r}"
                )
            r = old.get(v.replica_id)
            blocks = self._prefix_blocks(v)
            if r is None:
                r = ReplicaState(v, BoundedLRU(blocks))
                fresh.append(r)
            else:
                r.view = v
                if r.prefixes.maxsize != blocks:  # its KV capacity became known
                    r.prefixes.resize(blocks)
            kept.append(r)
        if fresh:  # rare (replica start): one pass over the leases
            by_id = {r.replica_id: r for r in fresh}
            held = [g[0] for g in self._leases.values()]
            for lease in [*held, *self._adopted.values()]:
                r = by_id.get(lease.replica_id)
                if r is not None:
                    r.in_flight += 1
                    r.in_flight_tokens += lease.cost_tokens
            for replica_id, tokens in self._prefilling.values():
                r = by_id.get(replica_id)
                if r is not None:
                    r.prefill_tokens += tokens
        for rid in old.keys() - set(new_ids):
            del self._replicas[rid]
        for r in kept:
            self._replicas[r.replica_id] = r
        m.replicas = sorted(kept, key=lambda r: r.replica_id)
        self._refresh(m)

    def adopt(self, request_id: str, model: str, replica_id: str, cost_tokens: int) -> None:
        """Count a call that runs on ``replica_id`` under a lease an earlier process of the
        scheduler granted (its caller named it after a restart): it holds a slot and
        ``cost_tokens`` of the replica's KV tokens until ``drop_adopted``. Not a lease of
        this scheduler (it cannot be requeued, and its tenant's counter is not charged),
        only the load it puts on the replica, so routing and admission see it. A replica
        not known yet counts it once ``set_replicas`` brings it. Adopting an id again, or
        one this scheduler granted, changes nothing.

        Raises:
            ValueError: ``cost_tokens`` is negative.
        """
        if cost_tokens < 0:
            raise ValueError(f"cost_tokens must not be negative, got {cost_tokens}")
        if request_id in self._adopted or request_id in self._leases:
            return
        lease = Lease(request_id, model, "", replica_id, 0.0, 0.0, cost_tokens=cost_tokens)
        self._adopted[request_id] = lease
        m = self._model(model)
        m.in_flight += 1
        r = self._replicas.get(replica_id)
        if r is not None:  # as ``_free`` will find it
            r.in_flight += 1
            r.in_flight_tokens += cost_tokens
            if r.in_flight >= r.view.max_concurrency:
                m.open.pop(replica_id, None)

    def drop_adopted(self, request_id: str) -> bool:
        """An adopted call ended (released, or its caller is gone): its replica's slot and
        tokens are free again. False if ``request_id`` was not adopted."""
        lease = self._adopted.pop(request_id, None)
        if lease is None:
            return False
        self._free(self._models[lease.model], lease)
        return True

    def _prefix_blocks(self, view: ReplicaView) -> int:
        """How many prompt blocks to remember as sent to a replica: no more than its KV
        cache holds (when known), so a prompt the engine must have evicted since is not
        taken for a cache hit; ``prefix_blocks_per_replica`` at the most."""
        kv = view.kv_capacity_tokens
        if kv is None:
            return self.prefix_blocks_per_replica
        return max(1, min(self.prefix_blocks_per_replica, kv // BLOCK_TOKENS))

    def observe_cache(self, replica_id: str, delta: CacheDelta) -> bool:
        """What a replica's engine reports its prefix cache now holds (``core.kv_events``),
        for routing to read instead of its own record of what it sent there.

        Returns False when the report cannot be applied and the replica should send a full
        snapshot (``delta.cleared``) next: the scheduler does not know the replica (yet),
        or it has not had a snapshot from it (it restarted, or the replica is new).
        """
        r = self._replicas.get(replica_id)
        if r is None or not r.view.cache_events:
            return False
        if delta.cleared:
            r.prefixes.clear()
            r.cache_synced = True
        elif not r.cache_synced:
            return False
        if delta.removed:
            r.prefixes.discard_all(delta.removed)
        if delta.stored:
            r.prefixes.touch_all(delta.stored, True)
        return True

    def mark_unready(self, replica_id: str) -> None:
        """Stop routing to a replica (a call on it failed); the controller decides its fate
        and a later ``set_replicas`` may mark it ready again."""
        r = self._replicas.get(replica_id)
        if r is not None:
            r.view = replace(r.view, ready=False, starting=False)
            self._refresh(self._models[r.view.model])

    def replicas(self, model: str | None = None) -> list[ReplicaView]:
        """Replica views with the scheduler's in-flight requests and tokens filled in."""
        states = (
            self._replicas.values()
            if model is None
            else (self._models[model].replicas if model in self._models else [])
        )
        return sorted(
            (
                replace(r.view, in_flight=r.in_flight, in_flight_tokens=r.in_flight_tokens)
                for r in states
            ),
            key=lambda v: v.replica_id,
        )

    # -- requests -------------------------------------------------------------------------

    def enqueue(self, request: AcquireRequest, now: float) -> None:
        """Queue a request; ``dispatch`` grants it a lease when it is its turn and fits.

        The caller has already refused requests that exceed the context window
        (``core.requests.resolve_max_tokens``).

        Raises:
            ReplicaUnavailable: the model has no replica that is ready or starting (503).
            Overloaded: the tenant's or the model's queue is full (429), with a
                ``retry_after_s`` hint.
            ValueError: the request id is already queued or leased (a caller bug).
        """
        rid, tenant = request.request_id, request.tenant
        if rid in self._queued_in or rid in self._leases:
            raise ValueError(f"request id {rid} is already queued or leased")
        m = self._models.get(request.model)
        if m is None or not (
            m.accepting if request.version is None else _can_take_new_work(m, request.version)
        ):
            if m is not None:  # unknown model names are not counted: they would grow memory
                m.tenant_counts(tenant).refused += 1
            n = len(m.replicas) if m is not None else 0
            of_versions = (
                f" of a version with traffic ({', '.join(m.live)})"
                if m is not None and m.live
                else ""
            )
            raise ReplicaUnavailable(
                f"model {request.model!r} has no ready replica{of_versions} ({n} deployed, "
                f"none ready or starting); retry later"
            )
        tenant_limit = self._tenant_limits.get(tenant, self.max_queued_per_tenant)
        if m.queued >= self.max_queue_per_model:
            self._refuse(m, request, tenant_limit)
        deadline = math.inf if request.deadline_s is None else now + request.deadline_s
        seq = self._seq + 1
        queued: _Queued = (request, now, deadline, seq, 0)
        # The queue checks the tenant's limit as it pushes: one call, not two.
        if not m.queue.push(
            tenant,
            rid,
            queued,
            rank=_RANK[request.priority],
            deadline=deadline,
            seq=seq,
            limit=tenant_limit,
        ):
            self._refuse(m, request, tenant_limit)
        self._seq = seq
        m.queued += 1
        self._queued_in[rid] = request.model
        c = m.counts.get(tenant)  # ``m.tenant_counts``, inlined on the hot path
        if c is None:
            c = m.counts[tenant] = _Counts()
        c.admitted += 1

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request (its caller gave up). True if it was waiting."""
        model = self._queued_in.pop(request_id, None)
        if model is None:
            return False
        m = self._models[model]
        m.queue.remove(request_id)
        m.queued -= 1
        return True

    def dispatch(self, now: float) -> list[Lease]:
        """Grant leases to waiting requests, in fair order, while replicas have room.

        Per model, repeatedly: the tenant with the smallest virtual counter offers its first
        request; it goes to the best replica that can take its token cost (see
        ``routing.choose_replica``), and its prompt tokens are charged.

        Head of line: when that request fits on no replica now, the model's dispatch stops
        for this round, even if a smaller request of another tenant would fit. Letting small
        requests pass would starve a large one for as long as small ones keep coming; with
        the idle-replica rule (an idle replica takes any one request) the large one starts
        as soon as one replica drains. A request whose every ready replica is excluded (it
        failed there) does not block the others: its tenant sits out the round.
        """
        granted: list[Lease] = []
        for model, m in self._models.items():
            if m.queued:
                self._dispatch_model(model, m, now, granted)
        return granted

    def release(
        self, request_id: str, completion_tokens: int = 0, now: float | None = None
    ) -> Lease | None:
        """Return a lease after the call ended, however it ended.

        Frees the replica's slot and tokens, and charges the tenant ``output_weight *
        completion_tokens / weight``. Pass ``now`` to feed the Retry-After estimate.
        Unknown ids (already released, or never granted) give None.

        Raises:
            ValueError: ``completion_tokens`` is negative.
        """
        if completion_tokens < 0:
            raise ValueError(f"completion_tokens must not be negative, got {completion_tokens}")
        g = self._leases.pop(request_id, None)
        if g is None:
            return None
        lease = g[0]
        m = self._models[lease.model]
        self._free(m, lease)
        weight = self._weights.get(lease.tenant, 1.0)
        m.queue.finish(lease.tenant, self.output_weight * completion_tokens / weight)
        if now is not None:
            held = max(now - lease.granted_at, 0.0)
            m.hold_s += _HOLD_EWMA_ALPHA * (held - m.hold_s)
        return lease

    def prefilled(self, request_ids: Iterable[str]) -> bool:
        """The first tokens of these leases are out: their prompts no longer count against
        their replicas' prefill budgets. Whether any did (then ``dispatch`` may grant
        more). Ids not waiting for their prefill are ignored."""
        freed = False
        for rid in request_ids:
            p = self._prefilling.pop(rid, None)
            if p is None:
                continue
            r = self._replicas.get(p[0])
            if r is not None:
                r.prefill_tokens -= p[1]
                freed = True
        return freed

    def prefill_pending(self) -> tuple[int, int]:
        """Leases awaiting their first token on budgeted replicas, and the prompt tokens
        their replicas count for them: both 0 once every call has started or ended."""
        return len(self._prefilling), sum(r.prefill_tokens for r in self._replicas.values())

    def requeue(
        self, request_id: str, exclude_version: bool = False, pin_version: bool = False
    ) -> bool:
        """Put a leased request back at the head of its tenant's queue, avoiding its replica.

        For a lease whose replica died before producing any token: frees the slot and
        tokens, refunds the prompt charge, and adds the replica to the request's
        ``exclude``. Call ``mark_unready`` for the replica as well. Queue limits do not
        apply (the request was admitted already). If the tenant had nothing else queued,
        the usual lift on becoming backlogged applies after the refund. False if
        ``request_id`` holds no lease.

        With ``exclude_version``, the lease's model version is added to the request's
        ``exclude_versions`` too: for a request that failed on a canary version (its lease
        says ``canary``), so it is retried on the stable version.

        With ``pin_version``, the request runs on its lease's version only: a stream that
        goes on after its replica died mid-way, whose tokens are that version's.

        Raises:
            ReplicaUnavailable: with ``pin_version``, no other replica of the version is
                ready or starting (the lease is kept, for the caller to release).
        """
        g = self._leases.get(request_id)
        if g is None:
            return False
        lease, old, input_charge = g
        old_request, enqueued_at, deadline, seq, requeues = old
        m = self._models[lease.model]
        if pin_version and not any(
            (r.view.ready or r.view.starting)
            and r.view.version == lease.version
            and r.replica_id != lease.replica_id
            and r.replica_id not in old_request.exclude
            for r in m.replicas
        ):
            raise ReplicaUnavailable(
                f"no other replica of {lease.model} version {lease.version} is ready or "
                "starting to go on with the stream"
            )
        del self._leases[request_id]
        self._free(m, lease)
        m.queue.refund(lease.tenant, input_charge)
        request = replace(old_request, exclude=old_request.exclude | {lease.replica_id})
        if exclude_version:
            request = replace(request, exclude_versions=request.exclude_versions | {lease.version})
        if pin_version:
            request = replace(request, version=lease.version)
        queued: _Queued = (request, enqueued_at, deadline, seq, requeues + 1)
        m.queue.push(
            lease.tenant,
            request_id,
            queued,
            rank=_RANK[request.priority],
            deadline=deadline,
            seq=seq,
            front=True,
        )
        m.queued += 1
        self._queued_in[request_id] = lease.model
        counts = m.tenant_counts(lease.tenant)
        if pin_version:
            counts.migrated += 1
        else:
            counts.requeued += 1
        return True

    # -- queries --------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Models the scheduler knows (it was given replicas or preferences for them)."""
        return list(self._models)

    def queued_model(self, request_id: str) -> str | None:
        """The model a request is queued for, None if it is not queued."""
        return self._queued_in.get(request_id)

    def is_queued(self, model: str, request_id: str) -> bool:
        return self._queued_in.get(request_id) == model

    def queue_depth(self, model: str, tenant: str | None = None) -> int:
        m = self._models.get(model)
        if m is None:
            return 0
        return len(m.queue) if tenant is None else m.queue.depth(tenant)

    def in_flight(self, model: str) -> int:
        m = self._models.get(model)
        return m.in_flight if m is not None else 0

    def leases(self, model: str | None = None) -> list[Lease]:
        """The leases held now (of ``model``, or of every model), oldest grant first."""
        held = (g[0] for g in self._leases.values())
        return [x for x in held if model is None or x.model == model]

    def lease(self, request_id: str) -> Lease | None:
        """The lease a request holds, None if it holds none."""
        g = self._leases.get(request_id)
        return g[0] if g is not None else None

    def virtual_counter(self, model: str, tenant: str) -> float:
        """The tenant's virtual token counter on ``model`` (weighted tokens served)."""
        m = self._models.get(model)
        return m.queue.counter(tenant) if m is not None else 0.0

    def restore_counters(self, model: str, counters: Mapping[str, float]) -> None:
        """Set the tenants' virtual counters on ``model`` after a restart (see
        ``core.accounting``), before any of its requests is queued.

        Raises:
            ValueError: the model has requests queued or in flight.
        """
        self._model(model).queue.restore(dict(counters))

    def stats(self, now: float) -> dict[str, ModelStats]:
        """A snapshot per model for metrics export.

        O(queued requests) for the oldest waits: meant for a scrape every few seconds, not
        for every decision.
        """
        out: dict[str, ModelStats] = {}
        for model, m in self._models.items():
            q = m.queue
            tenants: dict[str, TenantStats] = {}
            queued_tokens = 0
            for tenant in sorted(set(q.tenants()) | set(m.counts)):
                c = m.counts.get(tenant, _Counts())
                items = list(q.items(tenant))
                queued_tokens += sum(x[0].prompt_tokens + x[0].max_tokens for x in items)
                oldest = min((x[1] for x in items), default=now)
                tenants[tenant] = TenantStats(
                    queue_depth=q.depth(tenant),
                    oldest_wait_s=max(float(now - oldest), 0.0),
                    in_flight=q.in_flight(tenant),
                    virtual_counter=q.counter(tenant),
                    admitted=c.admitted,
                    refused=c.refused,
                    requeued=c.requeued,
                    migrated=c.migrated,
                )
            out[model] = ModelStats(
                queue_depth=len(q),
                in_flight=m.in_flight,
                in_flight_tokens=sum(r.in_flight_tokens for r in m.replicas),
                routes=dict(m.routes),
                tenants=tenants,
                queued_tokens=queued_tokens,
                versions=dict(m.versions),
                engine_cache_blocks=sum(
                    len(r.prefixes) for r in m.replicas if r.view.cache_events and r.cache_synced
                ),
            )
        return out

    # -- internals ------------------------------------------------------------------------

    def _model(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _Model(FairQueue(self._policy))
        return m

    def _dispatch_model(self, model: str, m: _Model, now: float, granted: list[Lease]) -> None:
        q = m.queue
        # Kept in place as leases come and go (``_refresh`` replaces it only when the
        # replicas change, never during a dispatch): no scan of the replicas to learn that
        # every one of them is full, the usual state under a backlog.
        open_replicas = m.open
        sessions = self._sessions
        sitting_out: list[str] = []  # tenants whose head has no usable replica at all
        try:
            while open_replicas:
                picked = q.peek()  # nothing to undo if the request waits
                if picked is None:
                    return
                tenant, rid, queued = picked
                request = queued[0]
                cost = request.prompt_tokens + request.max_tokens
                sid = request.session_id
                # Versions the split chose between for this request; empty when there was
                # nothing to choose (no split, or one version usable), the common case.
                eligible: Sequence[str] = ()
                if (
                    request.exclude
                    or m.live
                    or request.exclude_versions
                    or request.version is not None
                ):
                    found = self._fits_filtered(m, request, cost)
                    if found is None:
                        q.select()  # checked out, so the next peek shows another tenant
                        sitting_out.append(tenant)
                        continue
                    fits, eligible = found
                else:
                    # The request may run on every ready replica, and only an open one has
                    # a slot. ``ReplicaState.fits`` for an open replica (ready, a slot free):
                    # an idle one takes any one request, else it needs room for the tokens
                    # if its KV capacity is known. (The order of ``fits`` does not matter:
                    # ``route`` breaks every tie by id.)
                    fits = []
                    prompt = request.prompt_tokens
                    for r in open_replicas.values():
                        kv = r.view.kv_capacity_tokens
                        if r.in_flight == 0 or (
                            (kv is None or r.in_flight_tokens + cost <= kv)
                            and r.prefill_fits(prompt)
                        ):
                            fits.append(r)
                if not fits:
                    return  # head of line waits for room; see ``dispatch``
                # The replica, why, and how many prompt blocks it holds; then what it now
                # holds is remembered (the prompt's blocks, the session's replica).
                if self.routing == "round_robin":
                    r, reason, blocks = self._round_robin(m, fits)
                    self._remember(model, r, request, reason, blocks)
                elif len(fits) == 1:
                    # ``route`` with one candidate, inlined: one slot freed under a backlog
                    # is the usual case. It is chosen; only the reason needs working out.
                    # Counting its blocks and remembering them is one call, as is reading
                    # the session's replica and remembering the new one.
                    r = fits[0]
                    replica_id = r.view.replica_id
                    hashes = request.prefix_hashes
                    if not hashes:
                        blocks = 0
                    elif r.view.cache_events:  # the engine reports what it holds
                        blocks = r.prefixes.count_leading_run(hashes)
                    else:
                        blocks = r.prefixes.count_and_touch_run(hashes, True)
                    if sid and sessions.swap((model, sid), replica_id) == replica_id:
                        reason = "session"
                    elif blocks > 0 and self.prefix_load_margin + LOAD_EPS >= 0.0:
                        reason = "prefix"
                    else:
                        reason = "load"
                else:
                    r, reason, blocks = route(
                        fits,
                        sessions.get((model, sid)) if sid else None,
                        request.prefix_hashes,
                        m.preferred,
                        self.prefix_load_margin,
                    )
                    self._remember(model, r, request, reason, blocks)
                charge = request.prompt_tokens / self._weights.get(tenant, 1.0)
                q.start_peeked(charge)
                m.queued -= 1
                del self._queued_in[rid]
                n = r.in_flight = r.in_flight + 1
                r.in_flight_tokens += cost
                v = r.view
                replica_id = v.replica_id
                if v.prefill_budget_tokens is not None:
                    # Blocks its engine holds already are not prefilled again.
                    prefill = max(request.prompt_tokens - blocks * BLOCK_TOKENS, 1)
                    r.prefill_tokens += prefill
                    self._prefilling[rid] = (replica_id, prefill)
                if n >= v.max_concurrency:
                    del open_replicas[replica_id]  # it fit, so it was open
                version = v.version
                if eligible and not sid:
                    _commit_wrr(m, eligible, version)  # granted: the peek becomes the pick
                lease = _new_lease(
                    rid,
                    model,
                    tenant,
                    replica_id,
                    queued[1],
                    now,
                    reason,
                    cost,
                    blocks,
                    queued[4],
                    version,
                    request.version is None and m.stable is not None and version != m.stable,
                    n,
                )
                self._leases[rid] = (lease, queued, charge)
                m.in_flight += 1
                m.routes[reason] += 1
                m.versions[version] = m.versions.get(version, 0) + 1
                granted.append(lease)
        finally:
            for tenant in sitting_out:
                q.put_back(tenant)

    def _remember(
        self, model: str, r: ReplicaState, request: AcquireRequest, reason: str, blocks: int
    ) -> None:
        """Record what a replica chosen for ``request`` now holds: the prompt's blocks (its
        first ``blocks`` are there already: routing counted them), and the session's
        replica (unless routing found the session there, which marked it used)."""
        if request.prefix_hashes and not r.view.cache_events:
            r.prefixes.touch_run(request.prefix_hashes, True, blocks)
        sid = request.session_id
        if sid and reason != "session":
            self._sessions.put((model, sid), r.view.replica_id)

    @staticmethod
    def _fits_filtered(
        m: _Model, request: AcquireRequest, cost: int
    ) -> tuple[list[ReplicaState], Sequence[str]] | None:
        """The replicas that can take a request with exclusions or versions to match now,
        and the versions a traffic split chose between for it (empty if it had no choice).

        None when no ready replica is usable at all (its tenant sits out the round). When
        the split has a choice, only the picked version's replicas are returned: if none
        of them fits now, the request waits for one rather than spilling over, so the split
        stays exact.
        """
        exclude = request.exclude
        live = m.live  # versions that take new requests; () when there is no split
        if request.version is not None:  # pinned: that version, weight or not
            live = (request.version,)
        skip_versions = request.exclude_versions
        usable: list[ReplicaState] = []
        usable_versions: set[str] = set()
        for r in m.replicas:
            v = r.view
            if not v.ready or v.replica_id in exclude:
                continue
            if live or skip_versions:
                if v.version in skip_versions or (live and v.version not in live):
                    continue
                usable_versions.add(v.version)
            usable.append(r)
        if not usable:
            return None
        fits = [r for r in usable if r.fits(cost, request.prompt_tokens)]
        if len(live) > 1 and len(usable_versions) > 1:
            eligible = [x for x in live if x in usable_versions]
            sid = request.session_id
            picked = _session_version(m, eligible, sid) if sid else _peek_wrr(m, eligible)
            return [r for r in fits if r.view.version == picked], eligible
        return fits, ()

    @staticmethod
    def _round_robin(m: _Model, fits: list[ReplicaState]) -> tuple[ReplicaState, RouteReason, int]:
        """The next replica in id order, after the last one chosen, that fits: the same
        ``(replica, reason, prefix blocks)`` as ``routing.route``."""
        n = len(m.replicas)
        for k in range(n):
            i = (m.next_rr + k) % n
            if m.replicas[i] in fits:
                m.next_rr = i + 1
                return m.replicas[i], "round_robin", 0
        m.next_rr += 1
        return fits[0], "round_robin", 0

    def _free(self, m: _Model, lease: Lease) -> None:
        """Give back a lease's slot and tokens (its replica may be gone already)."""
        m.in_flight -= 1
        r = self._replicas.get(lease.replica_id)
        prefilling = self._prefilling.pop(lease.request_id, None) if self._prefilling else None
        if r is not None:
            r.in_flight -= 1
            r.in_flight_tokens -= lease.cost_tokens
            if prefilling is not None:
                r.prefill_tokens -= prefilling[1]
            v = r.view
            if v.ready and r.in_flight < v.max_concurrency:
                # Open (again). On the replica's own model: an id removed from one model and
                # reused by another carries the old model's leases with it.
                self._models[v.model].open[v.replica_id] = r

    @staticmethod
    def _refresh(m: _Model) -> None:
        """Recount what ``_Model`` caches about its replicas, after they or the split changed."""
        m.open = {
            r.replica_id: r
            for r in m.replicas
            if r.view.ready and r.in_flight < r.view.max_concurrency
        }
        m.accepting = _can_take_new_work(m)

    def _refuse(self, m: _Model, request: AcquireRequest, tenant_limit: int) -> NoReturn:
        """Refuse a request as one of its queue limits is reached: the tenant's if that is
        full, else the model's, with a Retry-After hint.

        Raises:
            Overloaded: always.
        """
        tenant = request.tenant
        m.tenant_counts(tenant).refused += 1
        retry = self._retry_after(m)
        tenant_depth = m.queue.depth(tenant)
        if tenant_depth >= tenant_limit:
            raise Overloaded(
                f"tenant {tenant!r} has {tenant_depth} requests waiting for model "
                f"{request.model!r}, the per-tenant limit is {tenant_limit}; retry after "
                f"{retry:g}s",
                retry_after_s=retry,
            )
        raise Overloaded(
            f"model {request.model!r} has {len(m.queue)} requests waiting, the limit is "
            f"{self.max_queue_per_model}; retry after {retry:g}s",
            retry_after_s=retry,
        )

    def _retry_after(self, m: _Model) -> float:
        """Seconds until the queued work should have drained: a hint for Retry-After."""
        slots = sum(r.view.max_concurrency for r in m.replicas if r.view.ready) or 1
        estimate = len(m.queue) * m.hold_s / slots
        return round(min(max(estimate, _RETRY_AFTER_MIN_S), _RETRY_AFTER_MAX_S), 1)


def _new_lease(
    request_id: str,
    model: str,
    tenant: str,
    replica_id: str,
    enqueued_at: float,
    granted_at: float,
    route: RouteReason,
    cost_tokens: int,
    prefix_blocks: int,
    requeues: int,
    version: str,
    canary: bool,
    replica_in_flight: int,
) -> Lease:
    """``Lease(...)`` with the same fields, without the frozen dataclass's ``__init__``.

    That ``__init__`` goes through ``object.__setattr__`` once per field, which made the
    lease the costliest allocation of a decision; filling the instance dict directly gives
    an equal object (same fields in the same order: equality, hash, repr and pickling
    agree) at a quarter of the cost. Only for values already checked by the dispatcher.
    """
    lease = object.__new__(Lease)
    d = lease.__dict__
    d["request_id"] = request_id
    d["model"] = model
    d["tenant"] = tenant
    d["replica_id"] = replica_id
    d["enqueued_at"] = enqueued_at
    d["granted_at"] = granted_at
    d["route"] = route
    d["cost_tokens"] = cost_tokens
    d["prefix_blocks"] = prefix_blocks
    d["requeues"] = requeues
    d["version"] = version
    d["canary"] = canary
    d["replica_in_flight"] = replica_in_flight
    return lease


def _can_take_new_work(m: _Model, pinned: str | None = None) -> bool:
    """Whether a replica is ready or starting, of a version with traffic under a split
    (of the ``pinned`` version, if the request names one)."""
    if m.cold_start and pinned is None:
        return True
    live = m.live if pinned is None else (pinned,)
    if not live:
        return any(r.view.ready or r.view.starting for r in m.replicas)
    return any((r.view.ready or r.view.starting) and r.view.version in live for r in m.replicas)


# -- version choice under a traffic split (O(versions) each) ------------------------------


def _session_version(m: _Model, eligible: Sequence[str], session_id: str) -> str:
    """The version a session goes to: a stable hash of its id on the cumulative weights.

    blake2b, not ``hash()``: ``hash`` of a str is salted per process, and the choice must
    survive a scheduler restart so a conversation keeps its version while the split holds.
    """
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    weights = m.traffic
    threshold = point * sum(weights[v] for v in eligible)
    acc = 0.0
    for v in eligible:
        acc += weights[v]
        if threshold < acc:
            return v
    return eligible[-1]  # only reached through rounding


def _peek_wrr(m: _Model, eligible: Sequence[str]) -> str:
    """The version smooth weighted round robin (nginx's) picks next, without moving it.

    Each pick adds every eligible version's weight to its score and takes the highest
    score (ties to the first name); ``_commit_wrr`` records the pick once it is granted.
    """
    scores, weights = m.wrr, m.traffic
    best, best_score = eligible[0], -math.inf
    for v in eligible:
        score = scores.get(v, 0.0) + weights[v]
        if score > best_score:
            best, best_score = v, score
    return best


def _commit_wrr(m: _Model, eligible: Sequence[str], chosen: str) -> None:
    """Record a granted pick of ``_peek_wrr``: the winner gives back the total weight."""
    scores, weights = m.wrr, m.traffic
    total = 0.0
    for v in eligible:
        w = weights[v]
        scores[v] = scores.get(v, 0.0) + w
        total += w
    scores[chosen] -= total
