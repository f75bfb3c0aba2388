"""Tenant accounting rebuilt from durable usage records, after a scheduler restart.

The scheduler keeps budgets, the requests/minute and tokens/minute buckets, the VTC
fairness counters and the tenants' admissions in flight in memory (``policy.engine``,
``fairness``). It also writes, in batches, one ``UsageRecord`` per admission (``open``;
for a tenant with a tokens/minute limit a second one once the prompt is counted) and one
per settled call (``settle``); a restarted scheduler loads the records still needed and
``rebuild`` turns them into what to restore:

- **Budgets**: a tenant's spent tokens in its current budget window are the sum of its
  ``settle`` records in that window (``floor(at / period) * period``, as ``Budget``
  rolls). A budget added to a tenant's policy while the scheduler runs starts at 0 in
  memory, but a restart counts every record of the window: the durable count is the
  truth. Records older than ``recent_since`` are only summed (``earlier_windows``; the
  storage adds them up), so a daily budget is not rebuilt from a day of rows one by one.
- **Rate buckets**: ``rpm`` and ``tpm`` are token buckets, whose level is a function of
  their history. ``rate_events`` gives the charges of the last ``RATE_HORIZON_S`` seconds
  in time order (1 request at each admission; at each settle the call's real tokens, and
  for a call still open its prompt estimate); replaying them into a full bucket gives
  the level the killed scheduler had, unless a debt older than the horizon was still
  being paid off (a bucket refills its whole burst in one minute, so only a single call
  of more than four minutes' worth of tokens leaves such a debt).
- **VTC counters**: a counter is the tenant's weighted service (``(prompt + w * completion)
  / weight``) plus the lifts VTC gave it on arrival; the lifts are not usage and are not
  recorded, so the counters themselves cannot be replayed. What fairness needs is their
  difference among the tenants that compete: VTC serves the smallest counter, so only
  differences matter. ``counters`` restores, per model, each tenant's weighted service of
  the last ``FAIRNESS_WINDOW_S`` seconds minus the smallest such service on that model.
  After a restart every queue is empty, so every tenant arrives anew, and VTC lifts an
  arriving tenant to the smallest counter of those already backlogged. So a restored
  counter can only keep a tenant that was ahead waiting until the tenants it was ahead of
  caught up (if they come back first, as they would have been served without the kill);
  it never gives a tenant more credit than VTC gives any arrival, so nobody banks idle
  time through a restart. Tenants backlogged from the restart on get VTC's usual bound
  (their service within 2U of each other, U the largest request cost); across the kill,
  a tenant that was behind may lose what it was owed, which between backlogged tenants
  is itself within that bound. Counters reset to 0 would give the same bound but would
  let a tenant that had just run ahead run ahead again. Service older than the window is
  forgotten, which only narrows differences.
- **Admissions in flight** (concurrency): in-flight calls are not usage, but their
  ``open`` record without a ``settle`` says which requests may still run. ``open`` lists
  them; the scheduler holds their concurrency slots again until their caller's heartbeat
  names them (they keep running; their release charges the real tokens) or a grace
  period passes without any caller naming them (their release was lost with the old
  process: they are settled with their prompt estimate). So a tenant never runs more than
  its limit plus the admissions whose ``open`` record was not yet written at the kill.

Records come in batches, so a kill loses at most the batch not yet written; the
scheduler writes at once when a tenant nears its budget or concurrency limit (see
``near_limit``), which narrows that to one write's latency where it matters.

The clock (``now``, wall-clock seconds, the clock budgets reset on) is an argument.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from airi_ray.core.policy.engine import TenantPolicy

Kind = Literal["open", "settle"]
KINDS: tuple[Kind, ...] = ("open", "settle")

RATE_HORIZON_S = 300.0  # rate charges replayed into the rpm / tpm buckets
FAIRNESS_WINDOW_S = 300.0  # service that restores the VTC counters
OPEN_HORIZON_S = 3600.0  # an open admission older than this is not taken to be running


class UsageRecord(NamedTuple):
    """One admission (``open``) or one settled call (``settle``) of a tenant.

    A named tuple, not a dataclass: the scheduler makes two per call on its hot path, and
    a tuple is what the log writes. The scheduler makes them from its own admissions, so
    they are not validated here (``rebuild`` skips an unknown kind).

    Attributes:
        kind: ``"open"`` when a call is admitted (its concurrency slot taken; its prompt
            estimate, 0 before tokenization), ``"settle"`` when it ends with its real
            token counts (0, 0 for a call that never ran).
        request_id: the call's id; a ``settle`` closes the ``open`` with the same id.
        tenant, model: who pays, and what was called.
        prompt_tokens, completion_tokens: real counts (``settle``) or the estimate
            (``open``, prompt only), never negative.
        admitted_at: when the call was admitted (wall-clock seconds).
        at: when the record was made: the admission, or the settle.
    """

    kind: Kind
    request_id: str
    tenant: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    admitted_at: float
    at: float

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class RateEvent(NamedTuple):
    """One charge to a tenant's rate buckets: ``requests`` to rpm, ``tokens`` to tpm (a
    tuple, as ``PolicyEngine.restore`` takes it)."""

    at: float
    requests: int
    tokens: int


@dataclass(frozen=True)
class Accounting:
    """What a restarted scheduler restores (see the module docstring).

    Attributes:
        budget_spent: per tenant with a budget, tokens spent in its current window.
        rate_events: per tenant with rpm or tpm, its charges of the rate horizon, in order.
        counters: per model, per tenant: the VTC counter to restore (the smallest is 0).
        open: admissions without a settle (possibly still running), by request id.
    """

    budget_spent: dict[str, int] = field(default_factory=dict)
    rate_events: dict[str, list[RateEvent]] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    open: dict[str, UsageRecord] = field(default_factory=dict)


def budget_window_start(period_s: float, now: float) -> float:
    """The start of the budget window ``now`` is in, as ``Budget`` computes it."""
    return math.floor(now / period_s) * period_s


def recent_since(now: float) -> float:
    """The oldest ``at`` whose records a rebuild needs one by one (rate charges, service,
    open admissions); before it, only each budget's total counts (``earlier_windows``)."""
    return now - max(RATE_HORIZON_S, FAIRNESS_WINDOW_S, OPEN_HORIZON_S)


