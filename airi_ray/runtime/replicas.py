"""The controller's replica actors: starting, adopting, probing and stopping them.

``ReplicaSet`` holds a ``core.fleet.ReplicaRecord`` per replica and, apart, its actor
handle (the records are what the pure reconcile plan reads). A replica starts in the
background: placed on its pool's bundle if the model is placed, then started, which loads
the engine; a replica whose start fails is counted against its version (the controller
gives a version up after ``MAX_START_FAILURES``). Ready replicas are probed with a real
one-token generation now and then; a dead or hung one is marked failed, and the next
reconcile replaces it. A replica taken out of service stops in the background and keeps
its devices leased until its engine has shut down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from airi_ray.config import ModelSpec
from airi_ray.core import fleet
from airi_ray.core.errors import AiriError
from airi_ray.core.fleet import ReplicaRecord
from airi_ray.core.placement import Lease, Packer, ReplicaRequest
from airi_ray.runtime import launch
from airi_ray.runtime.background import spawn
from airi_ray.runtime.pools import bundle_for, pool_nodes

PROBE_PERIOD_S = 10.0
MAX_PROBE_FAILURES = 2
START_TIMEOUT_S = 900.0


def short_error(e: BaseException) -> str:
    """The message of the original error, without Ray's traceback wrapping."""
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, AiriError):
        return e.message
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:3])}"[:600]


