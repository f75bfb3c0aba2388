"""``GlobalScheduler``: the actor around ``core.scheduling.FcfsScheduler``.

It hands out leases (``acquire``), takes them back with usage (``release``, batched by
callers), keeps the replica views the controller pushes, and owns the runtime metrics,
because every model call passes through it whatever surface it came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from airi_ray.core.errors import AiriError, ReplicaUnavailable
from airi_ray.core.requests import Usage
from airi_ray.core.scheduling import AcquireRequest, FcfsScheduler, Lease, ReplicaView
from airi_ray.obs.metrics import RuntimeMetrics

logger = logging.getLogger(__name__)


class GlobalScheduler:
    def __init__(self, max_queue_per_model: int = 1024, queue_timeout_s: float = 60.0) -> None:
        self.core = FcfsScheduler(max_queue_per_model)
        self.queue_timeout_s = queue_timeout_s
        self.metrics = RuntimeMetrics()
        self._waiters: dict[str, asyncio.Future[Lease]] = {}

    def configure(self, max_queue_per_model: int, queue_timeout_s: float) -> None:
        self.core.max_queue_per_model = max_queue_per_model
        self.queue_timeout_s = queue_timeout_s

    def acquire(self, requests: list[AcquireRequest]) -> list[Lease | AiriError | None]:
        """Queue requests (a caller's batch) and grant what fits now.

        Per request: a ``Lease`` if granted at once, an error (e.g. ``Overloaded``) if it
        cannot be queued, or ``None`` if it waits: the caller then calls ``wait_lease``.
        One call per batch keeps the common case (free capacity) to one message.
        """
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        results: list[Lease | AiriError | None] = []
        for request in requests:
            try:
                self.core.enqueue(request, now)
            except AiriError as e:
                results.append(e)
                continue
            self._waiters[request.request_id] = loop.create_future()
            results.append(None)
        self._dispatch()
        for i, request in enumerate(requests):
            future = self._waiters.get(request.request_id)
            if results[i] is None and future is not None and future.done():
                results[i] = future.result()
                del self._waiters[request.request_id]
        for model in {r.model for r in requests}:
            self._update_gauges(model)
        return results

    async def wait_lease(self, request_id: str) -> Lease:
        """Wait for a queued request's lease.

        Raises:
            ReplicaUnavailable: no replica became free within the queue timeout, or the
                request is not queued (it was released or cancelled).
        """
        future = self._waiters.get(request_id)
        if future is None:
            raise ReplicaUnavailable(f"request {request_id} is not waiting for a replica")
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.queue_timeout_s)
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # granted at the last moment
            model = self._drop_waiting(request_id)
            ready = sum(1 for r in self.core.replicas(model) if r.ready)
            raise ReplicaUnavailable(
                f"no replica of model {model!r} became free within {self.queue_timeout_s:g}s "
                f"({ready} ready replicas); retry later"
            ) from None
        finally:
            self._waiters.pop(request_id, None)

    def _drop_waiting(self, request_id: str) -> str:
        """Take a request out of its queue; returns its model."""
        model = next((m for m in self.core.models() if self.core.is_queued(m, request_id)), "")
        self.core.cancel(request_id)
        future = self._waiters.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()
        if model:
            self._update_gauges(model)
        return model

    def release(self, items: list[tuple[str, dict[str, Any], bool]]) -> None:
        """Take back leases ``(request_id, usage, replica_failed)`` and charge their usage.

        A request still waiting in a queue (its caller gave up) is just dropped.
        """
        for request_id, usage_dict, replica_failed in items:
            lease = self.core.release(request_id)
            if lease is None:
                self._drop_waiting(request_id)
                continue
            if replica_failed:
                self.core.mark_unready(lease.replica_id)
            self.metrics.record_call(
                lease.model, lease.tenant, Usage(**usage_dict), lease.queue_wait_s
            )
            self._update_gauges(lease.model)
        self._dispatch()

    def set_replicas(
        self, model: str, views: list[ReplicaView], stats: list[dict[str, Any]]
    ) -> None:
        """The controller's current view of a model's replicas and their engine stats."""
        self.core.set_replicas(model, views)
        engines = self.metrics.engines.replicas
        for rid in [rid for rid, s in engines.items() if s["model"] == model]:
            del engines[rid]
        for s in stats:
            engines[s["replica_id"]] = {**s, "model": model}
        ready = sum(1 for v in views if v.ready)
        self.metrics.replicas.labels(model, "ready").set(ready)
        self.metrics.replicas.labels(model, "unready").set(len(views) - ready)
        self._dispatch()

    def _dispatch(self) -> None:
        orphaned = True
        while orphaned:  # a slot freed from an abandoned grant may serve the next request
            orphaned = False
            for lease in self.core.dispatch(time.monotonic()):
                future = self._waiters.get(lease.request_id)
                if future is None or future.done():
                    self.core.release(lease.request_id)  # nobody waits for it any more
                    orphaned = True
                else:
                    future.set_result(lease)

    def _update_gauges(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(self.core.queue_depth(model))
        self.metrics.in_flight.labels(model).set(self.core.in_flight(model))

    def snapshot(self) -> dict[str, Any]:
        """Queue depth, leases and replica views per model, for ``airi status``."""
        models = sorted({r.model for r in self.core.replicas()})
        return {
            m: {
                "queue_depth": self.core.queue_depth(m),
                "in_flight": self.core.in_flight(m),
                "replicas": [dataclasses.asdict(r) for r in self.core.replicas(m)],
            }
            for m in models
        }

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def ping(self) -> bool:
        return True
