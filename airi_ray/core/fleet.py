"""The replica fleet: what the controller knows of each replica, how many each version
wants, and what a reconcile does to make the replicas match.

A ``ReplicaRecord`` is one replica as the controller tracks it, without its actor handle
(the controller keeps handles apart). ``plan_reconcile`` compares the records with the
registry's targets (replicas wanted per version key) and returns the actions to carry
out, in order: ``Stop`` (out of service, engine shut down), ``Respec`` (same engine, newer
spec), ``Forget`` (a failed replica: drop it, free its place) and ``Start`` (up to a count,
as far as the pools have room). ``model_views`` and ``replica_table`` are the status views.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from airi_ray.core.autoscale import AutoscaleConfig, AutoscaleContext, AutoscaleState, ScaleDecision
from airi_ray.core.autoscale import policy as autoscale_policy
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.placement import Lease, Packer, ReplicaNeeds, ReplicaRequest
from airi_ray.core.registry import (
    MAX_START_FAILURES,
    Registry,
    VersionSpec,
    rollout_info,
    version_key,
)
from airi_ray.core.routing import ReplicaView


@dataclasses.dataclass
class ReplicaRecord:
    """One replica: its version's spec, its state and what its engine reported.

    Attributes:
        state: ``loading``, ``ready``, ``failed`` or ``stopping``.
        started_at: when it was started (wall clock).
        last_probe: when its health was last probed (monotonic clock).
        lease: its place in an accelerator pool, if the model is placed.
    """

    replica_id: str
    spec: VersionSpec  # of its version
    started_at: float
    state: str = "loading"
    max_model_len: int | None = None
    kv_capacity_tokens: int | None = None
    step_tokens: int | None = None  # tokens one engine step computes at most
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    probe_failures: int = 0
    last_probe: float = 0.0
    error: str | None = None
    lease: Lease | None = None

    def view(self) -> ReplicaView:
        """What the scheduler is told of it."""
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
            version=self.spec.version,
            cache_events=self.spec.prefix_cache_view == "engine",
            prefill_budget_tokens=self.prefill_budget_tokens,
        )

    @property
    def prefill_budget_tokens(self) -> int | None:
        """The spec's ``prefill_budget_tokens`` (0: none), else one engine step's worth."""
        budget = self.spec.prefill_budget_tokens
        if budget is None:
            return self.step_tokens
        return budget or None

    def record(self) -> dict[str, Any]:
        """What a restarted controller needs to adopt this replica again."""
        return {
            "key": self.spec.key,
            "state": self.state,
            "started_at": self.started_at,
            "max_model_len": self.max_model_len,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "step_tokens": self.step_tokens,
            "lease": dataclasses.asdict(self.lease) if self.lease else None,
        }


def of(records: Iterable[ReplicaRecord], key: str) -> list[ReplicaRecord]:
    """The replicas of one version (``name@version``)."""
    return [r for r in records if r.spec.key == key]


def wanted(spec: VersionSpec, desired: Mapping[str, int]) -> int:
    """Replicas ``spec`` should have: the autoscaler's count (``desired``), else the spec's."""
    a = spec.autoscale
    if a is None:
        return spec.replicas
    floor = 0 if a.scale_to_zero else a.min_replicas  # 0: starts cold
    start = min(max(spec.replicas, floor), a.max_replicas)
    return desired.get(spec.name, start)


def needs(spec: VersionSpec) -> ReplicaNeeds:
    """What one replica of a placed model asks of the pools."""
    p = spec.placement
    assert p is not None
    return ReplicaNeeds(spec.name, tuple(p.accelerator_types), p.devices, p.fraction, p.memory_gib)


def room_for(spec: VersionSpec, packer: Callable[[], Packer], most: int) -> int:
    """How many more replicas of ``spec`` the pools could host (up to ``most``), trying
    on a fresh ``packer()`` (placing changes a packer)."""
    if spec.placement is None or most <= 0:
        return max(most, 0)
    trial = [ReplicaRequest(f"trial-{i}", needs(spec)) for i in range(most)]
    return len(packer().place(trial).leases)


@dataclasses.dataclass(frozen=True)
class Scaled:
    """One model's autoscaling step: its replica count and policy state after it."""

    spec: VersionSpec
    replicas: int
    state: AutoscaleState
    decision: ScaleDecision


