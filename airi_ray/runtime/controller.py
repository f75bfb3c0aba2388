"""``Controller``: deploys an app spec, keeps its replicas alive, and moves model versions.

Goal state (the spec, the registry of versions, running rollouts) against actual state
(replica actors) in ``_reconcile``, wrapped in a loop that logs and never dies: it starts
missing replicas, stops unwanted ones, reads engine stats, probes health with a real
one-token generation, replaces replicas that died or hang, steps rollouts and the
autoscaler, drains retiring versions, and pushes replica views and the traffic split to
the scheduler.

Versions: every model serves its ``stable`` version; a rollout (``core.rollout``) adds a
candidate that loads, passes its probe, then takes traffic in canary steps or all at once
(blue-green); the version that loses drains (no new requests, in-flight ones finish) and
retires (replicas stopped, bundles freed). Models in a group switch together, in one
scheduler call. The registry, rollouts, autoscaler state and replica records are saved
in LanceDB under the app's storage URI (``data.control``); replicas are detached actors,
so a killed controller comes back to the same replicas, and serving never stops meanwhile.

The decisions are pure (``core.registry``, ``core.fleet``); the replica actors are
started, probed and stopped by ``runtime.replicas``; this actor feeds the one what it
observes and has the other carry out what was decided.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from airi_ray.config import AppSpec, ModelSpec, ObservabilitySpec, StorageSpec, parse_spec
from airi_ray.core import fleet
from airi_ray.core.autoscale import AutoscaleState
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.fleet import ReplicaRecord
from airi_ray.core.registry import (
    MAX_START_FAILURES,
    Event,
    Note,
    Registry,
    RolloutActed,
    version_key,
)
from airi_ray.core.rollout import Constraint
from airi_ray.data.control import ControlState
from airi_ray.obs.metrics import ControllerMetrics
from airi_ray.runtime import cluster_kv, launch, reembed
from airi_ray.runtime.background import spawn
from airi_ray.runtime.keys import KeyStore
from airi_ray.runtime.replicas import ReplicaSet, short_error

logger = logging.getLogger(__name__)

LOOP_PERIOD_S = 1.0


class Controller:
    def __init__(self) -> None:
        self.spec: AppSpec | None = None
        self.events: deque[str] = deque(maxlen=200)
        self.replica_set = ReplicaSet(self._event, self._persist, self._replica_ready)
        # What the loop reads most, under short names (the same objects as the set's).
        self.replicas = self.replica_set.records
        self.start_failures, self.start_errors = (
            self.replica_set.start_failures,
            self.replica_set.start_errors,
        )
        self.pending = self.replica_set.pending
        self.desired: dict[str, int] = {}  # model -> replicas the autoscaler wants
        self._scaling: dict[str, AutoscaleState] = {}
        self.registry = Registry()  # models, their versions, rollouts and group switches
        self.metrics = ControllerMetrics()
        self.scheduler = launch.get_or_start_scheduler()
        self._loop_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._control = ControlState(None)
        self._to_adopt: dict[str, dict[str, Any]] = {}  # saved replicas not yet found again
        self.jobs = reembed.Jobs(short_error)  # re-embedding jobs of embedding models
        # Keys live only as salted hashes: from the spec's api_keys (replaced on each
        # deploy) and from `airi keys create` (kept until revoked).
        self.keys = KeyStore.load()
        self.spec = cluster_kv.saved_spec()  # restarted after a crash: the last deployed spec
        if self.spec is not None:
            self._restore(self.spec.storage.resolved_uri())

    def _restore(self, uri: str) -> None:
        """Load the registry, rollouts, autoscaler state and replica records saved there."""
        self._control = ControlState(uri)
        docs = self._control.load()
        self.registry = Registry.from_dict(docs, ModelSpec.model_validate)
        scaling = docs.get("autoscale", {})
        self.desired = scaling.get("desired", {})
        self._scaling = {n: AutoscaleState(**s) for n, s in scaling.get("state", {}).items()}
        self._to_adopt = docs.get("replicas", {})
        if self.registry.models:
            self._event(
                f"restarted: {len(self.registry.models)} models, {len(self._to_adopt)} replicas "
                "to adopt from the saved control state"
            )

    def _persist(self) -> None:
        """Save what a restarted controller needs (only what changed is written)."""
        self._control.save(
            self.registry.to_dict()
            | {
                "autoscale": {
                    "desired": self.desired,
                    "state": {n: dataclasses.asdict(s) for n, s in self._scaling.items()},
                },
                "replicas": self.replica_set.saved() | self._to_adopt,
            }
        )

    # -- API ---------------------------------------------------------------------------

    async def deploy(self, spec: dict[str, Any], wait: bool = True) -> dict[str, Any]:
        """Make the running app match ``spec``; with ``wait``, until every replica is ready.

        A model whose version changes rolls out to the new version (its ``rollout``
        settings; models of one group switch together); the old version drains.

        Raises:
            InvalidRequest: the spec is invalid or a replica failed to start (its error).
            Conflict: a changed model is in the middle of a rollout, or the change would
                serve versions that a ``requires`` constraint forbids together.
        """
        new = parse_spec(spec)
        groups = {m.name: g.name for m in new.models if (g := new.group_of(m.name))}
        # Raises before anything changes.
        moves = self.registry.plan_deploy(new.models, groups, new.constraints())
        self.spec = new.model_copy(
            update={"tenants": [t.model_copy(update={"api_keys": []}) for t in new.tenants]}
        )
        cluster_kv.save_spec(self.spec)
        self.keys.set_spec_keys(
            [(key, t.name) for t in new.tenants for key in t.api_keys], time.time()
        )
        uri = self.spec.storage.resolved_uri()
        if self._control.uri != uri:
            self._control = ControlState(uri)
        self._act(self.registry.register([m.all_versions() for m in new.models], moves))
        self.start_failures.clear()
        self.start_errors.clear()
        await self.scheduler.configure.remote(self.spec.model_dump(), self._spec_version())
        # Durable state first: the executor finds the store when it starts.
        await launch.get_or_start_context_store(uri).ping.remote()
        launch.get_or_start_graph_executor()
        await launch.get_or_start_observer().configure.remote(self.spec.observability.model_dump())
        if self.spec.features:
            views = [f.model_dump() for f in self.spec.features]
            server = launch.get_or_start_feature_server(uri, views)
            await server.configure.remote(views)
        self._event(
            f"deploy app {new.name!r}: {', '.join(m.key for m in new.models) or 'no models'}"
        )
        self._ensure_loop()
        await self._reconcile()
        self._persist()
        if wait:
            await self._wait_ready()
        return self._status()

    async def rollout(
        self,
        model: str,
        version: str,
        strategy: str | None = None,
        steps: list[int] | None = None,
        together: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Start moving ``model`` to ``version`` (and ``together``'s models with it).

        One model rolls out by ``strategy`` (default: the version's ``rollout`` setting);
        several switch at once, blue-green, when every new version is ready.

        Raises:
            NotFound: the model, or the version, is unknown (the message lists the known).
            InvalidRequest: it serves that version already; bad strategy or steps.
            Conflict: a rollout of it is running, or the move would serve versions that a
                ``requires`` constraint forbids together (the message names it).
        """
        group = self.spec.group_of(model) if self.spec else None
        self._act(
            self.registry.rollout(
                model,
                version,
                strategy,
                steps,
                together,
                group.name if group else None,
                self._declared(),
            )
        )
        return await self._changed()

    async def rollback(self, model: str) -> dict[str, Any]:
        """Send ``model``'s traffic back: stop its running rollout (or its group's switch),
        or, with none running, roll back to the version it served before (blue-green).

        Raises:
            NotFound: no such model.
            InvalidRequest: nothing runs and no earlier version is known.
            Conflict: going back would break a ``requires`` constraint.
        """
        self._act(self.registry.rollback(model, self._declared(), time.time()))
        return await self._changed()

    async def models(self) -> list[dict[str, Any]]:
        """Served models with their versions and rollouts (see ``_models``)."""
        self._ensure_loop()
        return self._models()

    async def _changed(self) -> dict[str, Any]:
        """After an API call changed the registry: save it, act on it, report."""
        self._persist()
        self._ensure_loop()
        await self._reconcile()
        return self._status()

    def _models(self) -> list[dict[str, Any]]:
        """Served models with what callers need (task, context window, weights source),
        their versions (state, traffic share, replicas) and rollout progress."""
        if self.spec is None:
            return []
        return fleet.model_views(
            [m.name for m in self.spec.models],
            self.registry,
            list(self.replicas.values()),
            self.start_errors,
            self.pending,
            self.desired,
        )

    async def auth_config(self) -> dict[str, Any]:
        """How callers authenticate: ``{"mode": "keys" | "none", "records": [...]}``, the
        key records as salted hashes (callers verify keys themselves, in constant time)."""
        self._ensure_loop()
        mode = self.spec.ingress.auth if self.spec is not None else "keys"
        return {"mode": mode, "records": self.keys.records()}

    def filter_config(self) -> dict[str, Any]:
        """Each tenant's content filters (``FilterSpec`` dicts), for callers to apply."""
        tenants = self.spec.tenants if self.spec is not None else []
        return {t.name: t.filters.model_dump() for t in tenants if t.filters is not None}

    def observability(self) -> dict[str, Any]:
        """The app's ``observability`` section, for call paths and executors."""
        spec = self.spec.observability if self.spec is not None else ObservabilitySpec()
        return spec.model_dump()

    def storage_uri(self) -> str:
        """Where the app's durable state and collections live (a LanceDB URI)."""
        return (self.spec.storage if self.spec is not None else StorageSpec()).resolved_uri()

    def model_acl(self) -> dict[str, list[str]]:
        """The models each tenant may call (glob patterns; a missing tenant may call all)."""
        tenants = self.spec.tenants if self.spec is not None else []
        return {t.name: t.models for t in tenants if t.models}

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
        key, record = self.keys.issue(tenant, time.time())
        self._event(f"key {record.key_id} created for tenant {tenant!r}")
        return {"key": key, "key_id": record.key_id, "tenant": tenant}

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key made by ``create_key``; callers refuse it within seconds.

        Raises:
            InvalidRequest: no such key (keys listed in the spec go away by redeploying
                the spec without them).
        """
        info = self.keys.revoke(key_id, time.time())
        self._event(f"key {key_id} revoked")
        return info

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key's id, tenant, origin and dates; never a secret or a hash."""
        return self.keys.listing()

    def app_spec(self) -> dict[str, Any] | None:
        return self.spec.model_dump() if self.spec else None

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        return self._status()

    def _status(self) -> dict[str, Any]:
        return {
            "app": self.spec.name if self.spec else None,
            "ingress": self.spec.ingress.model_dump() if self.spec else None,
            "models": self._models(),
            "replicas": fleet.replica_table(self.replicas.values()),
            "events": list(self.events)[-20:],
            "pools": self._pool_reports(),
        }

    def _pool_reports(self) -> dict[str, dict[str, Any]]:
        """Capacity, use and fragmentation per accelerator pool (placed models only)."""
        if self.spec is None or not any(m.placement for m in self.spec.models):
            return {}
        reports = self.replica_set.packer(ray.nodes()).reports()
        return {kind: dataclasses.asdict(rep) for kind, rep in reports.items()}

    async def shutdown(self) -> None:
        """Stop every replica and forget the spec and the registry."""
        self.spec = None
        cluster_kv.delete_spec()
        cluster_kv.delete_keys()
        if self._loop_task:
            self._loop_task.cancel()
        await asyncio.gather(
            *(self.replica_set.stop_soon(r, "shutdown") for r in list(self.replicas.values()))
        )
        self.registry, self.desired, self._scaling = Registry(), {}, {}
        self._to_adopt = {}
        self._persist()

    def ping(self) -> bool:
        return True

    # -- registry and rollouts ---------------------------------------------------------

    def _declared(self) -> list[Constraint]:
        """The deployed spec's ``requires`` constraints."""
        return self.spec.constraints() if self.spec is not None else []

    def _act(self, events: list[Event]) -> None:
        """Carry out what the registry decided, in order."""
        for e in events:
            if isinstance(e, Note):
                self._event(e.text)
            elif isinstance(e, RolloutActed):
                self.scheduler.record_rollout.remote(e.model, e.action)
            else:
                self._start_job(e.kind, e.model, e.version)

    def _start_job(self, kind: str, model: str, version: str) -> None:
        if self.jobs.start(kind, model, version, self.storage_uri()):
            self._event(f"{kind} collections of {model} for version {version}: started")

    def _poll_jobs(self) -> None:
        for text in self.jobs.poll():
            self._event(text)

    def _failed_starts(self) -> dict[str, str | None]:
        """The version keys given up on, each with its last start error."""
        return {
            key: self.start_errors.get(key)
            for key, n in self.start_failures.items()
            if n >= MAX_START_FAILURES
        }

    async def _step_rollouts(self) -> None:
        """One decision for every running rollout and group switch."""
        self._poll_jobs()
        moving = [n for n, e in self.registry.models.items() if e.rollout is not None]
        stats = {n: await self.scheduler.version_stats.remote(n) for n in moving}
        ready = {r.spec.key for r in self.replicas.values() if r.state == "ready"}
        self._act(
            self.registry.step_rollouts(
                time.time(), stats, self._failed_starts(), ready, self.jobs.states
            )
        )

    async def _drain_step(self) -> None:
        """Retire draining versions once their in-flight requests finished (or timed out)."""
        now = time.time()
        if not self.registry.draining():
            return
        # The scheduler must have the splits that give draining versions no traffic before
        # their in-flight counts mean anything (calls from here are ordered).
        await self.scheduler.set_traffic.remote(self.registry.splits())
        busy: dict[str, int] = {}
        for name, entry in self.registry.models.items():
            draining = [v for v, s in entry.states.items() if s == "draining"]
            if not draining:
                continue
            load = await self.scheduler.replica_in_flight.remote(name)
            for v in draining:
                key = version_key(name, v)
                busy[key] = sum(load.get(r.replica_id, 0) for r in self._of(key))
        self._poll_jobs()
        self._act(self.registry.drain(now, busy, self.jobs.states))

    # -- reconcile ---------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        """Run the reconcile loop (after a restart, callers' first calls bring it back),
        adopting the replicas of before the restart first."""
        if self.spec is None:
            return
        if self._to_adopt:
            self._adopt()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = spawn(self._run_loop())

    async def _run_loop(self) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("check_replicas", self._check_replicas),
            ("rollouts", self._step_rollouts),
            ("drain", self._drain_step),
            ("autoscale", self._autoscale),
            ("reconcile", self._reconcile),
            ("persist", self._persist_step),
        ]
        while True:
            for name, step in steps:
                await self._run_step(name, step)
            await asyncio.sleep(LOOP_PERIOD_S)

    async def _run_step(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """One step of the loop, timed; one that fails is logged and counted, and the loop
        goes on with the next (a failing rollout step must not skip the reconcile)."""
        began = time.perf_counter()
        try:
            await step()
        except Exception:
            logger.exception("controller loop step %s failed", name)
            self.metrics.step_failures.labels(name).inc()
        finally:
            self.metrics.step_seconds.labels(name).observe(time.perf_counter() - began)

    async def _persist_step(self) -> None:
        self._persist()

    def metrics_text(self) -> bytes:
        """The controller's metrics (loop step timings and failures), Prometheus text."""
        return self.metrics.text()

    def _targets(self) -> dict[str, tuple[ModelSpec, int | None]]:
        """Replicas wanted per version key (``Registry.targets``)."""
        return self.registry.targets(self._wanted)

    async def _reconcile(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._to_adopt:
                self._adopt()
            targets = self._targets()
            nodes = ray.nodes() if any(s.placement for s, _ in targets.values()) else []
            blocked = {k for k, n in self.start_failures.items() if n >= MAX_START_FAILURES}
            plan = fleet.plan_reconcile(
                list(self.replicas.values()), targets, self.registry.models, blocked
            )
            for action in plan:
                if isinstance(action, fleet.Stop):
                    self.replica_set.stop_soon(self.replicas[action.replica_id], action.reason)
                elif isinstance(action, fleet.Respec):
                    self.replicas[action.replica_id].spec = action.spec
                elif isinstance(action, fleet.Forget):
                    self.replica_set.forget(action.replica_id)
                else:
                    for _ in range(action.count):
                        if not self.replica_set.start(action.spec, nodes):
                            break
            self._update_states(targets)
            await self._push_views()

    def _update_states(self, targets: dict[str, tuple[ModelSpec, int | None]]) -> None:
        """Versions with replicas loading are loading; with all they want ready, ready."""
        present = collections.Counter(r.spec.key for r in self.replicas.values())
        ready = collections.Counter(
            r.spec.key for r in self.replicas.values() if r.state == "ready"
        )
        self._act(self.registry.update_states(targets, present, ready))

    def _adopt(self) -> None:
        """Take back the replicas a killed controller left running (``ReplicaSet.adopt``)."""
        saved, self._to_adopt = self._to_adopt, {}

        def spec_of(key: str) -> ModelSpec | None:
            name, version = key.split("@", 1)
            entry = self.registry.models.get(name)
            return entry.specs.get(version) if entry else None

        self.replica_set.adopt(saved, spec_of)

    async def _replica_ready(self, r: ReplicaRecord) -> None:
        """A replica became ready: its version's context window is known; act on it."""
        entry = self.registry.models.get(r.spec.name)
        if entry is not None:
            entry.context[r.spec.version] = r.max_model_len
        await self._reconcile()

    def _of(self, key: str) -> list[ReplicaRecord]:
        """The replicas of one version (``name@version``)."""
        return fleet.of(self.replicas.values(), key)

    def _wanted(self, m: ModelSpec) -> int:
        """Replicas ``m`` should have: the autoscaler's count, else the spec's."""
        return fleet.wanted(m, self.desired)

    async def _autoscale(self) -> None:
        """One autoscaling step for every model whose stable version has ``autoscale``:
        the pure policy decides from the scheduler's signals; a change is logged, counted
        and acted on by the reconcile that follows."""
        models = [e.specs[e.stable] for e in self.registry.models.values()]
        models = [m for m in models if m.autoscale]
        if not models:
            return
        signals = await self.scheduler.autoscale_signals.remote()
        nodes = ray.nodes() if any(m.placement for m in models) else []
        loading = collections.Counter(
            r.spec.key for r in self.replicas.values() if r.state == "loading"
        )
        for s in fleet.plan_autoscale(
            models,
            signals,
            time.monotonic(),
            self.desired,
            self._scaling,
            lambda: self.replica_set.packer(nodes),
            loading,
        ):
            name = s.spec.name
            self.desired[name], self._scaling[name] = s.replicas, s.state
            if s.decision.direction != "hold":
                self._event(f"autoscale {s.spec.key}: {s.decision.reason}")
                self.scheduler.record_scaling.remote(name, s.decision.direction, s.replicas)

    async def _check_replicas(self) -> None:
        """Read engine stats and probe health (``ReplicaSet.check``); tell the scheduler at
        once about replicas found dead or hung."""
        if await self.replica_set.check():
            await self._push_views()

    def _spec_version(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest() if self.spec else ""

    async def _push_views(self) -> None:
        if self.spec is not None:  # a restarted scheduler starts empty: configure it again
            version = self._spec_version()
            if await self.scheduler.needs_config.remote(version):
                await self.scheduler.configure.remote(self.spec.model_dump(), version)
        # The splits of every model go in one call: a group switch is atomic there.
        await self.scheduler.set_traffic.remote(self.registry.splits())
        by_model: dict[str, list[ReplicaRecord]] = {}
        for r in self.replicas.values():
            if r.state in ("loading", "ready"):
                by_model.setdefault(r.spec.name, []).append(r)
        for name in set(self.registry.models) | set(by_model):
            rs = by_model.get(name, [])
            await self.scheduler.set_replicas.remote(
                name,
                [r.view() for r in rs],
                [r.stats | {"replica_id": r.replica_id} for r in rs if r.state == "ready"],
            )

    async def _wait_ready(self) -> None:
        """Until every model's stable version has its replicas (a model without room in
        its pools does not hold the deploy up: it is reported as pending and starts when
        capacity appears) and every switch started has finished, or a canary has begun.

        Raises:
            InvalidRequest: a model failed to start, or a rollout rolled back.
        """
        moving = {
            name: (e.rollout.candidate, e.rollout.strategy)
            for name, e in self.registry.models.items()
            if e.rollout is not None
        }
        groups = set(self.registry.groups)
        while fleet.deploy_waiting(
            self.registry,
            list(self.replicas.values()),
            self.desired,
            self.pending,
            self._failed_starts(),
            moving,
            groups,
        ):
            await asyncio.sleep(0.2)

    def _event(self, text: str) -> None:
        logger.info(text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
