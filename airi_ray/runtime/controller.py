"""``Controller``: deploys an app spec and keeps its replicas alive.

Goal state (the spec) against actual state (replica actors) in ``_reconcile``, wrapped in
a loop that logs and never dies: it starts missing replicas, stops unwanted ones, reads
engine stats, probes health with a real one-token generation, replaces replicas that died
or hang, and pushes the replica views to the scheduler.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections import deque
from typing import Any

import ray

from airi_ray.config import AppSpec, ModelSpec, parse_spec
from airi_ray.core.autoscale import AutoscaleConfig, AutoscaleContext, AutoscaleState
from airi_ray.core.autoscale import policy as autoscale_policy
from airi_ray.core.errors import AiriError, InvalidRequest
from airi_ray.core.placement import Lease, Packer, ReplicaNeeds, ReplicaRequest
from airi_ray.core.policy import KeyRecord, KeyRing
from airi_ray.core.scheduling import ReplicaView
from airi_ray.runtime import actors
from airi_ray.runtime.pools import bundle_for, pool_nodes

logger = logging.getLogger(__name__)

_SPEC_KEY = b"airi/app_spec"  # the deployed spec, without its API keys
_KEYS_KEY = b"airi/api_keys"  # key records (salted hashes): the spec's and `airi keys`'s
LOOP_PERIOD_S = 1.0
PROBE_PERIOD_S = 10.0
MAX_PROBE_FAILURES = 2
MAX_START_FAILURES = 3
START_TIMEOUT_S = 900.0


def saved_spec() -> AppSpec | None:
    """The last deployed spec (without its keys), as the controller saved it."""
    saved = ray.experimental.internal_kv._internal_kv_get(_SPEC_KEY)
    return parse_spec(json.loads(saved), source="saved spec") if saved else None


def _needs(m: ModelSpec) -> ReplicaNeeds:
    """What one replica of a placed model asks of the pools."""
    p = m.placement
    assert p is not None
    return ReplicaNeeds(m.name, tuple(p.accelerator_types), p.devices, p.fraction, p.memory_gib)


@dataclasses.dataclass
class _Replica:
    replica_id: str
    spec: ModelSpec
    handle: Any
    state: str = "loading"  # loading | ready | failed | stopping
    max_model_len: int | None = None
    kv_capacity_tokens: int | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    probe_failures: int = 0
    last_probe: float = 0.0
    error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)
    lease: Lease | None = None  # its place in an accelerator pool, if the model is placed

    def view(self) -> ReplicaView:
        accel = self.lease.accelerator_type if self.lease is not None else None
        accel = accel or next(
            (k.split(":", 1)[1] for k in self.spec.resources if k.startswith("accelerator_type:")),
            "GPU" if self.spec.num_gpus else "CPU",
        )
        return ReplicaView(
            self.replica_id,
            self.spec.name,
            self.spec.max_concurrency,
            accel,
            ready=self.state == "ready",
            starting=self.state == "loading",
            kv_capacity_tokens=self.kv_capacity_tokens,
        )


class Controller:
    def __init__(self) -> None:
        self.spec: AppSpec | None = None
        self.replicas: dict[str, _Replica] = {}
        self.start_failures: dict[str, int] = {}
        self.start_errors: dict[str, str] = {}
        self.events: deque[str] = deque(maxlen=200)
        self.pending: dict[str, str] = {}  # model -> why a replica could not be placed
        self.desired: dict[str, int] = {}  # model -> replicas the autoscaler wants
        self._scaling: dict[str, AutoscaleState] = {}
        self.scheduler = actors.get_or_start_scheduler()
        self._loop_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        # Keys live only as salted hashes: from the spec's api_keys (replaced on each
        # deploy) and from `airi keys create` (kept until revoked).
        self._spec_keys: list[KeyRecord] = []
        self._cli_keys = KeyRing()
        self.spec = saved_spec()  # restarted after a crash: the last deployed spec
        keys = ray.experimental.internal_kv._internal_kv_get(_KEYS_KEY)
        if keys:
            data = json.loads(keys)
            self._spec_keys = [KeyRecord.from_dict(r) for r in data["spec"]]
            self._cli_keys = KeyRing(KeyRecord.from_dict(r) for r in data["cli"])

    # -- API ---------------------------------------------------------------------------

    async def deploy(self, spec: dict[str, Any], wait: bool = True) -> dict[str, Any]:
        """Make the running app match ``spec``; with ``wait``, until every replica is ready.

        Raises:
            InvalidRequest: the spec is invalid or a replica failed to start (its error).
        """
        new = parse_spec(spec)
        now = time.time()
        self._spec_keys = [
            KeyRecord.create(key, t.name, now) for t in new.tenants for key in t.api_keys
        ]
        self.spec = new.model_copy(
            update={"tenants": [t.model_copy(update={"api_keys": []}) for t in new.tenants]}
        )
        ray.experimental.internal_kv._internal_kv_put(
            _SPEC_KEY, self.spec.model_dump_json().encode()
        )
        self._save_keys()
        self.start_failures.clear()
        self.start_errors.clear()
        await self.scheduler.configure.remote(self.spec.model_dump(), self._spec_version())
        # Durable state first: the executor finds the store when it starts.
        await actors.get_or_start_context_store(self.spec.storage.resolved_uri()).ping.remote()
        actors.get_or_start_graph_executor()
        if self.spec.features:
            views = [f.model_dump() for f in self.spec.features]
            server = actors.get_or_start_feature_server(self.spec.storage.resolved_uri(), views)
            await server.configure.remote(views)
        self._event(
            f"deploy app {new.name!r}: {', '.join(m.key for m in new.models) or 'no models'}"
        )
        self._ensure_loop()
        await self._reconcile()
        if wait:
            await self._wait_ready()
        return self.status()

    def models(self) -> list[dict[str, Any]]:
        """Served models with what callers need (task, context window, weights source)."""
        if self.spec is None:
            return []
        out = []
        for m in self.spec.models:
            ready = [r for r in self.replicas.values() if r.spec == m and r.state == "ready"]
            out.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "task": m.task,
                    "source": m.model,
                    "max_model_len": next((r.max_model_len for r in ready), None),
                    "ready_replicas": len(ready),
                    "replicas": self._wanted(m),
                    "error": self.start_errors.get(m.name),
                    "pending": self.pending.get(m.name),
                    "accelerators": dict(
                        collections.Counter(
                            r.view().accelerator for r in self.replicas.values() if r.spec == m
                        )
                    ),
                }
            )
        return out

    async def auth_config(self) -> dict[str, Any]:
        """How callers authenticate: ``{"mode": "keys" | "none", "records": [...]}``, the
        key records as salted hashes (callers verify keys themselves, in constant time)."""
        if self.spec is not None:  # restarted with a saved spec: callers poll this, so the
            self._ensure_loop()  # reconcile loop comes back with the first of them
        records = [r.to_dict() for r in [*self._spec_keys, *self._cli_keys.records()]]
        mode = self.spec.ingress.auth if self.spec is not None else "keys"
        return {"mode": mode, "records": records}

    def filter_config(self) -> dict[str, Any]:
        """Each tenant's content filters (``FilterSpec`` dicts), for callers to apply."""
        tenants = self.spec.tenants if self.spec is not None else []
        return {t.name: t.filters.model_dump() for t in tenants if t.filters is not None}

    def storage_uri(self) -> str:
        """Where the app's durable state and collections live (a LanceDB URI)."""
        from airi_ray.config import StorageSpec

        return (self.spec.storage if self.spec is not None else StorageSpec()).resolved_uri()

    def graph_acl(self) -> dict[str, list[str]]:
        """The graphs each tenant may run (glob patterns; a missing tenant may run all)."""
        tenants = self.spec.tenants if self.spec is not None else []
        return {t.name: t.graphs for t in tenants if t.graphs}

    def create_key(self, tenant: str) -> dict[str, Any]:
        """Issue a key for ``tenant``; the key itself is returned once and never stored.

        Raises:
            InvalidRequest: no deployed tenant has this name.
        """
        tenants = [t.name for t in self.spec.tenants] if self.spec else []
        if tenant not in tenants:
            raise InvalidRequest(
                f"no tenant {tenant!r} in the deployed app; tenants: {', '.join(tenants) or 'none'}"
            )
        key, record = self._cli_keys.issue(tenant, time.time())
        self._save_keys()
        self._event(f"key {record.key_id} created for tenant {tenant!r}")
        return {"key": key, "key_id": record.key_id, "tenant": tenant}

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key made by ``create_key``; callers refuse it within seconds.

        Raises:
            InvalidRequest: no such key (keys listed in the spec go away by redeploying
                the spec without them).
        """
        if any(r.key_id == key_id for r in self._spec_keys):
            raise InvalidRequest(
                f"key {key_id} comes from the app spec; remove it there and deploy again"
            )
        try:
            record = self._cli_keys.revoke(key_id, time.time())
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        self._save_keys()
        self._event(f"key {key_id} revoked")
        return self._key_info(record, "cli")

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key's id, tenant, origin and dates; never a secret or a hash."""
        return [self._key_info(r, "spec") for r in self._spec_keys] + [
            self._key_info(r, "cli") for r in self._cli_keys.records()
        ]

    @staticmethod
    def _key_info(record: KeyRecord, source: str) -> dict[str, Any]:
        return {
            "key_id": record.key_id,
            "tenant": record.tenant,
            "source": source,
            "created_at": record.created_at,
            "revoked_at": record.revoked_at,
        }

    def _save_keys(self) -> None:
        data = {
            "spec": [r.to_dict() for r in self._spec_keys],
            "cli": [r.to_dict() for r in self._cli_keys.records()],
        }
        ray.experimental.internal_kv._internal_kv_put(_KEYS_KEY, json.dumps(data).encode())

    def app_spec(self) -> dict[str, Any] | None:
        return self.spec.model_dump() if self.spec else None

    def status(self) -> dict[str, Any]:
        return {
            "app": self.spec.name if self.spec else None,
            "ingress": self.spec.ingress.model_dump() if self.spec else None,
            "models": self.models(),
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "model": r.spec.key,
                    "state": r.state,
                    "accelerator": r.view().accelerator,
                    "error": r.error,
                    "running": r.stats.get("running", 0),
                    "waiting": r.stats.get("waiting", 0),
                    "kv_cache_usage": r.stats.get("kv_cache_usage", 0.0),
                }
                for r in sorted(self.replicas.values(), key=lambda r: r.replica_id)
            ],
            "events": list(self.events)[-20:],
            "pools": self._pool_reports(),
        }

    def _pool_reports(self) -> dict[str, dict[str, Any]]:
        """Capacity, use and fragmentation per accelerator pool (placed models only)."""
        if self.spec is None or not any(m.placement for m in self.spec.models):
            return {}
        reports = self._packer(ray.nodes()).reports()
        return {kind: dataclasses.asdict(rep) for kind, rep in reports.items()}

    def _packer(self, nodes: list[dict[str, Any]]) -> Packer:
        """The pools as they stand: the cluster's nodes and the leases of live replicas
        (a lease on a node that left the cluster is gone with it)."""
        capacity = pool_nodes(nodes)
        present = {n.node_id for n in capacity}
        leases = [
            r.lease
            for r in self.replicas.values()
            if r.lease is not None and r.lease.node_id in present
        ]
        return Packer(capacity, leases)

    async def shutdown(self) -> None:
        """Stop every replica and forget the spec."""
        self.spec = None
        ray.experimental.internal_kv._internal_kv_del(_SPEC_KEY)
        ray.experimental.internal_kv._internal_kv_del(_KEYS_KEY)
        if self._loop_task:
            self._loop_task.cancel()
        await asyncio.gather(*(self._stop(r, "shutdown") for r in list(self.replicas.values())))

    def ping(self) -> bool:
        return True

    # -- reconcile ---------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        while True:
            try:
                await self._check_replicas()
                await self._autoscale()
                await self._reconcile()
            except Exception:  # the loop must survive anything one iteration does
                logger.exception("controller loop iteration failed")
            await asyncio.sleep(LOOP_PERIOD_S)

    async def _reconcile(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            wanted = {m.name: m for m in (self.spec.models if self.spec else [])}
            nodes = ray.nodes() if any(m.placement for m in wanted.values()) else []
            for r in list(self.replicas.values()):
                if wanted.get(r.spec.name) != r.spec:
                    await self._stop(r, "no longer in the spec")
            for m in wanted.values():
                for r in [r for r in self.replicas.values() if r.spec == m]:
                    if r.state == "failed":  # dead or hung: its bundle goes back first
                        self.replicas.pop(r.replica_id, None)
                        self._free(r)
                mine = [r for r in self.replicas.values() if r.spec == m]
                alive = [r for r in mine if r.state in ("loading", "ready")]
                # Scaling down drops loading replicas first, then the youngest ready ones.
                alive.sort(key=lambda r: (r.state == "ready", -r.started_at), reverse=True)
                for r in alive[self._wanted(m) :]:
                    await self._stop(r, "scaled down")
                if self.start_failures.get(m.name, 0) >= MAX_START_FAILURES:
                    continue  # reported in status; a new deploy resets it
                for _ in range(self._wanted(m) - len(alive)):
                    if not self._start(m, nodes):
                        break
            await self._push_views()

    def _wanted(self, m: ModelSpec) -> int:
        """Replicas ``m`` should have: the autoscaler's count, else the spec's."""
        if m.autoscale is None:
            return m.replicas
        start = min(max(m.replicas, m.autoscale.min_replicas), m.autoscale.max_replicas)
        return self.desired.get(m.name, start)

    async def _autoscale(self) -> None:
        """One autoscaling step for every model that has ``autoscale``: the pure policy
        decides from the scheduler's signals; a change is logged, counted and acted on by
        the reconcile that follows."""
        models = [m for m in (self.spec.models if self.spec else []) if m.autoscale]
        if not models:
            return
        signals = await self.scheduler.autoscale_signals.remote()
        nodes = ray.nodes() if any(m.placement for m in models) else []
        now = time.monotonic()
        for m in models:
            assert m.autoscale is not None
            current = self._wanted(m)
            config = AutoscaleConfig(**m.autoscale.model_dump())
            sig = signals.get(m.name, {})
            replicas, self._scaling[m.name], decision = autoscale_policy(
                AutoscaleContext(
                    config,
                    now,
                    current,
                    queued_tokens=sig.get("queued_tokens", 0),
                    running_tokens=sig.get("running_tokens", 0),
                    ttft_p99_s=sig.get("ttft_p99_s"),
                    requests_in_window=sig.get("requests_in_window", 0),
                    pool_free_replicas=self._room_for(m, nodes, config.max_replicas - current),
                    state=self._scaling.get(m.name),
                    loading_replicas=sum(
                        r.spec == m and r.state == "loading" for r in self.replicas.values()
                    ),
                )
            )
            self.desired[m.name] = replicas
            if decision.direction != "hold":
                self._event(f"autoscale {m.key}: {decision.reason}")
                self.scheduler.record_scaling.remote(m.name, decision.direction, replicas)

    def _room_for(self, m: ModelSpec, nodes: list[dict[str, Any]], most: int) -> int:
        """How many more replicas of ``m`` the pools could host (up to ``most``)."""
        if m.placement is None or most <= 0:
            return max(most, 0)
        trial = [ReplicaRequest(f"trial-{i}", _needs(m)) for i in range(most)]
        return len(self._packer(nodes).place(trial).leases)

    def _start(self, m: ModelSpec, nodes: list[dict[str, Any]]) -> bool:
        """Start one replica of ``m``; False if its pools have no room (it stays pending)."""
        rid = f"{m.name}-{m.version}-{uuid.uuid4().hex[:6]}"
        lease = None
        if m.placement is not None:
            placed = self._packer(nodes).place([ReplicaRequest(rid, _needs(m))])
            if placed.pending:
                reason = placed.pending[0].reason
                if self.pending.get(m.name) != reason:
                    self._event(f"model {m.key} pending: {reason}")
                self.pending[m.name] = reason
                return False
            lease = placed.leases[0]
        self.pending.pop(m.name, None)
        r = _Replica(rid, m, None, lease=lease)
        self.replicas[rid] = r
        where = f" on {lease.accelerator_type} {lease.node_id}" if lease else ""
        self._event(f"start replica {rid}{where}")
        asyncio.get_running_loop().create_task(self._await_start(r, nodes))
        return True

    async def _await_start(self, r: _Replica, nodes: list[dict[str, Any]]) -> None:
        try:
            placement = None
            if r.lease is not None:
                bundle = bundle_for(r.lease, nodes, r.spec.num_cpus)
                pool = actors.get_or_start_pool(r.lease.accelerator_type)
                group = await pool.reserve.remote(dataclasses.asdict(r.lease), bundle)
                placement = (group, bundle)
            if r.state != "loading":
                raise RuntimeError("stopped while being placed")
            r.handle = actors.start_replica(r.replica_id, r.spec, placement)
            info = await asyncio.wait_for(r.handle.start.remote(), START_TIMEOUT_S)
        except Exception as e:
            r.state, r.error = "failed", _short_error(e)
            self.start_failures[r.spec.name] = self.start_failures.get(r.spec.name, 0) + 1
            self.start_errors[r.spec.name] = r.error
            self._event(f"replica {r.replica_id} failed to start: {r.error}")
            self._free(r)
            return
        if r.state != "loading":
            return  # stopped while loading
        r.max_model_len, r.kv_capacity_tokens = info["max_model_len"], info["kv_capacity_tokens"]
        r.state, r.last_probe = "ready", time.monotonic()
        self.start_failures.pop(r.spec.name, None)
        self._event(f"replica {r.replica_id} ready")
        await self._push_views()

    async def _stop(self, r: _Replica, why: str) -> None:
        r.state = "stopping"
        self.replicas.pop(r.replica_id, None)
        self._event(f"stop replica {r.replica_id}: {why}")
        try:
            if r.handle is not None:
                await asyncio.wait_for(r.handle.shutdown.remote(), 10)
        except Exception:
            pass
        self._free(r)

    def _free(self, r: _Replica) -> None:
        """Kill the replica's actor and give its bundle back to the pool."""
        if r.handle is not None:
            ray.kill(r.handle, no_restart=True)
        if r.lease is not None:
            actors.get_or_start_pool(r.lease.accelerator_type).release.remote(r.replica_id)

    async def _check_replicas(self) -> None:
        """Read engine stats; probe health now and then; drop dead or hung replicas."""
        now = time.monotonic()
        ready = [r for r in self.replicas.values() if r.state == "ready"]

        async def check(r: _Replica) -> None:
            try:
                r.stats = await asyncio.wait_for(r.handle.stats.remote(), 5)
                if now - r.last_probe >= PROBE_PERIOD_S:
                    await asyncio.wait_for(r.handle.probe.remote(), r.spec.probe_timeout_s + 5)
                    r.last_probe, r.probe_failures = now, 0
            except ray.exceptions.RayActorError as e:
                r.state, r.error = "failed", f"actor died: {_short_error(e)}"
                self._event(f"replica {r.replica_id} died; replacing it")
            except Exception as e:
                r.probe_failures += 1
                r.last_probe = now
                self._event(f"replica {r.replica_id} failed a health check: {_short_error(e)}")
                if r.probe_failures >= MAX_PROBE_FAILURES:
                    r.state, r.error = "failed", "failed health checks"
                    self._event(f"replica {r.replica_id} is unhealthy; replacing it")
                    ray.kill(r.handle, no_restart=True)

        await asyncio.gather(*(check(r) for r in ready))
        if any(r.state == "failed" for r in ready):
            await self._push_views()

    def _spec_version(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest() if self.spec else ""

    async def _push_views(self) -> None:
        if self.spec is not None:  # a restarted scheduler starts empty: configure it again
            version = self._spec_version()
            if await self.scheduler.needs_config.remote(version):
                await self.scheduler.configure.remote(self.spec.model_dump(), version)
        by_model: dict[str, list[_Replica]] = {}
        for r in self.replicas.values():
            if r.state in ("loading", "ready"):
                by_model.setdefault(r.spec.name, []).append(r)
        for name in {m.name for m in (self.spec.models if self.spec else [])} | set(by_model):
            rs = by_model.get(name, [])
            await self.scheduler.set_replicas.remote(
                name,
                [r.view() for r in rs],
                [r.stats | {"replica_id": r.replica_id} for r in rs if r.state == "ready"],
            )

    async def _wait_ready(self) -> None:
        while True:
            for m in self.spec.models if self.spec else []:
                if self.start_failures.get(m.name, 0) >= MAX_START_FAILURES:
                    raise InvalidRequest(
                        f"model {m.name!r} failed to start {MAX_START_FAILURES} times; last error: "
                        f"{self.start_errors.get(m.name)}"
                    )
            # A model without room in its pools does not hold the deploy up: it is reported
            # as pending (status, events) and starts when capacity appears.
            waiting = [
                m.name
                for m in (self.spec.models if self.spec else [])
                if sum(1 for r in self.replicas.values() if r.spec == m and r.state == "ready")
                < self._wanted(m)
                and not (
                    m.name in self.pending
                    and not any(
                        r.spec == m and r.state == "loading" for r in self.replicas.values()
                    )
                )
            ]
            if not waiting:
                return
            await asyncio.sleep(0.2)

    def _event(self, text: str) -> None:
        logger.info(text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def _short_error(e: BaseException) -> str:
    """The message of the original error, without Ray's traceback wrapping."""
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, AiriError):
        return e.message
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:3])}"[:600]
