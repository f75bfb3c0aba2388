"""Per-tenant policy: ACLs, request shape limits, rate limits, budgets, concurrency.

``PolicyEngine`` is a plain object the scheduler actor owns. For each model call:

1. ``check_request_shape`` (400 when ``max_tokens``, ``n``, stop list, messages or prompt
   size is over the tenant's limit);
2. ``admit`` (403 outside the ACL; 429 over concurrency, budget, requests/minute or
   tokens/minute) returns an ``Admission`` that charged 1 request and the prompt tokens;
3. ``release`` with the real token counts when the call ends, however it ends: the
   tokens/minute bucket is corrected (it may go into debt, which delays the next request)
   and the budget is charged.

A front door splits step 2 in two, so that the cheap limits apply before the prompt's
costly tokenization: ``enter`` charges the request and takes a concurrency slot before
the prompt's tokens are known, and ``admit(..., entered=)`` then charges its tokens. A
request refused for its length after ``enter`` has counted against requests/minute.

State is one record per configured tenant plus the admissions in flight, so it stays
bounded whatever callers send; an unknown tenant is refused, never created.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.policy.errors import (
    BudgetExceeded,
    PermissionDenied,
    RateLimited,
    RequestLimitExceeded,
)
from airi_ray.core.policy.limits import Budget, TokenBucket

Priority = Literal["interactive", "batch"]

DAY_S = 86_400.0
CONCURRENCY_RETRY_S = 1.0  # a hint only: a slot frees when any request of the tenant ends

# Request shape limits when a tenant's policy says nothing.
DEFAULT_MAX_TOKENS = 32_768
DEFAULT_MAX_N = 8
DEFAULT_MAX_MESSAGES = 512
DEFAULT_MAX_STOP = 16
DEFAULT_MAX_PROMPT_CHARS = 1_000_000
DEFAULT_MAX_EMBEDDING_TOKENS = 300_000  # OpenAI's cap on one embeddings request


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What one tenant may do. ``None`` means unlimited; empty model/graph lists allow all."""

    name: str
    models: tuple[str, ...] = ()  # glob patterns, e.g. "tiny-*"
    graphs: tuple[str, ...] = ()
    priority: Priority = "interactive"
    weight: float = 1.0
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    budget_tokens: int | None = None  # tokens per budget period
    budget_period_s: float = DAY_S
    max_concurrent: int | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    max_n: int | None = DEFAULT_MAX_N
    max_messages: int | None = DEFAULT_MAX_MESSAGES
    max_stop: int | None = DEFAULT_MAX_STOP
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    max_embedding_tokens: int | None = DEFAULT_MAX_EMBEDDING_TOKENS  # all inputs of a request

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tenant policy needs a name")
        if self.priority not in ("interactive", "batch"):
            raise ValueError(
                f"tenant {self.name!r}: priority is 'interactive' or 'batch', not {self.priority!r}"
            )
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"tenant {self.name!r}: weight must be > 0, got {self.weight}")
        if not (math.isfinite(self.budget_period_s) and self.budget_period_s > 0):
            raise ValueError(
                f"tenant {self.name!r}: budget_period_s must be > 0, got {self.budget_period_s}"
            )
        for limit in (
            "rpm",
            "tpm",
            "budget_tokens",
            "max_concurrent",
            "max_tokens",
            "max_n",
            "max_messages",
            "max_stop",
            "max_prompt_chars",
            "max_embedding_tokens",
        ):
            value = getattr(self, limit)
            if value is not None and value < (0 if limit == "budget_tokens" else 1):
                raise ValueError(f"tenant {self.name!r}: {limit} must be >= 1 or None, got {value}")


@dataclass(frozen=True, slots=True)
class Admission:
    """A granted request: what ``release`` needs to settle it, and the tenant's class.

    The scheduler takes ``priority`` and ``weight`` from here, never from the client.
    """

    tenant: str
    model: str
    seq: int
    estimate_tokens: int  # charged to the tokens/minute bucket at admission
    max_tokens: int | None
    admitted_at: float
    priority: Priority
    weight: float


@dataclass(frozen=True, slots=True)
class Usage:
    """A tenant's counters at ``now``, for metrics and listings."""

    tenant: str
    in_flight: int
    budget_spent: int | None
    budget_limit: int | None
    budget_resets_at: float | None


@dataclass(slots=True)
class _TenantState:
    policy: TenantPolicy
    models: re.Pattern[str] | None
    graphs: re.Pattern[str] | None
    rpm: TokenBucket | None
    tpm: TokenBucket | None
    budget: Budget | None
    open: set[int] = field(default_factory=set)  # seq of admissions in flight


