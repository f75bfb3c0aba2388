"""Model versions and rollouts: lifecycle, canary and blue-green steps, coordinated switches.

A ``ModelVersion`` moves through ``pending -> loading -> ready -> draining -> retired``
(a version that never became ready may retire straight from pending or loading, and a
draining one goes back to ready when traffic returns to it before it retired, e.g. a
rollback right after a promotion); any other move is an ``IllegalTransition``.

A ``Rollout`` moves one model's traffic from its ``stable`` version to a ``candidate``:

- canary: once the candidate is ready it takes the first step's share (e.g. 10%), and each
  later step (50%, then 100%) only after the step has held ``step_hold_s`` and the candidate
  served ``min_requests_per_step`` requests with its error rate and TTFT p99 within the
  limits relative to the stable version's over the same step. Out of limits, it rolls back
  by itself, at once, with the numbers in the reason. Reaching 100% promotes it: the stable
  version drains.
- blue-green: once the candidate is ready (warm), all traffic switches at once and the
  stable version drains.

``step`` is pure: the caller passes the clock and both versions' stats since the current
step began (it resets them when a decision changes the traffic), and applies the decision.

Coordinated rollouts: a ``Constraint`` says that while a version of one model serves, the
serving versions of another model must satisfy a spec (``embedder v2* requires index
>=v2``). ``check_compatible`` lists the violations of a serving set; ``plan_rollout`` and
``plan_group_switch`` refuse a rollout whose any moment would serve an incompatible pair.
A group switch moves several models together: all members go from 0 to 100% in one
decision, once every candidate is ready. Draining versions finish the requests they hold
but take no new ones, so they do not count as serving.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

State = Literal["pending", "loading", "ready", "draining", "retired"]
STATES: tuple[State, ...] = ("pending", "loading", "ready", "draining", "retired")

_NEXT: dict[str, tuple[State, ...]] = {
    "pending": ("loading", "retired"),
    "loading": ("ready", "retired"),  # retired: the load failed or the rollout was cancelled
    "ready": ("draining",),
    "draining": ("retired", "ready"),  # ready: traffic came back before it retired
    "retired": (),
}

Strategy = Literal["canary", "blue-green"]
STRATEGIES: tuple[Strategy, ...] = ("canary", "blue-green")
Action = Literal["wait", "advance", "promote", "rollback"]
Outcome = Literal["running", "promoted", "rolled_back"]


# A candidate exactly at a limit is within it; float division must not say otherwise.
_TOLERANCE = 1e-9


class RolloutError(ValueError):
    """A rollout, its limits, its stats or a constraint is invalid, or it is finished."""


class IllegalTransition(RolloutError):
    """A model version was asked to move to a state its current state does not lead to."""


class IncompatibleRollout(RolloutError):
    """A rollout would serve a pair of versions that a constraint forbids.

    ``violations`` holds one message per violated constraint, each naming it.
    """

    def __init__(self, message: str, violations: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model as the registry holds it."""

    name: str
    version: str
    state: State = "pending"

    def __post_init__(self) -> None:
        if self.state not in _NEXT:
            raise RolloutError(
                f"{self.name} {self.version}: state must be one of {', '.join(STATES)}, "
                f"got {self.state!r}"
            )

    def to(self, state: State) -> ModelVersion:
        """This version in ``state``.

        Raises:
            IllegalTransition: ``state`` does not follow the current state.
        """
        allowed = _NEXT[self.state]
        if state not in allowed:
            then = ", ".join(allowed) if allowed else "nowhere (retired is final)"
            raise IllegalTransition(
                f"{self.name} {self.version} cannot go from {self.state} to {state}; "
                f"from {self.state} it may go to {then}"
            )
        return replace(self, state=state)

    @property
    def serving(self) -> bool:
        """Whether it takes new requests (only a ready version does)."""
        return self.state == "ready"


