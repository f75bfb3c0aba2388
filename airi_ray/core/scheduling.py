"""First-come-first-served scheduling per model with least-loaded replica choice.

The scheduler owns leases: a request waits in its model's queue until a ready replica has
a free slot, then gets a lease naming that replica; the caller streams from the replica
itself and hands the lease back with ``release``. The scheduler decides, it never
proxies tokens. The clock is an argument everywhere, so tests need no sleeps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

from airi_ray.core.errors import Overloaded


@dataclass(frozen=True)
class ReplicaView:
    """What the scheduler knows of one replica: never an actor handle."""

    replica_id: str
    model: str
    max_concurrency: int
    accelerator: str = "CPU"
    ready: bool = True
    in_flight: int = 0

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - self.in_flight if self.ready else 0

    @property
    def load(self) -> float:
        return self.in_flight / max(self.max_concurrency, 1)


@dataclass(frozen=True)
class AcquireRequest:
    """One model call waiting for a replica."""

    request_id: str
    model: str
    tenant: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    exclude: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Lease:
    """The right to run one request on one replica until it is released."""

    request_id: str
    model: str
    tenant: str
    replica_id: str
    enqueued_at: float
    granted_at: float

    @property
    def queue_wait_s(self) -> float:
        return self.granted_at - self.enqueued_at


def least_loaded(candidates: list[ReplicaView]) -> ReplicaView | None:
    """The replica with a free slot and the lowest relative load; ties go to the lowest id."""
    free = [r for r in candidates if r.free_slots > 0]
    if not free:
        return None
    return min(free, key=lambda r: (r.load, r.replica_id))


class FcfsScheduler:
    """Per-model FIFO queues over a set of replicas, with bounded queue length.

    Args:
        max_queue_per_model: requests allowed to wait per model; one more raises
            ``Overloaded`` (backpressure instead of an unbounded queue).
    """

    def __init__(self, max_queue_per_model: int = 1024) -> None:
        if max_queue_per_model < 1:
            raise ValueError("max_queue_per_model must be at least 1")
        self.max_queue_per_model = max_queue_per_model
        self._replicas: dict[str, ReplicaView] = {}
        self._queues: dict[str, OrderedDict[str, tuple[AcquireRequest, float]]] = {}
        self._leases: dict[str, Lease] = {}

    # -- replica set -------------------------------------------------------------------

    def set_replicas(self, model: str, views: list[ReplicaView]) -> None:
        """Replace the replica set of ``model``; in-flight counts of known replicas persist."""
        for rid in [rid for rid, r in self._replicas.items() if r.model == model]:
            if rid not in {v.replica_id for v in views}:
                del self._replicas[rid]
        for v in views:
            if v.model != model:
                raise ValueError(f"replica {v.replica_id} belongs to {v.model}, not {model}")
            in_flight = sum(
                1 for lease in self._leases.values() if lease.replica_id == v.replica_id
            )
            self._replicas[v.replica_id] = replace(v, in_flight=in_flight)

    def mark_unready(self, replica_id: str) -> None:
        """Stop routing to a replica (it failed a call); the controller decides its fate."""
        if replica_id in self._replicas:
            self._replicas[replica_id] = replace(self._replicas[replica_id], ready=False)

    def replicas(self, model: str | None = None) -> list[ReplicaView]:
        return sorted(
            (r for r in self._replicas.values() if model is None or r.model == model),
            key=lambda r: r.replica_id,
        )

    # -- requests ----------------------------------------------------------------------

    def enqueue(self, request: AcquireRequest, now: float) -> None:
        """Queue a request; raises ``Overloaded`` when its model's queue is full."""
        queue = self._queues.setdefault(request.model, OrderedDict())
        if request.request_id in queue or request.request_id in self._leases:
            raise ValueError(f"request id {request.request_id} is already queued or leased")
        if len(queue) >= self.max_queue_per_model:
            raise Overloaded(
                f"model {request.model!r} has {len(queue)} requests waiting, the limit is "
                f"{self.max_queue_per_model}; retry later"
            )
        queue[request.request_id] = (request, now)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting request (its caller gave up). True if it was waiting."""
        for queue in self._queues.values():
            if queue.pop(request_id, None) is not None:
                return True
        return False

    def dispatch(self, now: float) -> list[Lease]:
        """Grant leases to waiting requests, oldest first, while replicas have free slots."""
        granted: list[Lease] = []
        for model, queue in self._queues.items():
            for request_id, (request, enqueued_at) in list(queue.items()):
                candidates = [
                    r
                    for r in self._replicas.values()
                    if r.model == model and r.replica_id not in request.exclude
                ]
                if not any(r.free_slots > 0 for r in self._replicas.values() if r.model == model):
                    break  # FCFS: nothing behind the head can go either
                choice = least_loaded(candidates)
                if choice is None:
                    continue  # only excluded replicas have room; later requests may use them
                del queue[request_id]
                self._replicas[choice.replica_id] = replace(choice, in_flight=choice.in_flight + 1)
                lease = Lease(
                    request_id, model, request.tenant, choice.replica_id, enqueued_at, now
                )
                self._leases[request_id] = lease
                granted.append(lease)
        return granted

    def release(self, request_id: str) -> Lease | None:
        """Return a lease; frees the replica slot. Unknown ids (already released) give None."""
        lease = self._leases.pop(request_id, None)
        if lease is not None and lease.replica_id in self._replicas:
            r = self._replicas[lease.replica_id]
            self._replicas[lease.replica_id] = replace(r, in_flight=max(r.in_flight - 1, 0))
        return lease

    def models(self) -> list[str]:
        """Models with a queue (some request ever waited for them)."""
        return list(self._queues)

    def is_queued(self, model: str, request_id: str) -> bool:
        return request_id in self._queues.get(model, ())

    def queue_depth(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def in_flight(self, model: str) -> int:
        return sum(1 for lease in self._leases.values() if lease.model == model)
