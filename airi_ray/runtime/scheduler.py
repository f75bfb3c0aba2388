"""``GlobalScheduler``: the actor around ``core.scheduling.Scheduler``.

It hands out leases (``acquire``), takes them back with usage (``release``, batched by
callers), puts requests whose replica died before their first token back at the head of
their tenant's queue (``requeue``), keeps the replica views the controller pushes, and owns
the runtime metrics, because every model call passes through it whatever surface it came
from. Every decision is the core's; this class only keeps futures for waiting callers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from airi_ray.config import AppSpec
from airi_ray.core.errors import AiriError, ReplicaUnavailable
from airi_ray.core.requests import Usage
from airi_ray.core.scheduling import AcquireRequest, Lease, ReplicaView, Scheduler
from airi_ray.obs.metrics import RuntimeMetrics

logger = logging.getLogger(__name__)


class GlobalScheduler:
    def __init__(self) -> None:
        self.core = Scheduler()
        self.queue_timeout_s = 60.0
        self.metrics = RuntimeMetrics(lambda: self.core.stats(time.monotonic()))
        self._waiters: dict[str, asyncio.Future[Lease]] = {}

    def configure(self, spec: dict[str, Any]) -> None:
        """Apply the app spec's scheduler, tenant and model routing settings."""
        app = AppSpec.model_validate(spec)
        s = app.scheduler
        core = self.core
        if s.policy != core.policy and not any(core.queue_depth(m) for m in core.models()):
            core.set_policy(s.policy)
        core.max_queue_per_model = s.max_queue_per_model
        core.max_queued_per_tenant = s.max_queued_per_tenant
        core.output_weight = s.output_weight
        core.prefix_load_margin = s.prefix_load_margin
        core.routing = s.routing
        core.set_tenants(
            {t.name: t.weight for t in app.tenants},
            {t.name: t.max_queued for t in app.tenants if t.max_queued is not None},
        )
        for m in app.models:
            core.set_preferred_accelerators(m.name, m.accelerators)
        self.queue_timeout_s = s.queue_timeout_s

    def acquire(self, requests: list[AcquireRequest]) -> list[Lease | AiriError | None]:
        """Queue requests (a caller's batch) and grant what fits now.

        Per request: a ``Lease`` if granted at once, an error (``Overloaded``: 429,
        ``ReplicaUnavailable``: 503) if it cannot be queued, or ``None`` if it waits: the
        caller then calls ``wait_lease``. One call per batch keeps the common case (free
        capacity) to one message.
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

    def requeue(self, request_id: str) -> Lease | None:
        """The lease's replica died before the request produced a token: queue it again.

        The request goes back to the head of its tenant's queue, avoiding that replica,
        which stops taking work until the controller replaces it. Returns a new lease if
        one is free now, else None (then ``wait_lease``).

        Raises:
            ReplicaUnavailable: the request holds no lease (it was released already).
        """
        lease = self.core.lease(request_id)
        if lease is None or not self.core.requeue(request_id):
            raise ReplicaUnavailable(f"request {request_id} holds no lease to requeue")
        self.core.mark_unready(lease.replica_id)
        self.metrics.record_requeue(lease.model, lease.tenant)
        self._waiters[request_id] = asyncio.get_running_loop().create_future()
        self._dispatch()
        future = self._waiters[request_id]
        if future.done():
            del self._waiters[request_id]
            return future.result()
        return None

    def _drop_waiting(self, request_id: str) -> str:
        """Take a request out of its queue; returns its model."""
        model = self.core.queued_model(request_id) or ""
        self.core.cancel(request_id)
        future = self._waiters.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()
        return model

    def release(self, items: list[tuple[str, dict[str, Any], bool]]) -> None:
        """Take back leases ``(request_id, usage, replica_failed)`` and charge their usage.

        A request still waiting in a queue (its caller gave up) is just dropped.
        """
        now = time.monotonic()
        for request_id, usage_dict, replica_failed in items:
            usage = Usage(**usage_dict)
            lease = self.core.release(request_id, usage.completion_tokens, now)
            if lease is None:
                self._drop_waiting(request_id)
                continue
            if replica_failed:
                self.core.mark_unready(lease.replica_id)
            self.metrics.record_call(lease, usage)
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
        self.metrics.replicas.labels(model, "starting").set(sum(1 for v in views if v.starting))
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

    def snapshot(self) -> dict[str, Any]:
        """Queue depth, leases and replica views per model, for ``airi status``."""
        stats = self.core.stats(time.monotonic())
        return {
            m: {
                "queue_depth": self.core.queue_depth(m),
                "in_flight": self.core.in_flight(m),
                "routes": stats[m].routes if m in stats else {},
                "replicas": [dataclasses.asdict(r) for r in self.core.replicas(m)],
            }
            for m in sorted(self.core.models())
        }

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def ping(self) -> bool:
        return True
