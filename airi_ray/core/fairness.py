"""One model's fair queue: a queue per tenant, served by Virtual Token Counters (or FCFS).

Virtual Token Counters (Sheng et al., "Fairness in Serving Large Language Models", OSDI
2024): each tenant has a counter of the weighted tokens it was served; the next request
comes from the backlogged tenant with the smallest counter. A tenant whose queue goes from
empty to non-empty is lifted to the smallest counter among the backlogged tenants (or, if
none, among tenants with work in flight), so a tenant cannot bank idle time and then
starve the others. The caller decides what a token costs (input 1, output ``w``, divided
by the tenant's weight) and passes amounts to ``charge``; this module only keeps order.

Within a tenant, requests go by priority rank, then earliest deadline, then arrival. A
requeued request (its replica died before producing a token) goes first in its tenant.

Under ``policy="fcfs"`` the same structure serves requests in global arrival order
(priority and deadline ignored) and counters are a plain tally of service (no lift): the
baseline the fairness benchmark compares against.

Both levels are binary heaps with lazy deletion, so choosing the next request costs
O(log tenants + log queued), never a scan of the queue:
- the selection heap holds ``(counter, head rank, head deadline, head seq, version,
  tenant)``; a tenant's entry is valid only while its ``version`` matches, and then its
  head is the tenant's head. A new head, or a counter that went down, pushes a fresh
  entry. A counter that went up (the common case: a charge) pushes nothing: the entry's
  counter is then a lower bound, which ``peek`` re-keys in place once it reaches the top.
  So a tenant has one entry in the steady state, not one per change, and starting its
  head re-keys that entry in place (one ``heapreplace``);
- a tenant heap holds ``(rank, deadline, seq, request_id, item)``, the very tuple its
  queued entry keeps, so a heap entry is live while it is that request's tuple; its top is
  kept clean, so the tenant's head is read from it without a search. Every queued request
  has its one entry there, so the heap holds stale entries only when it is longer than the
  tenant's depth; without cancels, the top is never checked. (A request's ``seq`` is
  unique, and its key leaves the heap when it starts, before a requeue pushes it again
  with that seq: comparisons never reach the request id or the item.)
Stale entries are dropped when they reach the top, and each heap is compacted once stale
entries outnumber live ones, so memory stays proportional to what is queued.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Policy = Literal["vtc", "fcfs"]
POLICIES: tuple[Policy, ...] = ("vtc", "fcfs")

T = TypeVar("T")

# (rank, deadline, seq, request_id, item): how requests of one tenant are ordered, and the
# item. The same tuple object sits in the tenant's heap and in the request's entry, which
# tells a live heap entry from a stale one by identity.
ItemKey = tuple[int, float, int, str, T]
_FRONT_RANK = -1  # before every priority class: requeued requests
_COMPACT_SLACK = 64  # stale entries tolerated before compaction is considered


@dataclass(slots=True)
class _Tenant(Generic[T]):
    name: str
    counter: float = 0.0
    heap: list[ItemKey[T]] = field(default_factory=list)  # its top is the head, when queued
    depth: int = 0  # live queued requests
    in_flight: int = 0  # started, not yet finished or refunded
    version: int = 0  # the selection-heap entry carrying this version is the valid one
    checked_out: bool = False  # taken by ``select`` and not yet given back


# A queued request's entry: ``(tenant, key)``. A plain tuple rather than a class: one is
# built per request on the scheduler's hot path, where an ``__init__`` is a Python call.
_Entry = tuple[_Tenant[T], ItemKey[T]]
# A tenant's place in the selection: ``(counter, rank, deadline, seq, version, tenant)``,
# the middle three from its head's key. Entries of two tenants differ by ``seq`` (unique
# per request), and two of one tenant (a request requeued keeps its seq) by version, so
# the tenant's record is never compared.
_Selection = tuple[float, int, float, int, int, "_Tenant[T]"]


class FairQueue(Generic[T]):
    """The queues of one model's tenants, in VTC (or FCFS) order.

    Protocol of the dispatcher: ``select`` checks the next tenant out, ``head`` shows its
    first request; then either ``start`` (the request got a replica) or ``put_back`` (it
    did not) returns the tenant to the selection. The shorter form, for the tenant served
    next: ``peek`` shows it and its first request without checking it out, then
    ``start_peeked`` starts that request, or nothing is needed if it waits.
    ``finish`` and ``refund`` close a started request. Items are opaque to this class.
    """

    def __init__(self, policy: Policy = "vtc") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.policy: Policy = policy
        self._tenants: dict[str, _Tenant[T]] = {}
        self._entries: dict[str, _Entry[T]] = {}
        self._select: list[_Selection[T]] = []
        self._peeked: _Selection[T] | None = None  # the top ``peek`` showed
        self._backlogged = 0  # tenants with depth > 0
        self._active: dict[str, _Tenant[T]] = {}  # tenants with in_flight > 0

    # -- queries --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def get(self, request_id: str) -> T | None:
        entry = self._entries.get(request_id)
        return entry[1][4] if entry is not None else None

    def depth(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.depth if t is not None else 0

    def in_flight(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.in_flight if t is not None else 0

    def counter(self, tenant: str) -> float:
        t = self._tenants.get(tenant)
        return t.counter if t is not None else 0.0

    def tenants(self) -> list[str]:
        """Every tenant ever seen by this queue (bounded by the configured tenants)."""
        return list(self._tenants)

    def items(self, tenant: str) -> Iterator[T]:
        """The queued items of ``tenant``, in no particular order (O(depth): for metrics)."""
        t = self._tenants.get(tenant)
        if t is None:
            return
        for key in t.heap:
            entry = self._entries.get(key[3])
            # ``entry[1] is key``: a stale key (cancelled) may share its request id with
            # the live one of a request queued again.
            if entry is not None and entry[1] is key:
                yield key[4]

    # -- queueing -------------------------------------------------------------------------

    def push(
        self,
        tenant: str,
        request_id: str,
        item: T,
        *,
        rank: int,
        deadline: float,
        seq: int,
        front: bool = False,
        limit: int | None = None,
    ) -> bool:
        """Queue ``item``; ``front`` puts it before everything else of its tenant (requeue).

        Args:
            rank: priority class, lower first (ignored under FCFS).
            deadline: absolute deadline, ``inf`` for none (ignored under FCFS).
            seq: arrival number, unique per request; a requeue passes the original one.
            limit: queue nothing and return False if the tenant has this many queued.

        Returns:
            True: it is queued.
        """
        assert request_id not in self._entries, f"{request_id} is already queued"
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant(tenant)
        elif limit is not None and t.depth >= limit:
            return False
        if self.policy == "fcfs":
            rank, deadline = 0, 0.0
        key: ItemKey[T] = (_FRONT_RANK if front else rank, deadline, seq, request_id, item)
        self._entries[request_id] = (t, key)
        heap = t.heap
        heapq.heappush(heap, key)
        t.depth += 1
        if t.depth == 1:
            self._backlogged += 1
            if self.policy == "vtc":
                self._lift(t)
            self._push_select(t)
        elif heap[0] is key:  # a new head: the tenant's place in the selection changes
            self._push_select(t)
        return True

    def remove(self, request_id: str) -> T | None:
        """Take a queued request out (cancel); None if it is not queued."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        t, key = entry
        t.depth -= 1
        if t.depth == 0:
            self._backlogged -= 1
            t.version += 1  # its selection entry is void
            t.heap.clear()  # every remaining entry is stale
        else:
            if t.heap[0] is key:  # the head went: clean the top, move in the selection
                self._clean_head(t)
                self._push_select(t)
            self._maybe_compact_tenant(t)
        return key[4]

    # -- dispatch protocol ----------------------------------------------------------------

    def select(self) -> str | None:
        """Check out the backlogged tenant to serve next (smallest counter), or None."""
        picked = self.peek()
        if picked is None:
            return None
        # Its entry is on top: out with it (``put_back`` or ``start`` pushes a new one).
        t = heapq.heappop(self._select)[5]
        t.checked_out = True
        return t.name

    def peek(self) -> tuple[str, str, T] | None:
        """The backlogged tenant to serve next (smallest counter) and its first request, as
        ``(tenant, request_id, item)``, without checking it out; None if none is waiting.

        ``start_peeked`` starts that request; if it waits instead, nothing needs undoing.
        """
        heap = self._select
        vtc = self.policy == "vtc"
        while heap:
            top = heap[0]
            t = top[5]
            # Only the entry of the latest version is live: every push bumps the version,
            # emptying a tenant bumps it, and a checked-out tenant's entry was popped.
            if top[4] != t.version:
                heapq.heappop(heap)  # stale
            elif vtc and top[0] != t.counter:
                # Charged since it was pushed: its key only went up. Re-key it in place; it
                # is served once its true key is the smallest.
                heapq.heapreplace(heap, (t.counter, *top[1:]))
            else:
                self._peeked = top
                head = t.heap[0]  # a live entry's tenant is queued: its top is its head
                return t.name, head[3], head[4]
        return None

    def head(self, tenant: str) -> tuple[str, T]:
        """The first queued request of a (backlogged) tenant: ``(request_id, item)``."""
        t = self._tenants[tenant]
        assert t.depth > 0, f"tenant {tenant} has no queued request"
        head = t.heap[0]
        return head[3], head[4]

    def put_back(self, tenant: str) -> None:
        """Return a checked-out tenant to the selection unchanged."""
        t = self._tenants[tenant]
        t.checked_out = False
        self._push_select(t)

    def start(self, tenant: str, charge: float) -> tuple[str, T]:
        """Dequeue a checked-out tenant's head (it got a replica) and charge ``charge``.

        Returns ``(request_id, item)``; the tenant goes back to the selection if it still
        has requests.
        """
        t = self._tenants[tenant]
        key = self._dequeue_head(t, charge)
        t.checked_out = False
        self._push_select(t)
        return key[3], key[4]

    def start_peeked(self, charge: float) -> None:
        """``start`` for the request ``peek`` just showed (nothing changed the queue since):
        dequeue it and charge ``charge``. Its tenant's selection entry is re-keyed in place
        (or dropped, if it has nothing else queued)."""
        heap = self._select
        top = heap[0]
        assert top is self._peeked, "start_peeked must follow peek, with no change between"
        t = top[5]
        # ``_dequeue_head``, inlined: this is the dispatcher's path.
        tenant_heap = t.heap
        key = heapq.heappop(tenant_heap)
        del self._entries[key[3]]
        t.in_flight += 1
        self._active[t.name] = t
        counter = t.counter = t.counter + charge
        depth = t.depth = t.depth - 1
        if depth == 0:
            self._backlogged -= 1
            tenant_heap.clear()  # whatever is left is stale
            heapq.heappop(heap)
            t.version += 1  # as ``_push_select`` would: no entry of it is live
        else:
            if len(tenant_heap) > depth:  # some are stale (cancelled): one may be on top
                self._clean_head(t)
            # The same version: this stays its one live entry.
            rank, deadline, seq = tenant_heap[0][:3]
            counter = counter if self.policy == "vtc" else 0.0
            heapq.heapreplace(heap, (counter, rank, deadline, seq, top[4], t))

    def finish(self, tenant: str, charge: float) -> None:
        """A started request ended: charge its output (``charge`` >= 0)."""
        t = self._tenants[tenant]
        self._end(t)
        # A counter that goes up needs no new selection entry: the one in the heap (if the
        # tenant is queued) becomes a lower bound, which ``select`` corrects at the top.
        t.counter += charge

    def refund(self, tenant: str, charge: float) -> None:
        """A started request is given back unserved: take back what ``start`` charged.

        The only way a counter decreases; call it before re-queueing the request.
        """
        t = self._tenants[tenant]
        self._end(t)
        if charge:
            t.counter -= charge
            self._push_select(t)

    def restore(self, counters: dict[str, float]) -> None:
        """Set tenants' counters (a restarted scheduler's, see ``core.accounting``); only
        before anything is queued or in flight, whose order keys depend on them.

        Raises:
            ValueError: requests are queued or in flight, or a counter is not finite.
        """
        if self._entries or self._active:
            raise ValueError(
                f"cannot restore counters with {len(self._entries)} requests queued and "
                f"{len(self._active)} tenants in flight"
            )
        for tenant, counter in counters.items():
            if not math.isfinite(counter):
                raise ValueError(f"tenant {tenant!r}: a counter must be finite, got {counter}")
            t = self._tenants.get(tenant)
            if t is None:
                t = self._tenants[tenant] = _Tenant(tenant)
            t.counter = counter

    # -- internals ------------------------------------------------------------------------

    def _dequeue_head(self, t: _Tenant[T], charge: float) -> ItemKey[T]:
        """Take a tenant's head off its heap (it started) and charge ``charge``; the
        caller fixes the tenant's selection entry. (Inlined in ``start_peeked``.)"""
        assert t.depth > 0, f"tenant {t.name} has no queued request"
        heap = t.heap
        key = heapq.heappop(heap)
        del self._entries[key[3]]
        t.in_flight += 1
        self._active[t.name] = t
        t.counter += charge
        depth = t.depth = t.depth - 1
        if depth == 0:
            self._backlogged -= 1
            heap.clear()  # whatever is left is stale
        elif len(heap) > depth:  # some entries are stale (cancelled): one may be on top
            self._clean_head(t)
        return key

    def _end(self, t: _Tenant[T]) -> None:
        assert t.in_flight > 0, f"tenant {t.name} has nothing in flight"
        t.in_flight -= 1
        if t.in_flight == 0:
            del self._active[t.name]

    def _lift(self, t: _Tenant[T]) -> None:
        """A tenant just became backlogged: no credit for the time it was idle.

        Lifted to the smallest counter among the other backlogged tenants; if none is
        backlogged, among the other tenants with work in flight; else it keeps its own.
        """
        floor = self._min_backlogged_counter()
        if floor is None:
            others = [a.counter for a in self._active.values() if a is not t]
            floor = min(others) if others else None
        if floor is not None and floor > t.counter:
            t.counter = floor

    def _min_backlogged_counter(self) -> float | None:
        """The top of the selection heap (popping stale entries, re-keying lower bounds),
        i.e. the smallest counter.

        Called from ``push`` only, when no tenant is checked out, so every backlogged tenant
        has its valid entry in the heap (the one being pushed has none yet).
        """
        heap = self._select
        while heap:
            top = heap[0]
            t = top[5]
            if top[4] != t.version:  # stale (see ``peek``)
                heapq.heappop(heap)
            elif top[0] != t.counter:
                heapq.heapreplace(heap, (t.counter, *top[1:]))
            else:
                return top[0]
        return None

    def _push_select(self, t: _Tenant[T]) -> None:
        """(Re)insert a tenant in the selection heap under its current counter and head."""
        t.version += 1
        if t.depth == 0 or t.checked_out:
            return
        counter = t.counter if self.policy == "vtc" else 0.0
        rank, deadline, seq = t.heap[0][:3]
        heapq.heappush(self._select, (counter, rank, deadline, seq, t.version, t))
        if len(self._select) > 2 * self._backlogged + _COMPACT_SLACK:
            self._select = [e for e in self._select if e[4] == e[5].version and e[5].depth > 0]
            heapq.heapify(self._select)

    def _clean_head(self, t: _Tenant[T]) -> None:
        """Drop stale entries off the top of a queued tenant's heap, so its top is the head."""
        heap = t.heap
        entries = self._entries
        while (x := entries.get(heap[0][3])) is None or x[1] is not heap[0]:
            heapq.heappop(heap)

    def _maybe_compact_tenant(self, t: _Tenant[T]) -> None:
        if len(t.heap) > 2 * t.depth + _COMPACT_SLACK:
            entries = self._entries
            t.heap = [e for e in t.heap if (x := entries.get(e[3])) is not None and x[1] is e]
            heapq.heapify(t.heap)