class ReplicaSet:
    """Every replica the controller runs, with its handle, start failures and placement.

    Args:
        note: logs a line in the controller's event log.
        persist: saves the controller's state (a started replica is found by name again).
        ready: called when a replica became ready (the controller reconciles then).
    """

    def __init__(
        self,
        note: Callable[[str], None],
        persist: Callable[[], None],
        ready: Callable[[ReplicaRecord], Awaitable[None]],
    ) -> None:
        self.records: dict[str, ReplicaRecord] = {}  # in service: loading, ready or failed
        self.stopping: dict[str, ReplicaRecord] = {}  # taken out, their engines shutting down
        self.handles: dict[str, Any] = {}  # replica id -> actor handle, while it has one
        self.start_failures: dict[str, int] = {}  # by version key (name@version)
        self.start_errors: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # version key -> why a replica could not be placed
        self._note, self._persist, self._ready = note, persist, ready

    def saved(self) -> dict[str, dict[str, Any]]:
        """The records a restarted controller adopts (replicas with an actor, in service)."""
        return {
            r.replica_id: r.record()
            for r in self.records.values()
            if r.state in ("loading", "ready") and r.replica_id in self.handles
        }

    def packer(self, nodes: list[dict[str, Any]]) -> Packer:
        """The pools as they stand: the cluster's nodes and the leases of live replicas
        (a lease on a node that left the cluster is gone with it)."""
        capacity = pool_nodes(nodes)
        present = {n.node_id for n in capacity}
        leases = [
            r.lease
            for r in [*self.records.values(), *self.stopping.values()]
            if r.lease is not None and r.lease.node_id in present
        ]
        return Packer(capacity, leases)

    def start(self, m: ModelSpec, nodes: list[dict[str, Any]]) -> bool:
        """Start one replica of ``m``; False if its pools have no room (it stays pending)."""
        rid = f"{m.name}-{m.version}-{uuid.uuid4().hex[:6]}"
        lease = None
        if m.placement is not None:
            placed = self.packer(nodes).place([ReplicaRequest(rid, fleet.needs(m))])
            if placed.pending:
                reason = placed.pending[0].reason
                if self.pending.get(m.key) != reason:
                    self._note(f"model {m.key} pending: {reason}")
                self.pending[m.key] = reason
                return False
            lease = placed.leases[0]
        self.pending.pop(m.key, None)
        r = ReplicaRecord(rid, m, time.time(), lease=lease)
        self.records[rid] = r
        where = f" on {lease.accelerator_type} {lease.node_id}" if lease else ""
        self._note(f"start replica {rid}{where}")
        spawn(self._await_start(r, nodes))
        return True

    def adopt(
        self, saved: dict[str, dict[str, Any]], spec_of: Callable[[str], ModelSpec | None]
    ) -> None:
        """Take back the replicas a killed controller left running (they are detached):
        each is found by name and asked for its engine info again.

        Args:
            saved: the records ``saved`` gave, by replica id.
            spec_of: the registry's spec of a version key, None if it is gone.
        """
        for rid, rec in saved.items():
            spec = spec_of(rec["key"])
            lease = rec["lease"]
            lease = Lease(**lease | {"devices": tuple(lease["devices"])}) if lease else None
            try:
                if spec is None:
                    raise LookupError(f"{rec['key']} is no longer in the registry")
                handle = launch.get_actor(rid)
            except Exception as e:
                self._note(f"replica {rid} from before the restart is gone: {short_error(e)}")
                if lease is not None:
                    launch.get_or_start_pool(lease.accelerator_type).release.remote(rid)
                continue
            r = ReplicaRecord(rid, spec, rec["started_at"], lease=lease)
            self.records[rid], self.handles[rid] = r, handle
            if rec["state"] == "ready":  # it serves on: the health checks watch it as usual
                r.state, r.last_probe = "ready", time.monotonic()
                r.max_model_len, r.kv_capacity_tokens = (
                    rec["max_model_len"],
                    rec["kv_capacity_tokens"],
                )
                r.step_tokens = rec.get("step_tokens")
                self._note(f"adopted replica {rid} ({spec.key})")
            else:  # it was loading: wait for it as its starter would have
                self._note(f"adopting replica {rid} ({spec.key}), still loading")
                spawn(self._await_start(r, [], adopted=True))

    async def _await_start(
        self, r: ReplicaRecord, nodes: list[dict[str, Any]], adopted: bool = False
    ) -> None:
        key = r.spec.key
        try:
            if not adopted:
                placement = None
                if r.lease is not None:
                    bundle = bundle_for(r.lease, nodes, r.spec.num_cpus)
                    pool = launch.get_or_start_pool(r.lease.accelerator_type)
                    group = await pool.reserve.remote(dataclasses.asdict(r.lease), bundle)
                    placement = (group, bundle)
                if r.state != "loading":
                    raise RuntimeError("stopped while being placed")
                self.handles[r.replica_id] = launch.start_replica(r.replica_id, r.spec, placement)
            self._persist()  # a restarted controller finds it by name
            handle = self.handles[r.replica_id]
            info = await asyncio.wait_for(handle.start.remote(), START_TIMEOUT_S)
        except Exception as e:
            r.state, r.error = "failed", short_error(e)
            self.start_failures[key] = self.start_failures.get(key, 0) + 1
            self.start_errors[key] = r.error
            self._note(f"replica {r.replica_id} failed to start: {r.error}")
            self._free(r)
            return
        if r.state != "loading":
            return  # stopped while loading
        r.max_model_len, r.kv_capacity_tokens = info["max_model_len"], info["kv_capacity_tokens"]
        r.step_tokens = info.get("step_tokens")
        r.state, r.last_probe = "ready", time.monotonic()
        self.start_failures.pop(key, None)
        self._note(f"replica {r.replica_id} {'adopted' if adopted else 'ready'}")
        await self._ready(r)

    def stop_soon(self, r: ReplicaRecord, why: str) -> asyncio.Task[None]:
        """Take ``r`` out of service at once and stop its engine in the background (its
        devices stay leased until it has)."""
        r.state = "stopping"
        self.records.pop(r.replica_id, None)
        self.stopping[r.replica_id] = r
        self._note(f"stop replica {r.replica_id}: {why}")
        return spawn(self._stop(r))

    def forget(self, replica_id: str) -> None:
        """Drop a failed (dead or hung) replica: its bundle goes back first."""
        self._free(self.records.pop(replica_id))
        self.handles.pop(replica_id, None)

    async def _stop(self, r: ReplicaRecord) -> None:
        try:
            handle = self.handles.get(r.replica_id)
            if handle is not None:
                await asyncio.wait_for(handle.shutdown.remote(), 10)
        except Exception:
            pass
        self._free(r)
        self.stopping.pop(r.replica_id, None)
        self.handles.pop(r.replica_id, None)

    def _free(self, r: ReplicaRecord) -> None:
        """Kill the replica's actor and give its bundle back to the pool."""
        handle = self.handles.get(r.replica_id)
        if handle is not None:
            ray.kill(handle, no_restart=True)
        if r.lease is not None:
            launch.get_or_start_pool(r.lease.accelerator_type).release.remote(r.replica_id)

    async def check(self) -> bool:
        """Read engine stats; probe health now and then; mark dead or hung replicas
        failed. Whether one was."""
        now = time.monotonic()
        ready = [r for r in self.records.values() if r.state == "ready"]

        async def check(r: ReplicaRecord) -> None:
            handle = self.handles.get(r.replica_id)
            try:
                r.stats = await asyncio.wait_for(handle.stats.remote(), 5)
                if now - r.last_probe >= PROBE_PERIOD_S:
                    await asyncio.wait_for(handle.probe.remote(), r.spec.probe_timeout_s + 5)
                    r.last_probe, r.probe_failures = now, 0
            except ray.exceptions.RayActorError as e:
                r.state, r.error = "failed", f"actor died: {short_error(e)}"
                self._note(f"replica {r.replica_id} died; replacing it")
            except Exception as e:
                r.probe_failures += 1
                r.last_probe = now
                self._note(f"replica {r.replica_id} failed a health check: {short_error(e)}")
                if r.probe_failures >= MAX_PROBE_FAILURES:
                    r.state, r.error = "failed", "failed health checks"
                    self._note(f"replica {r.replica_id} is unhealthy; replacing it")
                    ray.kill(handle, no_restart=True)

        await asyncio.gather(*(check(r) for r in ready))
        return any(r.state == "failed" for r in ready)