@dataclass(frozen=True)
class RolloutLimits:
    """How far a canary may stray from the stable version, and how long each step lasts.

    Attributes:
        max_error_rate_delta: the candidate's error rate may exceed the stable's by at
            most this (0.01 is one percentage point).
        max_ttft_p99_ratio: the candidate's TTFT p99 may be at most this multiple of the
            stable's.
        min_requests_per_step: candidate requests needed before a step is judged at all.
        step_hold_s: how long a step lasts before the next one, at the least.
    """

    max_error_rate_delta: float = 0.01
    max_ttft_p99_ratio: float = 1.5
    min_requests_per_step: int = 100
    step_hold_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate_delta <= 1.0:
            raise RolloutError(
                f"max_error_rate_delta must be in [0, 1], got {self.max_error_rate_delta}"
            )
        if self.max_ttft_p99_ratio < 1.0:
            raise RolloutError(
                f"max_ttft_p99_ratio must be at least 1 (the candidate may be as slow as "
                f"the stable version), got {self.max_ttft_p99_ratio}"
            )
        if self.min_requests_per_step < 1:
            raise RolloutError(
                f"min_requests_per_step must be at least 1, got {self.min_requests_per_step}"
            )
        if self.step_hold_s < 0:
            raise RolloutError(f"step_hold_s must not be negative, got {self.step_hold_s}")