class PolicyEngine:
    """Admission control for every model call, by tenant. Pure: the clock is ``now``."""

    def __init__(self, policies: Iterable[TenantPolicy] = ()) -> None:
        self._tenants: dict[str, _TenantState] = {}
        self._seq = 0
        self.set_policies(policies)

    def set_policies(self, policies: Iterable[TenantPolicy]) -> None:
        """Replace the policies; counters of tenants whose limits did not change carry over.

        Tenants no longer listed are dropped (their admissions in flight release as no-ops).

        Raises:
            ValueError: two policies name the same tenant.
        """
        new: dict[str, _TenantState] = {}
        for p in policies:
            if p.name in new:
                raise ValueError(f"tenant {p.name!r} has two policies")
            old = self._tenants.get(p.name)
            new[p.name] = _state(p, old)
        self._tenants = new

    def tenants(self) -> tuple[str, ...]:
        """The configured tenant names."""
        return tuple(self._tenants)

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy. Raises PermissionDenied if the tenant has none."""
        return self._state(tenant).policy

    def check_model(self, tenant: str, model: str) -> None:
        """Raises PermissionDenied (403) if ``model`` is outside the tenant's ACL."""
        state = self._state(tenant)
        if state.models is not None and state.models.fullmatch(model) is None:
            raise PermissionDenied(
                f"tenant {tenant!r} may not use model {model!r}; allowed models: "
                f"{', '.join(state.policy.models)}",
                rule="model_acl",
            )

    def check_graph(self, tenant: str, graph: str) -> None:
        """Raises PermissionDenied (403) if ``graph`` is outside the tenant's ACL."""
        state = self._state(tenant)
        if state.graphs is not None and state.graphs.fullmatch(graph) is None:
            raise PermissionDenied(
                f"tenant {tenant!r} may not run graph {graph!r}; allowed graphs: "
                f"{', '.join(state.policy.graphs)}",
                code="graph_not_allowed",
                rule="graph_acl",
            )

    def check_request_shape(
        self,
        tenant: str,
        *,
        max_tokens: int | None = None,
        n: int = 1,
        messages: int = 1,
        stop: int = 0,
        prompt_chars: int = 0,
        embedding_tokens: int | None = None,
    ) -> None:
        """Check the size fields of a request against the tenant's limits.

        Args:
            max_tokens: the requested completion cap (None: the engine's default).
            n: completions asked for; messages: chat messages; stop: stop sequences;
            prompt_chars: characters of prompt text, all messages together;
            embedding_tokens: tokens of all inputs of an embeddings request (None: not one).

        Raises:
            RequestLimitExceeded (400): a field is over its limit, or not positive.
            PermissionDenied: the tenant has no policy.
        """
        p = self._state(tenant).policy
        if max_tokens is not None:
            _check_field(tenant, "max_tokens", max_tokens, p.max_tokens, 1)
        _check_field(tenant, "n", n, p.max_n, 1)
        _check_field(tenant, "messages", messages, p.max_messages, 0)
        _check_field(tenant, "stop", stop, p.max_stop, 0)
        _check_field(tenant, "prompt_chars", prompt_chars, p.max_prompt_chars, 0)
        if embedding_tokens is not None:
            _check_field(tenant, "embedding_tokens", embedding_tokens, p.max_embedding_tokens, 0)

    def enter(self, tenant: str, model: str, now: float) -> Admission:
        """Let one model call in before its prompt is tokenized: charge 1 request and take
        a concurrency slot, as ``admit`` would with no tokens yet (a tenant in tokens/minute
        debt is refused here too). ``admit(..., entered=)`` charges the tokens later, and
        ``release`` settles it either way: a call that never ran is released with 0, 0.

        Raises:
            PermissionDenied, RateLimited, BudgetExceeded: as ``admit``.
        """
        return self._open(tenant, model, 0, None, now)

    def admit(
        self,
        tenant: str,
        model: str,
        prompt_tokens: int,
        max_tokens: int | None,
        now: float,
        entered: Admission | None = None,
    ) -> Admission:
        """Admit one model call: charge 1 request and ``prompt_tokens`` to the rate limits.

        Checked in order: ACL, concurrency, budget, then requests/minute and tokens/minute
        together (nothing is charged unless all pass). ``max_tokens`` is recorded only; its
        cap is ``check_request_shape``'s. With ``entered`` (this call's ``enter``, still
        open), only the tokens/minute limit is checked and charged: the rest was at
        ``enter``. The returned admission replaces ``entered``; a refusal leaves
        ``entered`` open, for the caller to release.

        Raises:
            PermissionDenied (403): unknown tenant, or model outside its ACL.
            RateLimited (429): over concurrency, requests/minute or tokens/minute; carries
                ``retry_after_s``.
            BudgetExceeded (429): the budget of the current period is spent.
            InvalidRequest (400): negative ``prompt_tokens``.
        """
        if prompt_tokens < 0:
            raise InvalidRequest(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        state = self._tenants.get(tenant)
        if entered is None or state is None or entered.seq not in state.open:
            # Not entered, or its tenant's policy was replaced meanwhile: admit afresh.
            return self._open(tenant, model, prompt_tokens, max_tokens, now)
        self._check_tpm(state, prompt_tokens, now)
        if state.tpm is not None:
            state.tpm.charge(prompt_tokens, now)
        return dataclasses.replace(entered, estimate_tokens=prompt_tokens, max_tokens=max_tokens)

    def _open(
        self, tenant: str, model: str, prompt_tokens: int, max_tokens: int | None, now: float
    ) -> Admission:
        self.check_model(tenant, model)
        state = self._tenants[tenant]
        p = state.policy
        if p.max_concurrent is not None and len(state.open) >= p.max_concurrent:
            raise RateLimited(
                f"tenant {tenant!r} already has {len(state.open)} requests in flight, its limit "
                "of concurrent requests; retry when one finishes",
                retry_after_s=CONCURRENCY_RETRY_S,
                rule="concurrency",
            )
        if state.budget is not None and state.budget.exhausted(now):
            b = state.budget
            resets = b.resets_at(now)
            raise BudgetExceeded(
                f"tenant {tenant!r} has used its budget of {b.limit} tokens per "
                f"{_period(b.period_s)} ({b.spent} used); it resets at {_utc(resets)}, "
                f"in {_duration(resets - now)}",
                retry_after_s=max(0.0, resets - now),
            )
        rpm_wait = state.rpm.wait_s(1, now) if state.rpm is not None else 0.0
        tpm_wait = state.tpm.wait_s(prompt_tokens, now) if state.tpm is not None else 0.0
        if rpm_wait > 0 and rpm_wait >= tpm_wait:
            raise RateLimited(
                f"tenant {tenant!r} is over its {p.rpm} requests/minute limit; retry after "
                f"{_secs(rpm_wait)}",
                retry_after_s=rpm_wait,
                rule="rpm",
            )
        self._check_tpm(state, prompt_tokens, now, tpm_wait)
        if state.rpm is not None:
            state.rpm.charge(1, now)
        if state.tpm is not None:
            state.tpm.charge(prompt_tokens, now)
        self._seq += 1
        state.open.add(self._seq)
        return Admission(
            tenant, model, self._seq, prompt_tokens, max_tokens, now, p.priority, p.weight
        )

    @staticmethod
    def _check_tpm(
        state: _TenantState, prompt_tokens: int, now: float, wait: float | None = None
    ) -> None:
        if wait is None:
            wait = state.tpm.wait_s(prompt_tokens, now) if state.tpm is not None else 0.0
        if wait > 0:
            p = state.policy
            raise RateLimited(
                f"tenant {p.name!r} is over its {p.tpm} tokens/minute limit (this request: "
                f"{prompt_tokens} prompt tokens); retry after {_secs(wait)}",
                retry_after_s=wait,
                rule="tpm",
            )

    def release(
        self, admission: Admission, prompt_tokens: int, completion_tokens: int, now: float
    ) -> bool:
        """Settle an admission with the real token counts (0, 0 for a call that never ran).

        The tokens/minute bucket gets the difference to the estimate (a refund or a debt);
        the budget gets the real total. Idempotent: returns False (and does nothing) for an
        admission already released, or whose tenant was removed.
        """
        state = self._tenants.get(admission.tenant)
        if state is None or admission.seq not in state.open:
            return False
        state.open.discard(admission.seq)
        used = max(0, prompt_tokens) + max(0, completion_tokens)
        if state.tpm is not None:
            state.tpm.charge(used - admission.estimate_tokens, now)
        if state.budget is not None:
            state.budget.charge(used, now)
        return True

    def restore(
        self,
        tenant: str,
        now: float,
        *,
        budget_spent: int = 0,
        rate_events: Iterable[tuple[float, int, int]] = (),
    ) -> bool:
        """Set a tenant's counters from its durable usage, after a restart (see
        ``core.accounting``): the budget's current window has ``budget_spent`` tokens
        spent, and the rpm and tpm buckets are refilled and charged with ``rate_events``
        ``(at, requests, tokens)`` in time order, from full. Returns False (and does
        nothing) for a tenant without a policy.
        """
        state = self._tenants.get(tenant)
        if state is None:
            return False
        p = state.policy
        if state.budget is not None:
            state.budget.exhausted(now)  # rolls the window to ``now``'s
            state.budget.spent = max(0, budget_spent)
        state.rpm, state.tpm = _bucket(p.rpm), _bucket(p.tpm)
        for at, requests, tokens in rate_events:
            if state.rpm is not None and requests:
                state.rpm.charge(requests, at)
            if state.tpm is not None and tokens:
                state.tpm.charge(tokens, at)
        return True

    def adopt(
        self, tenant: str, model: str, prompt_tokens: int, admitted_at: float
    ) -> Admission | None:
        """Hold a concurrency slot again for a call admitted by a previous process that may
        still run (its ``open`` record has no ``settle``), without checking any limit: it
        was admitted already. ``release`` settles it as usual. None for a tenant without a
        policy.
        """
        state = self._tenants.get(tenant)
        if state is None:
            return None
        p = state.policy
        self._seq += 1
        state.open.add(self._seq)
        return Admission(
            tenant, model, self._seq, max(0, prompt_tokens), None, admitted_at, p.priority, p.weight
        )

    def near_limit(self, tenant: str, now: float, margin: float = 0.2) -> bool:
        """Whether the tenant has spent ``1 - margin`` of its budget or holds all its
        concurrency slots: then what it used should be made durable at once, so that a
        restart cannot forget the usage that refuses its next call."""
        state = self._tenants.get(tenant)
        if state is None:
            return False
        b, p = state.budget, state.policy
        if b is not None and b.limit - b.remaining(now) >= (1 - margin) * b.limit:
            return True
        return p.max_concurrent is not None and len(state.open) >= p.max_concurrent

    def in_flight(self, tenant: str) -> int:
        """Admissions of ``tenant`` not yet released (0 for an unknown tenant)."""
        state = self._tenants.get(tenant)
        return 0 if state is None else len(state.open)

    def usage(self, tenant: str, now: float) -> Usage:
        """The tenant's counters. Raises PermissionDenied if the tenant has no policy."""
        state = self._state(tenant)
        b = state.budget
        if b is None:
            return Usage(tenant, len(state.open), None, None, None)
        b.exhausted(now)  # rolls the window
        return Usage(tenant, len(state.open), b.spent, b.limit, b.resets_at(now))

    def _state(self, tenant: str) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            raise PermissionDenied(
                f"tenant {tenant!r} has no policy; an operator must add it to the spec",
                code="tenant_not_configured",
                rule="tenant",
            )
        return state


def _state(p: TenantPolicy, old: _TenantState | None) -> _TenantState:
    """The state of policy ``p``, keeping the counters of ``old`` whose limits are unchanged."""
    was = old.policy if old is not None else None
    rpm = old.rpm if old is not None and was is not None and was.rpm == p.rpm else _bucket(p.rpm)
    tpm = old.tpm if old is not None and was is not None and was.tpm == p.tpm else _bucket(p.tpm)
    budget = None
    if p.budget_tokens is not None:
        budget = Budget(p.budget_tokens, p.budget_period_s)
        if old is not None and old.budget is not None and old.budget.period_s == p.budget_period_s:
            # Same window: what was spent stays spent under the new limit.
            budget.spent, budget.window_start = old.budget.spent, old.budget.window_start
    return _TenantState(
        policy=p,
        models=_globs(p.models),
        graphs=_globs(p.graphs),
        rpm=rpm,
        tpm=tpm,
        budget=budget,
        open=set() if old is None else old.open,
    )


def _bucket(per_minute: int | None) -> TokenBucket | None:
    """A per-minute limit as a bucket that holds one minute's worth."""
    if per_minute is None:
        return None
    return TokenBucket(per_minute / 60.0, float(per_minute))


def allows(patterns: Sequence[str], name: str) -> bool:
    """Whether an ACL of glob patterns lets ``name`` through (no patterns: everything),
    as ``check_model`` and ``check_graph`` decide it."""
    pattern = _globs(tuple(patterns))
    return pattern is None or pattern.fullmatch(name) is not None


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for a list of glob patterns (None: no list, everything allowed)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in patterns))


def _check_field(tenant: str, name: str, value: int, limit: int | None, least: int) -> None:
    if value < least:
        raise RequestLimitExceeded(f"{name} must be at least {least}, got {value}", rule=name)
    if limit is not None and value > limit:
        raise RequestLimitExceeded(
            f"{name} {value} is over the limit of {limit} for tenant {tenant!r}", rule=name
        )


_PERIODS = {60.0: "minute", 3600.0: "hour", DAY_S: "day", 7 * DAY_S: "week"}


def _period(period_s: float) -> str:
    return _PERIODS.get(period_s) or f"{_duration(period_s)}"


def _utc(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # a clock that is not epoch seconds
        return f"t={t:.0f}"


def _secs(s: float) -> str:
    return f"{max(s, 0.1):.1f}s" if s < 60 else _duration(s)


def _duration(s: float) -> str:
    s = max(0, math.ceil(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s"
    return f"{sec}s"