def plan_autoscale(
    specs: Sequence[VersionSpec],
    signals: Mapping[str, Mapping[str, Any]],
    now: float,
    desired: Mapping[str, int],
    scaling: Mapping[str, AutoscaleState],
    packer: Callable[[], Packer],
    loading: Mapping[str, int],
) -> list[Scaled]:
    """One step of the autoscaling policy for every stable version with ``autoscale``.

    Args:
        specs: the stable versions that autoscale.
        signals: per model, the scheduler's load signals.
        now: the monotonic clock, in seconds.
        desired, scaling: the counts and policy states of the previous step.
        packer: makes a packer of the pools as they stand.
        loading: per version key, its replicas still loading.
    """
    out = []
    for m in specs:
        assert m.autoscale is not None
        current = wanted(m, desired)
        config = AutoscaleConfig(**m.autoscale.model_dump())
        sig = signals.get(m.name, {})
        replicas, state, decision = autoscale_policy(
            AutoscaleContext(
                config,
                now,
                current,
                queued_tokens=sig.get("queued_tokens", 0),
                running_tokens=sig.get("running_tokens", 0),
                ttft_p99_s=sig.get("ttft_p99_s"),
                requests_in_window=sig.get("requests_in_window", 0),
                pool_free_replicas=room_for(m, packer, config.max_replicas - current),
                state=scaling.get(m.name),
                loading_replicas=loading.get(m.key, 0),
            )
        )
        out.append(Scaled(m, replicas, state, decision))
    return out


# -- reconcile --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stop:
    """Take the replica out of service and shut its engine down."""

    replica_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Respec:
    """The replica's version has a newer spec with the same engine: it keeps running."""

    replica_id: str
    spec: VersionSpec


@dataclasses.dataclass(frozen=True)
class Forget:
    """A failed (dead or hung) replica: drop it and give its place back."""

    replica_id: str


@dataclasses.dataclass(frozen=True)
class Start:
    """Start up to ``count`` replicas of ``spec``, as far as its pools have room."""

    spec: VersionSpec
    count: int


Action = Stop | Respec | Forget | Start


def plan_reconcile(
    records: Sequence[ReplicaRecord],
    targets: Mapping[str, tuple[VersionSpec, int | None]],
    models: Collection[str],
    blocked_keys: Collection[str],
) -> list[Action]:
    """What makes the replicas match the targets, in the order to do it.

    Replicas of a version no longer wanted stop, and so do those whose engine settings
    changed (they do not count as alive afterwards); failed replicas of a wanted version
    are forgotten; then each version scales down (loading replicas first, then the
    youngest ready ones) or starts what it lacks.

    Args:
        records: the replicas in service (not those already stopping).
        targets: replicas wanted per version key (``Registry.targets``); None for a
            draining version, which keeps what it has and starts nothing.
        models: the registry's models (a replica of another model left the spec).
        blocked_keys: version keys given up on after too many failed starts.
    """
    actions: list[Action] = []
    kept: list[ReplicaRecord] = []
    for r in records:
        target = targets.get(r.spec.key)
        if target is None:
            gone = r.spec.name not in models
            actions.append(
                Stop(r.replica_id, "no longer in the spec" if gone else "version retired")
            )
        elif target[0].engine_fields() != r.spec.engine_fields():
            actions.append(Stop(r.replica_id, "its engine settings changed"))
        else:
            actions.append(Respec(r.replica_id, target[0]))
            kept.append(r)
    for key, (spec, count) in targets.items():
        mine = of(kept, key)
        actions += [Forget(r.replica_id) for r in mine if r.state == "failed"]
        if count is None:
            continue
        alive = [r for r in mine if r.state in ("loading", "ready")]
        # Scaling down drops loading replicas first, then the youngest ready ones.
        alive.sort(key=lambda r: (r.state == "ready", -r.started_at), reverse=True)
        actions += [Stop(r.replica_id, "scaled down") for r in alive[count:]]
        if key in blocked_keys:
            continue  # reported in status; a new deploy resets it
        if count > len(alive):
            actions.append(Start(spec, count - len(alive)))
    return actions