@dataclass(frozen=True)
class VersionStats:
    """One version's requests since the current step began; ``ttft_p99_s`` None if none."""

    requests: int = 0
    errors: int = 0
    ttft_p99_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            raise RolloutError(
                f"stats need 0 <= errors <= requests, got errors={self.errors} and "
                f"requests={self.requests}"
            )
        if self.ttft_p99_s is not None and self.ttft_p99_s < 0:
            raise RolloutError(f"ttft_p99_s must not be negative, got {self.ttft_p99_s}")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class RolloutDecision:
    """What a rollout step decided.

    Attributes:
        action: ``wait``, ``advance`` (to the next traffic share), ``promote`` (the
            candidate takes all traffic) or ``rollback`` (the stable takes it all back).
        reason: why, for people, with the numbers.
        candidate_percent: the candidate's traffic share after the decision.
        drain: versions to move to draining now (the stable on promote, the candidate on
            rollback).
    """

    action: Action
    reason: str
    candidate_percent: int
    drain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rollout:
    """One model's move from ``stable`` to ``candidate``; ``step`` advances it.

    Attributes:
        steps: the canary's traffic percentages, increasing, ending at 100. Blue-green
            ignores them: it goes from 0 to 100 in one move.
        step_index: the current step, -1 while the candidate takes no traffic.
        step_started_at: when the current step began (the caller's clock).
        outcome: ``running`` until promoted or rolled back.
        reason: why the last decision that changed traffic was taken.
    """

    model: str
    stable: str
    candidate: str
    strategy: Strategy = "canary"
    steps: tuple[int, ...] = (10, 50, 100)
    limits: RolloutLimits = RolloutLimits()
    step_index: int = -1
    step_started_at: float | None = None
    outcome: Outcome = "running"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise RolloutError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.stable == self.candidate:
            raise RolloutError(
                f"{self.model}: the candidate must differ from the stable version, both are "
                f"{self.stable}"
            )
        s = self.steps
        if (
            not s
            or s[-1] != 100
            or any(not 0 < p <= 100 for p in s)
            or any(a >= b for a, b in zip(s, s[1:], strict=False))
        ):
            raise RolloutError(
                f"{self.model}: steps must be increasing percentages in (0, 100] ending at "
                f"100, got {list(s)}"
            )

    @property
    def candidate_percent(self) -> int:
        """The candidate's share of traffic, in percent."""
        if self.outcome == "promoted":
            return 100
        if self.outcome == "rolled_back" or self.step_index < 0:
            return 0
        return self.steps[self.step_index]

    def traffic_split(self) -> dict[str, float]:
        """Traffic weight per version, summing to 1."""
        p = self.candidate_percent / 100
        return {self.stable: 1.0 - p, self.candidate: p}

    def step(
        self,
        now: float,
        stable_stats: VersionStats,
        candidate_stats: VersionStats,
        candidate_ready: bool,
    ) -> tuple[Rollout, RolloutDecision]:
        """Decide the next move.

        Args:
            now: the caller's clock, in seconds.
            stable_stats, candidate_stats: each version's requests since the step began.
            candidate_ready: whether the candidate's replicas are loaded and healthy.

        Returns:
            The rollout after the decision, and the decision.
        """
        if self.outcome != "running":
            return self, self._decide("wait", f"rollout finished: {self.reason}")
        c = self.candidate
        if not candidate_ready:
            if self.step_index < 0:
                return self, self._decide(
                    "wait", f"candidate {c} is not ready; it takes no traffic until it is"
                )
            return self._roll_back(
                f"candidate {c} stopped being ready at {self.candidate_percent}% of traffic"
            )
        if self.strategy == "blue-green":
            return self._promote(now, f"candidate {c} is ready: all traffic switches to it")
        if self.step_index < 0:
            return self._advance(now, f"candidate {c} is ready")

        held = now - (self.step_started_at if self.step_started_at is not None else now)
        limits = self.limits
        if candidate_stats.requests < limits.min_requests_per_step:
            return self, self._decide(
                "wait",
                f"{self.candidate_percent}% step has {candidate_stats.requests} of the "
                f"{limits.min_requests_per_step} candidate requests needed to judge it",
            )
        faults = self._faults(stable_stats, candidate_stats)
        if faults:
            return self._roll_back("; ".join(faults))
        if held < limits.step_hold_s:
            return self, self._decide(
                "wait",
                f"holding {self.candidate_percent}% for {limits.step_hold_s:g} s, "
                f"{limits.step_hold_s - held:g} s left; candidate within limits",
            )
        return self._advance(
            now,
            f"{self.candidate_percent}% step held {held:g} s with {candidate_stats.requests} "
            "candidate requests within limits",
        )

    def rollback(self, reason: str = "manual rollback") -> tuple[Rollout, RolloutDecision]:
        """Send all traffic back to the stable version and drain the candidate.

        Raises:
            RolloutError: the rollout is finished (promoted or rolled back already).
        """
        if self.outcome != "running":
            raise RolloutError(
                f"{self.model}: the rollout to {self.candidate} is finished ({self.reason}); "
                f"to go back, start a new rollout from {self.candidate} to {self.stable}"
            )
        return self._roll_back(reason)

    # -- internals ------------------------------------------------------------------------

    def _decide(self, action: Action, reason: str, drain: tuple[str, ...] = ()) -> RolloutDecision:
        return RolloutDecision(action, reason, self.candidate_percent, drain)

    def _advance(self, now: float, why: str) -> tuple[Rollout, RolloutDecision]:
        nxt = self.step_index + 1
        if self.steps[nxt] == 100:
            return self._promote(now, why)
        reason = f"{why}: {self.steps[nxt]}% of traffic to {self.candidate}"
        after = replace(self, step_index=nxt, step_started_at=now, reason=reason)
        return after, after._decide("advance", reason)

    def _promote(self, now: float, why: str) -> tuple[Rollout, RolloutDecision]:
        reason = f"{why}: candidate {self.candidate} promoted to 100%, {self.stable} drains"
        after = replace(
            self,
            step_index=len(self.steps) - 1,
            step_started_at=now,
            outcome="promoted",
            reason=reason,
        )
        return after, after._decide("promote", reason, (self.stable,))

    def _roll_back(self, why: str) -> tuple[Rollout, RolloutDecision]:
        reason = f"rolled back to {self.stable}: {why}"
        after = replace(self, outcome="rolled_back", reason=reason)
        return after, after._decide("rollback", reason, (self.candidate,))

    def _faults(self, stable: VersionStats, candidate: VersionStats) -> list[str]:
        """The limits the candidate breaks, each with the numbers."""
        limits = self.limits
        faults: list[str] = []
        delta = candidate.error_rate - stable.error_rate
        if delta > limits.max_error_rate_delta + _TOLERANCE:
            faults.append(
                f"candidate {self.candidate} error rate {candidate.error_rate:.1%} "
                f"({candidate.errors}/{candidate.requests}) exceeds stable {self.stable}'s "
                f"{stable.error_rate:.1%} ({stable.errors}/{stable.requests}) by "
                f"{delta * 100:.1f} points, limit {limits.max_error_rate_delta * 100:.1f}"
            )
        c_ttft, s_ttft = candidate.ttft_p99_s, stable.ttft_p99_s
        # Without the stable's TTFT (no stable requests in the step) there is no baseline.
        if c_ttft is not None and s_ttft is not None and s_ttft > 0:
            ratio = c_ttft / s_ttft
            if ratio > limits.max_ttft_p99_ratio + _TOLERANCE:
                faults.append(
                    f"candidate {self.candidate} TTFT p99 {c_ttft:.2f} s is {ratio:.2f} x "
                    f"stable {self.stable}'s {s_ttft:.2f} s, limit "
                    f"{limits.max_ttft_p99_ratio:.2f} x"
                )
        return faults