def earlier_windows(policies: Iterable[TenantPolicy], now: float) -> dict[str, float]:
    """Per tenant whose budget window began before ``recent_since(now)``: that start. Its
    settled tokens from there to ``recent_since`` are a total the storage can sum (see
    ``rebuild``'s ``earlier``), instead of a day's records read one by one."""
    recent = recent_since(now)
    out = {}
    for p in policies:
        if p.budget_tokens is not None:
            start = budget_window_start(p.budget_period_s, now)
            if start < recent:
                out[p.name] = start
    return out


def keep_since(policies: Iterable[TenantPolicy], now: float) -> float:
    """The oldest ``at`` a rebuild at ``now`` reads: records before it may be pruned.

    The longest of: each budget's current window, the rate horizon, the fairness window
    and the open horizon.
    """
    since = recent_since(now)
    for p in policies:
        if p.budget_tokens is not None:
            since = min(since, budget_window_start(p.budget_period_s, now))
    return since


def rebuild(
    records: Iterable[UsageRecord],
    policies: Iterable[TenantPolicy],
    now: float,
    *,
    output_weight: float = 2.0,
    since: float = -math.inf,
    earlier: Mapping[str, int] | None = None,
) -> Accounting:
    """Turn the usage records into the accounting state at ``now``.

    Args:
        records: the records since ``keep_since`` (older ones are ignored), any order; a
            record repeated (a batch written twice after a retry) counts once.
        policies: the tenants' current policies (records of other tenants are ignored:
            an unknown tenant is refused anyway).
        now: wall-clock seconds.
        output_weight: the scheduler's cost of an output token in the VTC counters.
        since, earlier: to read fewer records: ``records`` are only those made at or
            after ``since`` (older ones are ignored), and ``earlier`` gives per tenant its
            settled tokens in its budget window before ``since`` (``earlier_windows``
            names the windows; the storage sums them). ``since`` should be
            ``recent_since(now)`` or older.

    Raises:
        ValueError: ``output_weight`` is negative.
    """
    if output_weight < 0:
        raise ValueError(f"output_weight must not be negative, got {output_weight}")
    by_tenant = {p.name: p for p in policies}
    opens: dict[str, UsageRecord] = {}
    settles: dict[str, UsageRecord] = {}
    for r in records:
        if r.tenant not in by_tenant or r.at > now or r.at < since or r.kind not in KINDS:
            continue
        book = opens if r.kind == "open" else settles
        seen = book.get(r.request_id)
        if seen is None or r.at >= seen.at:  # the latest open carries the prompt estimate
            book[r.request_id] = r

    spent: dict[str, int] = defaultdict(int)
    for tenant, tokens in (earlier or {}).items():
        p = by_tenant.get(tenant)
        if p is not None and p.budget_tokens is not None and tokens:
            spent[tenant] += tokens
    events: dict[str, list[RateEvent]] = defaultdict(list)
    service: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    rate_since = now - RATE_HORIZON_S
    for r in settles.values():
        p = by_tenant[r.tenant]
        if p.budget_tokens is not None and r.at >= budget_window_start(p.budget_period_s, now):
            spent[r.tenant] += r.tokens
        if p.rpm is not None or p.tpm is not None:
            if r.admitted_at >= rate_since:
                events[r.tenant].append(RateEvent(r.admitted_at, 1, 0))
            if r.at >= rate_since and r.tokens:
                events[r.tenant].append(RateEvent(r.at, 0, r.tokens))
        if r.at >= now - FAIRNESS_WINDOW_S:
            cost = (r.prompt_tokens + output_weight * r.completion_tokens) / p.weight
            service[r.model][r.tenant] += cost
    still_open: dict[str, UsageRecord] = {}
    for rid, r in opens.items():
        settled = settles.get(rid)
        # A settle closes the admissions made before it; one made after it (the id let in
        # again, say after its entry was handed back) is open.
        if (settled is not None and settled.at >= r.at) or r.admitted_at < now - OPEN_HORIZON_S:
            continue
        still_open[rid] = r
        p = by_tenant[r.tenant]
        if (p.rpm is not None or p.tpm is not None) and r.admitted_at >= rate_since:
            events[r.tenant].append(RateEvent(r.admitted_at, 1, r.prompt_tokens))
    counters: dict[str, dict[str, float]] = {}
    for model, tenants in service.items():
        floor = min(tenants.values())
        counters[model] = {t: c - floor for t, c in sorted(tenants.items())}
    return Accounting(
        budget_spent=dict(spent),
        rate_events={t: sorted(e, key=lambda x: x.at) for t, e in events.items()},
        counters=counters,
        open=still_open,
    )


def summarize(acc: Accounting, limits: Mapping[str, int | None]) -> str:
    """One log line: what was restored (budgets against their limits, open admissions)."""
    budgets = ", ".join(f"{t} {n}/{limits.get(t)}" for t, n in sorted(acc.budget_spent.items()))
    return (
        f"budgets spent: {budgets or 'none'}; {len(acc.open)} admissions possibly in flight; "
        f"VTC counters of {sum(len(c) for c in acc.counters.values())} tenant-models"
    )
