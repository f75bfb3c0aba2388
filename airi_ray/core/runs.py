"""A graph run's identity and its limits: tenant, priority, token budget, deadline.

Every model call in a run inherits the run's identity. Two decisions live here:

- the token budget: the run's calls together may spend at most ``token_budget`` tokens
  (prompt and completion). A call's output is capped by what is left, and once nothing is
  left the run stops with ``RunBudgetExceeded``;
- the deadline split: a run with an end-to-end deadline gives each call the share of the
  remaining time that leaves as much to every model call still ahead on the longest path,
  so the scheduler orders the call by a deadline that keeps the whole run on time.

Both carry across a resume: the time a run has spent running and the tokens it has been
charged are part of its recorded state (``progress`` folds them out of the run's events
and checkpoints), and the resumed run's ``RunLimits`` starts from them, not from zero.
The time the run spent with no executor (between a crash and its resume) is not counted:
the deadline bounds the run's execution, and monotonic clocks do not cross processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from airi_ray.core.errors import AiriError, InvalidRequest
from airi_ray.core.requests import check_priority

MAX_RUN_DEADLINE_S = 86_400.0
LIVE_STATUSES = ("started", "resumed")  # a run's status event while it may still run
CHARGED = "charged"  # the event of one model call's tokens, recorded as the call ends


class RunBudgetExceeded(AiriError):
    """The run spent its token budget."""

    status = 429
    type = "insufficient_quota"
    code = "run_budget_exceeded"


class RunDeadlineExceeded(AiriError):
    status = 504
    type = "timeout"
    code = "run_deadline_exceeded"


@dataclass(frozen=True)
class RunOptions:
    """What a caller chooses for a run; validated here, so every surface answers alike.

    Attributes:
        priority: the priority class of every call in the run.
        token_budget: tokens (prompt + completion) all calls together may spend; None: no cap.
        deadline_s: seconds from the start by which the run should finish; None: none.
    """

    priority: str = "interactive"
    token_budget: int | None = None
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        check_priority(self.priority)
        b = self.token_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise InvalidRequest(f"token_budget must be a positive integer, got {b!r}")
        d = self.deadline_s
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= MAX_RUN_DEADLINE_S
        ):
            raise InvalidRequest(
                f"deadline_s must be a number of seconds in (0, {MAX_RUN_DEADLINE_S:.0f}], got {d!r}"
            )


@dataclass
class RunLimits:
    """The budget and deadline of one run, as it goes.

    Args:
        options: the run's options.
        started_at: the start of this execution on the caller's monotonic clock.
        elapsed_s: seconds the run had spent in earlier executions (before a resume).
    """

    options: RunOptions
    started_at: float
    spent: int = 0
    calls: int = 0
    per_model: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @classmethod
    def resumed(cls, options: RunOptions, now: float, progress: RunProgress) -> RunLimits:
        """The limits of a run resumed at ``now`` after it had made ``progress``."""
        per_model = dict(progress.per_model)
        return cls(
            options, now, sum(per_model.values()), progress.calls, per_model, progress.elapsed_s
        )

    def elapsed(self, now: float) -> float:
        """Seconds the run has spent running, over all its executions."""
        return self.elapsed_s + max(now - self.started_at, 0.0)

    @property
    def remaining(self) -> int | None:
        b = self.options.token_budget
        return None if b is None else max(b - self.spent, 0)

    def check(self, now: float) -> None:
        """Raise if the run may not make another call."""
        if self.remaining == 0:
            raise RunBudgetExceeded(
                f"the run spent its token budget of {self.options.token_budget} tokens "
                f"({self.spent} tokens over {self.calls} calls)"
            )
        d = self.options.deadline_s
        if d is not None and self.elapsed(now) >= d:
            raise RunDeadlineExceeded(f"the run passed its deadline of {d:g} s")

    def max_tokens(self, prompt_tokens: int, wanted: int) -> int:
        """The output cap of a call with ``prompt_tokens``: ``wanted`` or what the budget
        leaves after the prompt.

        Raises:
            RunBudgetExceeded: the budget does not cover the prompt and one output token.
        """
        left = self.remaining
        if left is None:
            return wanted
        if prompt_tokens + 1 > left:
            raise RunBudgetExceeded(
                f"the run's token budget of {self.options.token_budget} tokens has {left} left, "
                f"not enough for a call with a {prompt_tokens}-token prompt"
            )
        return min(wanted, left - prompt_tokens)

    def charge(self, model: str, tokens: int) -> None:
        """Count a finished call's tokens against the budget."""
        self.spent += tokens
        self.calls += 1
        self.per_model[model] = self.per_model.get(model, 0) + tokens

    def call_deadline_s(self, now: float, calls_ahead: int) -> float | None:
        """The deadline (seconds from now) of a call with ``calls_ahead`` model calls still
        to come after it on the run's longest path; None when the run has no deadline."""
        d = self.options.deadline_s
        if d is None:
            return None
        left = d - self.elapsed(now)
        if left <= 0:
            raise RunDeadlineExceeded(f"the run passed its deadline of {d:g} s")
        return left / (1 + max(calls_ahead, 0))


