"""The model registry and its rollout decisions: which versions each model has, which one
serves, and how traffic moves between them.

A ``Model`` holds one model's versions (their specs and lifecycle states), its stable
version, the versions it served before (for rollback), its running rollout and the outcome
of the last one. A ``Registry`` holds every model and the running group switches; its API
methods (``rollout``, ``rollback``, ``register``) check a request and change the registry,
and its steps (``step_rollouts``, ``drain``) take one decision for every model. Each
returns the ``Event``s the controller carries out: ``Note`` (a line for the event log),
``RolloutActed`` (a decision to count) and ``StartJob`` (a re-embedding job to start if it
never ran). Single rollouts and group switches promote through the same ``promote``.

Everything the controller observes comes in as data: the clock, the versions' request
stats, which versions failed to start, which have a ready replica, the re-embedding jobs'
states and the requests each draining version still holds. Specs are typed by the
``VersionSpec`` protocol (the config's ``ModelSpec`` fits it), so the core needs no config.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
from airi_ray.core.rollout import (
    Constraint,
    GroupMember,
    GroupSwitch,
    IncompatibleRollout,
    ModelVersion,
    Rollout,
    RolloutDecision,
    RolloutError,
    RolloutLimits,
    State,
    Strategy,
    VersionStats,
    plan_group_switch,
    plan_rollout,
)

MAX_START_FAILURES = 3  # a version that failed to start this often is given up on


def version_key(name: str, version: str) -> str:
    """The key of one model version, ``name@version`` (as ``ModelSpec.key``)."""
    return f"{name}@{version}"


class RolloutSettings(Protocol):
    """How a version rolls out and drains (the config's ``RolloutSpec``)."""

    @property
    def strategy(self) -> str: ...
    @property
    def steps(self) -> Sequence[int]: ...
    @property
    def max_error_rate_delta(self) -> float: ...
    @property
    def max_ttft_p99_ratio(self) -> float: ...
    @property
    def min_requests_per_step(self) -> int: ...
    @property
    def step_hold_s(self) -> float: ...
    @property
    def drain_timeout_s(self) -> float: ...
    @property
    def keep_warm_s(self) -> float: ...


class AutoscaleSettings(Protocol):
    """A version's replica bounds under the autoscaler (the config's ``AutoscaleSpec``)."""

    @property
    def min_replicas(self) -> int: ...
    @property
    def max_replicas(self) -> int: ...
    @property
    def scale_to_zero(self) -> bool: ...
    def model_dump(self) -> dict[str, Any]: ...


class PlacementSettings(Protocol):
    """Where a version's replicas may go (the config's ``PlacementSpec``)."""

    @property
    def accelerator_types(self) -> Sequence[str]: ...
    @property
    def devices(self) -> int: ...
    @property
    def fraction(self) -> float: ...
    @property
    def memory_gib(self) -> float: ...


class VersionSpec(Protocol):
    """What the core reads of one model version's spec (the config's ``ModelSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def requires(self) -> Mapping[str, str]: ...
    @property
    def rollout(self) -> RolloutSettings: ...
    @property
    def model(self) -> str: ...
    @property
    def tool_parser(self) -> str | None: ...
    @property
    def engine(self) -> Mapping[str, Any]: ...
    @property
    def replicas(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def num_gpus(self) -> float: ...
    @property
    def resources(self) -> Mapping[str, float]: ...
    @property
    def autoscale(self) -> AutoscaleSettings | None: ...
    @property
    def placement(self) -> PlacementSettings | None: ...
    @property
    def prefix_cache_view(self) -> str: ...
    @property
    def prefill_budget_tokens(self) -> int | None: ...
    def engine_fields(self) -> dict[str, Any]: ...
    def model_dump(self) -> dict[str, Any]: ...


# -- events -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Note:
    """A line for the controller's event log."""

    text: str


@dataclasses.dataclass(frozen=True)
class RolloutActed:
    """A rollout decision that changed something (``advance``, ``promote``, ``rollback``)."""

    model: str
    action: str


@dataclasses.dataclass(frozen=True)
class StartJob:
    """Start the re-embedding job ``kind`` (``prepare`` or ``activate``) of a version,
    unless it ran already."""

    kind: str
    model: str
    version: str


Event = Note | RolloutActed | StartJob


class JobState(enum.Enum):
    """Where a re-embedding job is: never started, running, finished or failed."""

    NONE = "none"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Job:
    """A re-embedding job's state, and why it failed if it did."""

    state: JobState = JobState.NONE
    error: str = ""


JobKey = tuple[str, str, str]  # (kind, model, version)
Moves = tuple[dict[str, Rollout], list[GroupSwitch]]  # what a deploy starts


def rollout_info(ro: Rollout) -> dict[str, Any]:
    """A rollout's progress, for status."""
    return {
        "stable": ro.stable,
        "candidate": ro.candidate,
        "strategy": ro.strategy,
        "steps": list(ro.steps),
        "candidate_percent": ro.candidate_percent,
        "outcome": ro.outcome,
        "reason": ro.reason,
    }


@dataclasses.dataclass
class Model:
    """One model in the registry: its versions, which one serves, and how it is moving.

    Attributes:
        stable: the version that takes traffic (all of it, outside a rollout).
        specs: every version known, by label (declared in a spec or deployed).
        states: the lifecycle state of each version that ran (``core.rollout.State``).
        history: versions that served before ``stable``, oldest first (for rollback).
        rollout: the running rollout to a candidate, if any.
        last: the outcome of the last finished rollout, for status.
        drain_started: when each draining version began draining (wall clock).
        context: each version's context window, as its engines reported it (callers need
            it even while a model scaled to zero has no replica).
    """

    stable: str
    specs: dict[str, VersionSpec]
    states: dict[str, State] = dataclasses.field(default_factory=dict)
    history: list[str] = dataclasses.field(default_factory=list)
    rollout: Rollout | None = None
    last: dict[str, Any] | None = None
    drain_started: dict[str, float] = dataclasses.field(default_factory=dict)
    context: dict[str, int] = dataclasses.field(default_factory=dict)

    def set_state(self, name: str, version: str, state: State) -> None:
        """Move ``version`` to ``state`` along the lifecycle (a version seen for the first
        time, or a retired one that comes back, e.g. on rollback, starts at pending).

        Raises:
            IllegalTransition: the lifecycle does not allow the move.
        """
        old = self.states.get(version, "pending")
        if old == "retired":
            old = "pending"
        if old != state:
            state = ModelVersion(name, version, old).to(state).state
        self.states[version] = state

    def to_dict(self) -> dict[str, Any]:
        return {
            "stable": self.stable,
            "specs": {v: s.model_dump() for v, s in self.specs.items()},
            "states": self.states,
            "history": self.history,
            "rollout": dataclasses.asdict(self.rollout) if self.rollout else None,
            "last": self.last,
            "drain_started": self.drain_started,
            "context": self.context,
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], parse_spec: Callable[[dict[str, Any]], VersionSpec]
    ) -> Model:
        """The entry ``to_dict`` saved; ``parse_spec`` turns a saved spec back into one."""
        ro = d["rollout"]
        if ro is not None:
            ro = Rollout(
                **ro | {"steps": tuple(ro["steps"]), "limits": RolloutLimits(**ro["limits"])}
            )
        return cls(
            d["stable"],
            {v: parse_spec(s) for v, s in d["specs"].items()},
            d["states"],
            d["history"],
            ro,
            d["last"],
            d["drain_started"],
            d.get("context", {}),
        )


