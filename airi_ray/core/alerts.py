"""Alerts: the record of a drift or anomaly, when one may fire, and a bounded log of them.

An ``Alert`` is plain data (it pickles, and ``to_dict`` gives JSON for ``airi alerts``, the
metrics and the webhook): what happened (``kind``), how bad (``severity``), where (model,
version, replica) and the numbers behind it (``evidence``). Its id is derived from its
content, so the same alert rebuilt after a restart keeps its id.

``AlertGate`` is the rule shared by every score-based alert: one alert per level per
episode, and a cooldown between episodes, so a lasting shift raises one alert rather than
one per request. ``AlertLog`` keeps the latest alerts in a ring buffer, plus totals that
survive eviction for the metrics.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")  # least severe first

AlertKind = Literal[
    "drift.embedding",
    "drift.prompt_length",
    "drift.output_length",
    "drift.refusal_rate",
    "anomaly.latency",
    "anomaly.error_rate",
]
ALERT_KINDS: tuple[AlertKind, ...] = (
    "drift.embedding",
    "drift.prompt_length",
    "drift.output_length",
    "drift.refusal_rate",
    "anomaly.latency",
    "anomaly.error_rate",
)

_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_rank(severity: Severity) -> int:
    """0 for ``info``, 1 for ``warning``, 2 for ``critical``."""
    return _RANK[severity]


@dataclass(frozen=True)
class Alert:
    """One drift or anomaly event.

    Attributes:
        id: stable id (see ``make_alert``).
        at: when it was raised, on the caller's clock (seconds).
        kind: one of ``ALERT_KINDS``.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        model, version: the deployment it concerns.
        replica: the replica for per-replica anomalies, None for drift (model-wide).
        message: one human sentence with the figures that matter.
        evidence: the numbers behind it (scores, thresholds, sample sizes); finite floats.

    Raises:
        ValueError: unknown kind or severity, or a non-finite evidence value.
    """

    id: str
    at: float
    kind: AlertKind
    severity: Severity
    model: str
    version: str
    replica: str | None
    message: str
    # Not hashed: a dict is not hashable, and the id already identifies the alert.
    evidence: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(
                f"alert kind must be one of {', '.join(ALERT_KINDS)}; got {self.kind!r}"
            )
        if self.severity not in _RANK:
            raise ValueError(
                f"alert severity must be one of {', '.join(SEVERITIES)}; got {self.severity!r}"
            )
        evidence = {str(k): float(v) for k, v in self.evidence.items()}
        bad = sorted(k for k, v in evidence.items() if not math.isfinite(v))
        if bad:
            # JSON has no NaN or infinity, and the webhook and `airi alerts` speak JSON.
            raise ValueError(f"alert evidence must be finite numbers; {', '.join(bad)} are not")
        # A private copy, so the caller's dict changing later does not change the alert.
        object.__setattr__(self, "evidence", evidence)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, evidence as a plain dict."""
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "severity": self.severity,
            "model": self.model,
            "version": self.version,
            "replica": self.replica,
            "message": self.message,
            "evidence": dict(self.evidence),
        }


def make_alert(
    *,
    at: float,
    kind: AlertKind,
    severity: Severity,
    model: str,
    version: str,
    replica: str | None = None,
    message: str,
    evidence: Mapping[str, float],
) -> Alert:
    """An ``Alert`` whose id is a hash of its content (16 hex digits).

    Deterministic, so tests and restarted monitors reproduce the same ids; two alerts get
    the same id only if they agree on every field, time included.
    """
    key = repr((at, kind, severity, model, version, replica, message, sorted(evidence.items())))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Alert(digest, at, kind, severity, model, version, replica, message, evidence)


@dataclass(slots=True)
class AlertGate:
    """Whether a score-based alert fires now: once per level per episode, cooldown between.

    Feed it, at every check, the level the score is at (None when it is below every
    threshold). It says to fire when the level rises above the one already raised in the
    current episode: the first crossing, or an escalation (``info`` then ``warning``),
    which fires at once because it is news. The episode ends when the level falls back to
    None. A new episode fires only if ``cooldown_s`` has passed since the last alert, so a
    score flapping around its threshold raises at most one alert per cooldown; a score that
    stays high raises nothing more.
    """

    cooldown_s: float
    raised: Severity | None = None
    last_at: float | None = None

    def update(self, now: float, level: Severity | None) -> bool:
        """Record the level at ``now``; True if an alert should be raised for it."""
        if level is None:
            self.raised = None
            return False
        if self.raised is not None:
            if _RANK[level] <= _RANK[self.raised]:
                return False
        elif self.last_at is not None and now - self.last_at < self.cooldown_s:
            return False  # not recorded as raised: it fires after the cooldown if it lasts
        self.raised = level
        self.last_at = now
        return True


class AlertLog:
    """The latest ``capacity`` alerts, and totals by (kind, severity) since it was created.

    Raises:
        ValueError: ``capacity`` is not positive.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._alerts: deque[Alert] = deque(maxlen=capacity)
        self._counts: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._alerts)

    def add(self, alert: Alert) -> None:
        """Append an alert; the oldest one is dropped beyond ``capacity``."""
        self._alerts.append(alert)
        key = (alert.kind, alert.severity)
        self._counts[key] = self._counts.get(key, 0) + 1

    def recent(
        self, n: int = 50, severity: Severity | None = None, model: str | None = None
    ) -> list[Alert]:
        """Up to ``n`` alerts, newest first.

        Args:
            severity: keep alerts at least this severe (``"warning"`` keeps warnings and
                critical alerts), None for all.
            model: keep alerts of this model, None for all.

        Raises:
            ValueError: ``n`` is negative or ``severity`` is unknown.
        """
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        if severity is not None and severity not in _RANK:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}; got {severity!r}")
        floor = _RANK[severity] if severity is not None else 0
        out: list[Alert] = []
        for alert in reversed(self._alerts):
            if len(out) >= n:
                break
            if _RANK[alert.severity] >= floor and (model is None or alert.model == model):
                out.append(alert)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """Alerts added so far by (kind, severity), evicted ones included: for a counter."""
        return dict(self._counts)