@dataclass(frozen=True)
class RunProgress:
    """What a run had spent when its last execution stopped: tokens per model, model
    calls, and seconds of running."""

    per_model: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    calls: int = 0
    elapsed_s: float = 0.0


def charged_event(model: str, tokens: int, elapsed_s: float, node: str) -> dict[str, Any]:
    """The run event that records one model call's tokens (``progress`` reads it back)."""
    return {"status": CHARGED, "model": model, "tokens": tokens, "elapsed_s": elapsed_s} | {
        "node": node
    }


def progress(
    events: Iterable[Mapping[str, Any]], checkpoints: Iterable[Mapping[str, Any]]
) -> RunProgress:
    """A run's progress from its recorded events and checkpoints.

    Tokens come from the ``charged`` events, one per model call, so the calls of a node
    that was interrupted before its checkpoint count too. A run recorded before calls were
    charged one by one (no such event) counts its checkpoints' per-node usage instead.
    The time is the latest ``elapsed_s`` any event or checkpoint recorded.
    """
    events, checkpoints = list(events), list(checkpoints)
    per_model: dict[str, int] = {}
    calls = 0
    charges = [e for e in events if e.get("status") == CHARGED]
    if charges:
        for e in charges:
            per_model[e["model"]] = per_model.get(e["model"], 0) + int(e["tokens"])
        calls = len(charges)
    else:
        for cp in checkpoints:
            for model, tokens in cp.get("usage", {}).items():
                per_model[model] = per_model.get(model, 0) + int(tokens)
                calls += 1
    elapsed = max((float(x.get("elapsed_s", 0.0)) for x in [*events, *checkpoints]), default=0.0)
    return RunProgress(MappingProxyType(per_model), calls, elapsed)


def last_status(events: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The run's latest status event (started, resumed, or how it ended), skipping the
    events that only record progress.

    Raises:
        ValueError: the run has no status event (its start was not recorded).
    """
    last = None
    for e in events:
        if e.get("status") != CHARGED:
            last = e
    if last is None:
        raise ValueError("the run has no recorded start")
    return last


@dataclass
class RunBook:
    """The limits of runs driven from outside airi's executor (a LangGraph graph calling
    ``AiriChatModel``), by run id: the first call of a run opens its ``RunLimits``, the
    later ones share them, so the run's calls together keep its budget and deadline.

    A run opened here may have been driven before by another process (the graph's process
    was killed and the graph resumed from its checkpoint): ``progress`` is what the run's
    recorded ``charged`` events say it spent then, and its limits start from it.

    At most ``max_runs`` are kept: the least recently called run is forgotten first.
    """

    max_runs: int = 10_000
    runs: dict[str, RunLimits] = field(default_factory=dict)

    def get(self, run_id: str) -> RunLimits | None:
        """The run's limits if this book holds them (None: read its progress first)."""
        return self.runs.get(run_id)

    def limits(
        self,
        run_id: str,
        options: RunOptions,
        now: float,
        progress: RunProgress | None = None,
    ) -> RunLimits:
        """The run's limits (opened at ``now`` on its first call, from ``progress`` if the
        run made some before), most recent last."""
        limits = self.runs.pop(run_id, None)
        if limits is None:
            limits = RunLimits(options, now)
            if progress is not None:
                limits = RunLimits.resumed(options, now, progress)
        self.runs[run_id] = limits
        while len(self.runs) > self.max_runs:
            del self.runs[next(iter(self.runs))]
        return limits