def deploy_waiting(
    registry: Registry,
    records: Sequence[ReplicaRecord],
    desired: Mapping[str, int],
    pending: Mapping[str, str],
    failed_starts: Mapping[str, str | None],
    moving: Mapping[str, tuple[str, str]],
    groups: Collection[str],
) -> list[str]:
    """What a deploy still waits for: models whose stable version lacks ready replicas
    (one pending for room in its pools does not hold the deploy up: it starts when
    capacity appears), and the switches it started that have not finished (a canary once
    it has begun).

    Args:
        failed_starts: the version keys given up on, each with its last start error.
        moving: the rollouts the deploy started: model -> (candidate, strategy).
        groups: the group switches the deploy started.

    Raises:
        InvalidRequest: a model failed to start, or a rollout rolled back.
    """
    for name, entry in registry.models.items():
        key = version_key(name, entry.stable)
        if key in failed_starts:
            raise InvalidRequest(
                f"model {name!r} failed to start {MAX_START_FAILURES} times; last "
                f"error: {failed_starts[key]}"
            )
    for name, (candidate, _) in moving.items():
        found = registry.models.get(name)
        last = found.last if found is not None else None
        if last and last["candidate"] == candidate and last["outcome"] == "rolled_back":
            raise InvalidRequest(f"the rollout of {name} to {candidate}: {last['reason']}")
    waiting = []
    for name, entry in registry.models.items():
        key = version_key(name, entry.stable)
        mine = of(records, key)
        short = sum(r.state == "ready" for r in mine) < wanted(entry.specs[entry.stable], desired)
        parked = key in pending and not any(r.state == "loading" for r in mine)
        if short and not parked:
            waiting.append(name)
    for name, (candidate, strategy) in moving.items():
        ro = registry.models[name].rollout if name in registry.models else None
        if (
            ro is not None
            and ro.candidate == candidate
            and (strategy != "canary" or ro.step_index < 0)
        ):
            waiting.append(name)
    return waiting + [g for g in groups if g in registry.groups]


# -- status -----------------------------------------------------------------------------


def model_views(
    names: Sequence[str],
    registry: Registry,
    records: Sequence[ReplicaRecord],
    start_errors: Mapping[str, str],
    pending: Mapping[str, str],
    desired: Mapping[str, int],
) -> list[dict[str, Any]]:
    """Served models with what callers need (task, context window, weights source),
    their versions (state, traffic share, replicas) and rollout progress.

    Args:
        names: the deployed spec's models, in its order.
        start_errors, pending: per version key, its last start error, and why a replica
            of it could not be placed.
        desired: the autoscaler's replica counts, per model.
    """
    out = []
    for name in names:
        entry = registry.models.get(name)
        if entry is None:
            continue
        stable = entry.specs[entry.stable]
        ready = [r for r in of(records, stable.key) if r.state == "ready"]
        weights, _ = registry.traffic(name)
        versions = []
        for v, state in sorted(entry.states.items()):
            mine = of(records, version_key(name, v))
            if state == "retired" and not mine:
                continue
            versions.append(
                {
                    "version": v,
                    "state": state,
                    "source": entry.specs[v].model if v in entry.specs else stable.model,
                    "traffic": round(weights.get(v, 0.0), 4),
                    "replicas": len(mine),
                    "ready_replicas": sum(r.state == "ready" for r in mine),
                    "accelerators": dict(collections.Counter(r.view().accelerator for r in mine)),
                }
            )
        ro = entry.rollout
        group = registry.switching(name)
        out.append(
            {
                "name": name,
                "version": entry.stable,
                "task": stable.task,
                "source": stable.model,
                "tool_parser": stable.tool_parser,
                "max_model_len": next(
                    (r.max_model_len for r in ready),
                    entry.context.get(entry.stable, stable.engine.get("max_model_len")),
                ),
                "ready_replicas": len(ready),
                "replicas": wanted(stable, desired),
                "error": start_errors.get(stable.key),
                "pending": pending.get(stable.key),
                "accelerators": dict(
                    collections.Counter(r.view().accelerator for r in of(records, stable.key))
                ),
                "versions": versions,
                "rollout": (
                    rollout_info(ro)
                    if ro is not None
                    else {"group": group.group, "outcome": "running", "strategy": "group"}
                    if group is not None
                    else entry.last
                ),
            }
        )
    return out


def replica_table(records: Iterable[ReplicaRecord]) -> list[dict[str, Any]]:
    """Every replica's state and load, for status, by id."""
    return [
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
        for r in sorted(records, key=lambda r: r.replica_id)
    ]
