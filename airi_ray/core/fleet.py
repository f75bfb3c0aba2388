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
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from airi_ray.core.placement import Lease
from airi_ray.core.registry import Registry, VersionSpec, rollout_info, version_key
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
        )

    def record(self) -> dict[str, Any]:
        """What a restarted controller needs to adopt this replica again."""
        return {
            "key": self.spec.key,
            "state": self.state,
            "started_at": self.started_at,
            "max_model_len": self.max_model_len,
            "kv_capacity_tokens": self.kv_capacity_tokens,
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