# -- coordinated rollouts ---------------------------------------------------------------

_COMPARE: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_CLAUSE = re.compile(r"^(>=|<=|==|!=|>|<)\s*(\S+)$")


def version_key(version: str) -> tuple[int, ...]:
    """The numbers in a version, for ordering: ``v2.10`` is ``(2, 10)``, after ``v2.9``."""
    return tuple(int(x) for x in re.findall(r"\d+", version))


def _matches(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies every comma-separated clause of ``spec``."""
    for clause in (c.strip() for c in spec.split(",")):
        m = _CLAUSE.match(clause)
        if m is None:
            if not fnmatch.fnmatchcase(version, clause):
                return False
        elif not _COMPARE[m.group(1)](version_key(version), version_key(m.group(2))):
            return False
    return True


@dataclass(frozen=True)
class Constraint:
    """While a version of ``model`` matching ``version_pattern`` serves, every serving
    version of ``requires_model`` must match ``requires_versions``.

    ``version_pattern`` is a glob (``v2*``, ``*``). ``requires_versions`` is one or more
    comma-separated clauses that must all hold, each a glob (``v2*``) or a comparison of
    the versions' numbers (``>=v2``, ``<3``, ``!=v2.1``): ``>=v2, <v3``.
    """

    model: str
    version_pattern: str
    requires_model: str
    requires_versions: str

    def __post_init__(self) -> None:
        clauses = [c.strip() for c in self.requires_versions.split(",")]
        for clause in clauses:
            m = _CLAUSE.match(clause)
            if not clause or (m is not None and not version_key(m.group(2))):
                raise RolloutError(
                    f"constraint '{self}': each clause of requires_versions must be a glob "
                    f"(v2*) or a comparison with a numbered version (>=v2, <3), got {clause!r}"
                )
        if not self.version_pattern:
            raise RolloutError(f"constraint '{self}': version_pattern must not be empty")

    def __str__(self) -> str:
        return (
            f"{self.model} {self.version_pattern} requires "
            f"{self.requires_model} {self.requires_versions}"
        )


def check_compatible(
    serving: Mapping[str, Collection[str]], constraints: Sequence[Constraint]
) -> list[str]:
    """The constraint violations of a serving set, each naming its constraint.

    Args:
        serving: the versions taking traffic, per model.
        constraints: the declared ``requires`` constraints.
    """
    violations: list[str] = []
    for c in constraints:
        for v in sorted(serving.get(c.model, ())):
            if not fnmatch.fnmatchcase(v, c.version_pattern):
                continue
            for w in sorted(serving.get(c.requires_model, ())):
                if not _matches(w, c.requires_versions):
                    violations.append(
                        f"constraint '{c}' forbids {c.model} {v} serving together with "
                        f"{c.requires_model} {w}"
                    )
    return violations


def _moments_ok(
    moments: Sequence[Mapping[str, Collection[str]]],
    serving: Mapping[str, Collection[str]],
    constraints: Sequence[Constraint],
    what: str,
) -> None:
    """Raise ``IncompatibleRollout`` if a moment breaks a constraint the present does not
    (a violation already serving is not this rollout's doing, so it does not block it)."""
    already = set(check_compatible(serving, constraints))
    found: list[str] = []
    for moment in moments:
        for v in check_compatible(moment, constraints):
            if v not in already and v not in found:
                found.append(v)
    if found:
        raise IncompatibleRollout(f"{what} refused: {'; '.join(found)}", found)


def plan_rollout(
    rollout: Rollout,
    serving: Mapping[str, Collection[str]],
    constraints: Sequence[Constraint],
) -> Rollout:
    """``rollout`` if no moment of it would serve an incompatible pair.

    A canary serves both versions for a while; blue-green serves the stable, then the
    candidate.

    Raises:
        IncompatibleRollout: the message and ``violations`` name each broken constraint.
    """
    others = {m: set(v) for m, v in serving.items() if m != rollout.model}
    after = {**others, rollout.model: {rollout.candidate}}
    moments = [after]
    if rollout.strategy == "canary":
        moments.insert(0, {**others, rollout.model: {rollout.stable, rollout.candidate}})
    _moments_ok(
        moments,
        serving,
        constraints,
        f"rollout of {rollout.model} {rollout.stable} -> {rollout.candidate}",
    )
    return rollout


@dataclass(frozen=True)
class GroupMember:
    """One model of a group switch: from ``stable`` to ``candidate``."""

    model: str
    stable: str
    candidate: str

    def __post_init__(self) -> None:
        if self.stable == self.candidate:
            raise RolloutError(
                f"{self.model}: the candidate must differ from the stable version, both are "
                f"{self.stable}"
            )


@dataclass(frozen=True)
class GroupDecision:
    """What a group switch step decided: ``wait`` or ``switch`` (all members at once).

    ``drain`` lists the (model, version) pairs to move to draining now.
    """

    action: Literal["wait", "switch"]
    reason: str
    drain: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GroupSwitch:
    """Models that move together: every member from 0 to 100% in the same decision."""

    group: str
    members: tuple[GroupMember, ...]
    switched: bool = False

    def traffic_split(self) -> dict[str, dict[str, float]]:
        """Traffic weight per version, per member model."""
        p = 1.0 if self.switched else 0.0
        return {m.model: {m.stable: 1.0 - p, m.candidate: p} for m in self.members}

    def step(self, ready: Mapping[str, bool]) -> tuple[GroupSwitch, GroupDecision]:
        """Switch every member at once when every candidate is ready, else wait.

        Args:
            ready: per member model, whether its candidate is ready.
        """
        if self.switched:
            return self, GroupDecision("wait", f"group {self.group} switched already")
        waiting = [f"{m.model} {m.candidate}" for m in self.members if not ready.get(m.model)]
        if waiting:
            return self, GroupDecision(
                "wait",
                f"group {self.group} waits for {', '.join(waiting)} to be ready; "
                "no member switches before all are",
            )
        moved = ", ".join(f"{m.model} {m.stable} -> {m.candidate}" for m in self.members)
        return replace(self, switched=True), GroupDecision(
            "switch",
            f"group {self.group}: every candidate is ready, all switch at once: {moved}",
            tuple((m.model, m.stable) for m in self.members),
        )


def plan_group_switch(
    group: str,
    members: Sequence[GroupMember],
    serving: Mapping[str, Collection[str]],
    constraints: Sequence[Constraint],
) -> GroupSwitch:
    """A ``GroupSwitch`` for ``members``, if switching them at once is compatible.

    The switch has two moments: now, and after every member moved (the others unchanged).

    Raises:
        RolloutError: no members, or a model appears twice.
        IncompatibleRollout: the moment after the switch would break a constraint; the
            message and ``violations`` name each one.
    """
    models = [m.model for m in members]
    if not members or len(set(models)) != len(models):
        raise RolloutError(
            f"group {group} needs at least one member and each model once, got {models}"
        )
    after = {m: set(v) for m, v in serving.items()}
    for m in members:
        after[m.model] = {m.candidate}
    _moments_ok([after], serving, constraints, f"group switch {group}")
    return GroupSwitch(group, tuple(members))