class Registry:
    """Every deployed model (``models``, in deploy order) and the running group switches."""

    def __init__(
        self,
        models: dict[str, Model] | None = None,
        groups: dict[str, GroupSwitch] | None = None,
    ) -> None:
        self.models: dict[str, Model] = models if models is not None else {}
        self.groups: dict[str, GroupSwitch] = groups if groups is not None else {}

    # -- saved form ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``registry`` and ``groups`` documents of the saved control state."""
        return {
            "registry": {n: m.to_dict() for n, m in self.models.items()},
            "groups": {
                g: {"members": [dataclasses.asdict(m) for m in gs.members], "switched": gs.switched}
                for g, gs in self.groups.items()
            },
        }

    @classmethod
    def from_dict(
        cls, docs: Mapping[str, Any], parse_spec: Callable[[dict[str, Any]], VersionSpec]
    ) -> Registry:
        """The registry ``to_dict`` saved (missing documents: empty)."""
        return cls(
            {n: Model.from_dict(d, parse_spec) for n, d in docs.get("registry", {}).items()},
            {
                g: GroupSwitch(g, tuple(GroupMember(**m) for m in d["members"]), d["switched"])
                for g, d in docs.get("groups", {}).items()
            },
        )

    # -- reading ------------------------------------------------------------------------

    def entry(self, model: str) -> Model:
        """``model``'s entry.

        Raises:
            NotFound: no such model (the message lists the deployed ones).
        """
        entry = self.models.get(model)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {model!r} is not deployed; deployed models: {known}")
        return entry

    def check_idle(self, model: str) -> None:
        """Raise ``Conflict`` if ``model`` is moving (a rollout or a group switch)."""
        entry = self.models[model]
        if entry.rollout is not None:
            ro = entry.rollout
            raise Conflict(
                f"model {model!r} is rolling out from {ro.stable} to {ro.candidate} "
                f"({ro.candidate_percent}% of traffic); wait for it or `airi rollback {model}`"
            )
        group = self.switching(model)
        if group is not None:
            raise Conflict(
                f"model {model!r} is switching with group {group.group}; wait for it or "
                f"`airi rollback {model}`"
            )

    def constraints(self, declared: Sequence[Constraint] = ()) -> list[Constraint]:
        """``requires`` constraints of every version known, and the ``declared`` ones (the
        app spec's)."""
        found = set(declared)
        for name, entry in self.models.items():
            for v in entry.specs.values():
                found.update(
                    Constraint(name, v.version, other, clause)
                    for other, clause in v.requires.items()
                )
        return sorted(found, key=str)

    def serving(self) -> dict[str, set[str]]:
        """The versions taking traffic, per model."""
        return {
            name: {v for v, w in self.traffic(name)[0].items() if w > 0} for name in self.models
        }

    def traffic(self, model: str) -> tuple[dict[str, float], str]:
        """``model``'s split (weight per version) and its stable version."""
        entry = self.models[model]
        if entry.rollout is not None:
            return entry.rollout.traffic_split(), entry.rollout.stable
        return {entry.stable: 1.0}, entry.stable

    def splits(self) -> dict[str, tuple[dict[str, float], str]]:
        """Every model's traffic split, for the scheduler (sent in one call)."""
        return {n: self.traffic(n) for n in self.models}

    def candidate(self, model: str) -> str | None:
        """The version ``model`` is moving to, if any."""
        ro = self.models[model].rollout
        if ro is not None:
            return ro.candidate
        group = self.switching(model)
        return next(m.candidate for m in group.members if m.model == model) if group else None

    def switching(self, model: str) -> GroupSwitch | None:
        """The running group switch ``model`` is a member of, if any."""
        return next((g for g in self.groups.values() if model in g.traffic_split()), None)

    def draining(self) -> bool:
        """Whether any version is draining."""
        return any("draining" in e.states.values() for e in self.models.values())

    def targets(
        self, wanted: Callable[[VersionSpec], int]
    ) -> dict[str, tuple[VersionSpec, int | None]]:
        """Replicas wanted per version key: the stable's and a candidate's count (from
        ``wanted``); None for a draining version (it keeps what it has, starts nothing)."""
        out: dict[str, tuple[VersionSpec, int | None]] = {}
        for name, entry in self.models.items():
            for v, state in entry.states.items():
                if state == "draining":
                    out[version_key(name, v)] = (entry.specs[v], None)
            for moving in (entry.stable, self.candidate(name)):
                if moving is not None:
                    spec = entry.specs[moving]
                    out[spec.key] = (spec, wanted(spec))
        return out

    def update_states(
        self,
        targets: Mapping[str, tuple[VersionSpec, int | None]],
        present: Mapping[str, int],
        ready: Mapping[str, int],
    ) -> list[Event]:
        """Versions with replicas loading are loading; with all they want ready, ready.

        Args:
            targets: as ``targets`` gave them.
            present, ready: per version key, its replicas (any state), its ready ones.
        """
        events: list[Event] = []
        for key, (spec, count) in targets.items():
            entry = self.models[spec.name]
            state = entry.states.get(spec.version, "pending")
            if state in ("pending", "retired") and present.get(key, 0):
                entry.set_state(spec.name, spec.version, "loading")
            if entry.states.get(spec.version) == "loading" and count and ready.get(key, 0) >= count:
                entry.set_state(spec.name, spec.version, "ready")
                events.append(Note(f"{key} is ready"))
        return events

    # -- deploys and API calls ----------------------------------------------------------

    def plan_deploy(
        self,
        models: Sequence[VersionSpec],
        group_of: Mapping[str, str],
        declared: Sequence[Constraint],
    ) -> Moves:
        """The rollouts and group switches a deploy starts; raises, with nothing changed,
        when one is not allowed.

        Args:
            models: the deployed spec's models (their stable versions).
            group_of: the group each grouped model of the spec belongs to.
            declared: the deployed spec's ``requires`` constraints.

        Raises:
            Conflict: a changed model is moving, or a move breaks a constraint.
        """
        changed = {
            m.name: m
            for m in models
            if m.name in self.models and self.models[m.name].stable != m.version
        }
        for name in changed:
            self.check_idle(name)
        serving, constraints = self.serving(), self.constraints(declared)
        rollouts: dict[str, Rollout] = {}
        grouped: dict[str, list[GroupMember]] = collections.defaultdict(list)
        try:
            for name, m in changed.items():
                group = group_of.get(name)
                if group is not None:
                    grouped[group].append(GroupMember(name, self.models[name].stable, m.version))
                else:
                    ro = self.new_rollout(name, m, None, None)
                    rollouts[name] = plan_rollout(ro, serving, constraints)
            groups = [
                plan_group_switch(g, members, serving, constraints)
                for g, members in grouped.items()
            ]
        except IncompatibleRollout as e:
            raise Conflict(f"deploy refused: {e}") from None
        return rollouts, groups

    def register(self, deployed: Sequence[Sequence[VersionSpec]], moves: Moves) -> list[Event]:
        """Take a deployed spec into the registry and start its rollouts.

        Args:
            deployed: each model's versions, its stable version first.
            moves: what ``plan_deploy`` planned for that spec.
        """
        for versions in deployed:
            m = versions[0]
            specs = {v.version: v for v in versions}
            entry = self.models.get(m.name)
            if entry is None:
                self.models[m.name] = Model(m.version, specs)
                self.models[m.name].set_state(m.name, m.version, "pending")
            else:  # earlier versions stay known: they drain, and rollback needs them
                entry.specs.update(specs)
        for name in set(self.models) - {vs[0].name for vs in deployed}:
            del self.models[name]
        self.groups = {
            g: gs
            for g, gs in self.groups.items()
            if all(m.model in self.models for m in gs.members)
        }
        rollouts, groups = moves
        events: list[Event] = []
        for name, ro in rollouts.items():
            events += self.begin(name, ro)
        for gs in groups:
            events += self.begin_group(gs.group, list(gs.members), {}, [])
        return events

    def rollout(
        self,
        model: str,
        version: str,
        strategy: str | None,
        steps: Sequence[int] | None,
        together: Mapping[str, str] | None,
        group: str | None,
        declared: Sequence[Constraint],
    ) -> list[Event]:
        """Start moving ``model`` to ``version`` (and ``together``'s models with it).

        Args:
            group: the spec's group of ``model``, if any (it names a group switch).
            declared: the deployed spec's ``requires`` constraints.

        Raises:
            NotFound: the model, or the version, is unknown (the message lists the known).
            InvalidRequest: it serves that version already; bad strategy or steps.
            Conflict: a rollout of it is running, or the move would serve versions that a
                ``requires`` constraint forbids together (the message names it).
        """
        targets = {model: version, **(together or {})}
        for name, v in targets.items():
            entry = self.entry(name)
            if v not in entry.specs:
                raise NotFound(
                    f"model {name!r} has no version {v!r}; known versions: "
                    f"{', '.join(sorted(entry.specs))}. Declare new versions under `versions:` "
                    "in the app spec and deploy it"
                )
            if v == entry.stable:
                raise InvalidRequest(f"model {name!r} already serves version {v!r}")
            self.check_idle(name)
        try:
            if len(targets) > 1:
                if strategy not in (None, "blue-green"):
                    raise InvalidRequest(
                        f"models that move together switch at once (blue-green); strategy "
                        f"{strategy!r} is for one model at a time"
                    )
                return self.begin_group(
                    group or "+".join(sorted(targets)),
                    [GroupMember(n, self.models[n].stable, v) for n, v in targets.items()],
                    self.serving(),
                    self.constraints(declared),
                )
            candidate = self.models[model].specs[version]
            ro = self.new_rollout(model, candidate, strategy, steps)
            return self.begin(model, plan_rollout(ro, self.serving(), self.constraints(declared)))
        except IncompatibleRollout as e:
            raise Conflict(str(e)) from None
        except RolloutError as e:
            raise InvalidRequest(str(e)) from None

    def rollback(self, model: str, declared: Sequence[Constraint], now: float) -> list[Event]:
        """Send ``model``'s traffic back: stop its running rollout (or its group's switch),
        or, with none running, roll back to the version it served before (blue-green).

        Raises:
            NotFound: no such model.
            InvalidRequest: nothing runs and no earlier version is known.
            Conflict: going back would break a ``requires`` constraint.
        """
        entry = self.entry(model)
        group = self.switching(model)
        if entry.rollout is not None:
            return self.apply(model, entry, *entry.rollout.rollback("rolled back by request"), now)
        if group is not None:
            return self.cancel_group(group, "rolled back by request", now)
        previous = next(
            (v for v in reversed(entry.history) if v in entry.specs and v != entry.stable),
            None,
        )
        if previous is None:
            raise InvalidRequest(
                f"model {model!r} has no rollout running and no earlier version to go back to"
            )
        entry.history.remove(previous)
        ro = self.new_rollout(model, entry.specs[previous], "blue-green", None)
        try:
            return self.begin(model, plan_rollout(ro, self.serving(), self.constraints(declared)))
        except IncompatibleRollout as e:
            raise Conflict(str(e)) from None

    def new_rollout(
        self,
        model: str,
        candidate: VersionSpec,
        strategy: str | None,
        steps: Sequence[int] | None,
    ) -> Rollout:
        """A rollout of ``model`` to ``candidate`` by its settings (or those given)."""
        r = candidate.rollout
        return Rollout(
            model,
            self.models[model].stable,
            candidate.version,
            cast(Strategy, strategy or r.strategy),  # Rollout checks it
            tuple(steps or r.steps),
            RolloutLimits(
                r.max_error_rate_delta,
                r.max_ttft_p99_ratio,
                r.min_requests_per_step,
                r.step_hold_s,
            ),
        )

    # -- moves --------------------------------------------------------------------------

    def begin(self, model: str, ro: Rollout) -> list[Event]:
        entry = self.models[model]
        entry.rollout = ro
        self._revive_or_queue(model, entry, ro.candidate)
        how = f"canary {list(ro.steps)}" if ro.strategy == "canary" else ro.strategy
        return [Note(f"rollout {model} {ro.stable} -> {ro.candidate} ({how}) started")]

    def begin_group(
        self,
        group: str,
        members: list[GroupMember],
        serving: Mapping[str, set[str]],
        constraints: Sequence[Constraint],
    ) -> list[Event]:
        gs = plan_group_switch(group, members, serving, constraints)
        self.groups[group] = gs
        for m in members:
            self._revive_or_queue(m.model, self.models[m.model], m.candidate)
        moved = ", ".join(f"{m.model} {m.stable} -> {m.candidate}" for m in members)
        return [Note(f"group {group} switch started: {moved}")]

    def _revive_or_queue(self, model: str, entry: Model, version: str) -> None:
        """A rollout's candidate: still draining, it is ready again at once (its replicas
        are warm); otherwise it starts at pending."""
        if entry.states.get(version) == "draining":
            entry.set_state(model, version, "ready")
            entry.drain_started.pop(version, None)
        else:
            entry.set_state(model, version, "pending")

    def apply(
        self, model: str, entry: Model, ro: Rollout, decision: RolloutDecision, now: float
    ) -> list[Event]:
        """Carry out a rollout decision: traffic follows from ``entry`` at the next push."""
        entry.rollout = ro if ro.outcome == "running" else None
        if decision.action == "wait":
            return []
        events: list[Event] = [
            Note(f"rollout {model} {ro.stable} -> {ro.candidate}: {decision.reason}"),
            RolloutActed(model, decision.action),
        ]
        if decision.action == "promote":
            events += self.promote(model, entry, ro.stable, ro.candidate, now)
        else:
            for version in decision.drain:
                self.retire(model, entry, version, now)
        if ro.outcome != "running":
            entry.last = rollout_info(ro) | {"finished_at": now}
        return events

    def promote(self, model: str, entry: Model, old: str, new: str, now: float) -> list[Event]:
        """``new`` becomes the stable version, ``old`` drains; an embedding model's
        collections switch to ``new`` (its ``activate`` job)."""
        entry.history.append(old)
        entry.stable = new
        events: list[Event] = []
        if entry.specs[new].task == "embed":
            events.append(StartJob("activate", model, new))
        self.retire(model, entry, old, now)
        return events

    def retire(self, model: str, entry: Model, version: str, now: float) -> None:
        """A ready version drains first; one that never served retires at once."""
        if entry.states.get(version) == "ready":
            entry.set_state(model, version, "draining")
            entry.drain_started[version] = now
        else:
            entry.set_state(model, version, "retired")

    def cancel_group(self, gs: GroupSwitch, reason: str, now: float) -> list[Event]:
        del self.groups[gs.group]
        for m in gs.members:
            self.retire(m.model, self.models[m.model], m.candidate, now)
        return [Note(f"group {gs.group} switch cancelled: {reason}")]

    # -- steps --------------------------------------------------------------------------

    def step_rollouts(
        self,
        now: float,
        stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
        failed_starts: Mapping[str, str | None],
        ready_keys: set[str] | frozenset[str],
        jobs: Mapping[JobKey, Job],
    ) -> list[Event]:
        """One decision for every running rollout and group switch.

        Args:
            now: the wall clock, in seconds.
            stats: per model, per version, its ``VersionStats`` fields since the split
                last changed (the scheduler's ``version_stats``).
            failed_starts: the version keys given up on (``MAX_START_FAILURES``), each
                with its last start error.
            ready_keys: the version keys with at least one ready replica.
            jobs: the re-embedding jobs' states (missing: never started).
        """
        events: list[Event] = []
        for name, entry in self.models.items():
            ro = entry.rollout
            if ro is None:
                continue
            key = version_key(name, ro.candidate)
            if key in failed_starts:
                why = failed_starts[key]
                events += self.apply(
                    name, entry, *ro.rollback(f"candidate failed to start: {why}"), now
                )
                continue
            data = self._data_ready(name, ro.candidate, jobs, events)
            if data.state is JobState.FAILED:
                events += self.apply(
                    name,
                    entry,
                    *ro.rollback(f"re-embedding its collections failed: {data.error}"),
                    now,
                )
                continue
            model_stats = stats.get(name, {})
            step = ro.step(
                now,
                VersionStats(**model_stats.get(ro.stable, {})),
                VersionStats(**model_stats.get(ro.candidate, {})),
                key in ready_keys
                and entry.states.get(ro.candidate) == "ready"
                and data.state is JobState.DONE,
            )
            events += self.apply(name, entry, *step, now)
        for gs in list(self.groups.values()):
            failed = [
                f"{m.model} {m.candidate} failed to start: {failed_starts[k]}"
                for m in gs.members
                if (k := version_key(m.model, m.candidate)) in failed_starts
            ]
            ready: dict[str, bool] = {}
            for m in gs.members:
                serves = (
                    version_key(m.model, m.candidate) in ready_keys
                    and self.models[m.model].states.get(m.candidate) == "ready"
                )
                job = self._data_ready(m.model, m.candidate, jobs, events) if serves else Job()
                if job.state is JobState.FAILED:
                    failed.append(f"re-embedding for {m.model} {m.candidate} failed: {job.error}")
                ready[m.model] = serves and job.state is JobState.DONE
            if failed:
                events += self.cancel_group(gs, "; ".join(failed), now)
                continue
            after, decision = gs.step(ready)
            if decision.action != "switch":
                continue
            # Every member's stable changes here, and the next push sends all their splits
            # to the scheduler in one call: no request sees a half-switched group.
            del self.groups[gs.group]
            for m in after.members:
                entry = self.models[m.model]
                events += self.promote(m.model, entry, m.stable, m.candidate, now)
                entry.last = {
                    "stable": m.stable,
                    "candidate": m.candidate,
                    "strategy": f"group {gs.group}",
                    "outcome": "promoted",
                    "reason": decision.reason,
                    "finished_at": now,
                }
            events.append(Note(decision.reason))
        return events

    def _data_ready(
        self, model: str, version: str, jobs: Mapping[JobKey, Job], events: list[Event]
    ) -> Job:
        """Whether ``version``'s data is ready for traffic. An embedding model's
        collections need a table of that version: its ``prepare`` job, started (an event
        added to ``events``) if it never ran."""
        if self.models[model].specs[version].task != "embed":
            return Job(JobState.DONE)
        job = jobs.get(("prepare", model, version), Job())
        if job.state is JobState.NONE:
            events.append(StartJob("prepare", model, version))
            return Job(JobState.RUNNING)
        return job

    def drain(
        self, now: float, busy_by_key: Mapping[str, int], jobs: Mapping[JobKey, Job]
    ) -> list[Event]:
        """Retire draining versions once their in-flight requests finished (or timed out).

        Args:
            now: the wall clock, in seconds.
            busy_by_key: per draining version key, the requests its replicas still hold
                (the scheduler must have the splits that give them no traffic already).
            jobs: the re-embedding jobs' states: while a model's ``activate`` job runs,
                its draining versions wait (ingestion still writes with them).
        """
        events: list[Event] = []
        for name, entry in self.models.items():
            draining = [v for v, s in entry.states.items() if s == "draining"]
            if not draining:
                continue
            if jobs.get(("activate", name, entry.stable), Job()).state is JobState.RUNNING:
                continue  # ingestion writes with the old version until its successor's
                # tables are active
            for v in draining:
                busy = busy_by_key.get(version_key(name, v), 0)
                waited = now - entry.drain_started.get(v, now)
                timeout = entry.specs[v].rollout.drain_timeout_s
                if busy and waited < timeout:
                    continue
                if not busy and waited < entry.specs[v].rollout.keep_warm_s:
                    continue  # drained, kept warm for an instant rollback
                entry.set_state(name, v, "retired")
                entry.drain_started.pop(v, None)
                cut = f"; {busy} requests cut off after {timeout:g} s" if busy else ""
                events.append(
                    Note(f"{version_key(name, v)} drained in {waited:.1f} s and retired{cut}")
                )
        return events
