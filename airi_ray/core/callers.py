"""``CallerBook``: which caller holds which requests, and whether it is still there.

A caller is one process's call path. It queues requests and holds leases; normally it
hands each one back itself. A caller that ends or dies without doing so (a driver that
exits with a release still unsent, a killed graph executor, a replaced ingress replica)
would keep them forever: Ray never closes the stream a dead process read its grants from,
so the scheduler cannot learn it from the stream. So callers are leases in the other
sense too, as in Chubby or etcd: each is heard from at least every few seconds (any
message counts, and an idle one sends a heartbeat), and one silent for ``ttl_s`` is taken
to be gone, its requests to be taken back.

The clock is an argument; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

DEFAULT_TTL_S = 10.0


class CallerBook:
    """The requests each caller has queued or leased, and when it was last heard from.

    Args:
        ttl_s: how long a caller holding requests may stay silent before ``expired``
            names it.

    Raises:
        ValueError: ``ttl_s`` is not positive.
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._caller_of: dict[str, str] = {}  # request id -> caller
        self._requests: dict[str, set[str]] = {}  # caller -> its request ids
        self._heard: dict[str, float] = {}  # caller -> last message

    def heard(self, caller: str, now: float) -> None:
        """The caller sent something (a call, a release, a heartbeat): it is alive."""
        self._heard[caller] = now

    def add(self, caller: str, request_id: str, now: float) -> None:
        """``request_id`` is now the caller's (queued or leased); the caller is alive.

        Raises:
            ValueError: the request belongs to another caller already.
        """
        owner = self._caller_of.get(request_id)
        if owner is not None and owner != caller:
            raise ValueError(f"request {request_id} belongs to caller {owner}, not {caller}")
        self._caller_of[request_id] = caller
        self._requests.setdefault(caller, set()).add(request_id)
        self._heard[caller] = now

    def remove(self, request_id: str) -> str | None:
        """The request ended (released, cancelled, refused): returns its caller, if any."""
        caller = self._caller_of.pop(request_id, None)
        if caller is not None:
            mine = self._requests[caller]
            mine.discard(request_id)
            if not mine:
                del self._requests[caller]
        return caller

    def caller_of(self, request_id: str) -> str | None:
        return self._caller_of.get(request_id)

    def requests(self, caller: str) -> list[str]:
        """The caller's queued and leased requests, in no particular order."""
        return list(self._requests.get(caller, ()))

    def held(self) -> dict[str, int]:
        """How many requests each caller holding any has queued or leased."""
        return {caller: len(rids) for caller, rids in sorted(self._requests.items())}

    def unheld(
        self,
        caller: str,
        held: Collection[str],
        granted_at: Callable[[str], float | None],
        now: float,
    ) -> list[str]:
        """The caller's leases it no longer names as held: their release was lost.

        A live caller reports the leases it still holds (``held``) with each heartbeat.
        A lease booked under it but not in that report was handed back by a release that
        never took effect, or never reached the caller at all; either way it would hold
        its slot while the caller lives. Only leases granted more than ``ttl_s`` ago
        count, so a grant still on its way to the caller when the report was made is
        never taken. ``granted_at(request_id)`` is the lease's grant time, or None for a
        request that is queued, not leased.
        """
        mine = self._requests.get(caller, ())
        named = set(held)
        lost = []
        for rid in mine:
            at = granted_at(rid)
            if at is not None and rid not in named and now - at > self.ttl_s:
                lost.append(rid)
        return sorted(lost)

    def drop(self, caller: str) -> list[str]:
        """Forget the caller (it said goodbye, or it expired); returns its requests, which
        the scheduler must take back."""
        self._heard.pop(caller, None)
        taken = self._requests.pop(caller, set())
        for rid in taken:
            del self._caller_of[rid]
        return sorted(taken)

    def expired(self, now: float) -> list[str]:
        """Callers that hold requests and were not heard from for more than ``ttl_s``.

        Callers holding nothing are forgotten here: there is nothing to take back, and a
        caller that comes back later is heard again with its next call.
        """
        gone: list[str] = []
        for caller, last in list(self._heard.items()):
            if caller not in self._requests:
                if now - last > self.ttl_s:
                    del self._heard[caller]
            elif now - last > self.ttl_s:
                gone.append(caller)
        return gone

    def __len__(self) -> int:
        """Requests held by all callers."""
        return len(self._caller_of)
