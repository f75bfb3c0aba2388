"""Audit records: what a filter found and what a policy refused, never the text itself.

A ``Finding`` is a filter's summary of one rule on one text (rule name, action, count); an
``AuditEvent`` adds who and where (tenant, model, request id). Neither ever holds the API
key, the matched PII or the blocked phrase, so the actor can log and count them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from airi_ray.core.errors import AiriError

# off: rule disabled; flag: record a finding only; redact: replace the match; block: refuse.
Action = Literal["off", "flag", "redact", "block"]
ACTIONS: tuple[Action, ...] = ("off", "flag", "redact", "block")

AuditAction = Literal["refuse", "block", "redact", "flag"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that matched a text: its name, what was done, and how many matches."""

    rule: str
    action: Action
    count: int


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One refusal, block, redaction or flag, as the actor logs and counts it."""

    tenant: str
    model: str
    rule: str
    action: AuditAction
    request_id: str
    count: int = 1


def refusal_event(error: AiriError, *, tenant: str, model: str, request_id: str) -> AuditEvent:
    """The audit event for a policy error (ACL, rate limit, budget, request shape, filter).

    The rule is the error's ``rule`` (every error of ``airi_ray.core.policy`` has one),
    else its code; the action is ``"block"`` for a content filter and ``"refuse"`` otherwise.
    """
    rule = getattr(error, "rule", None) or error.code or type(error).__name__
    action: AuditAction = "block" if error.code == "content_filtered" else "refuse"
    return AuditEvent(tenant, model, str(rule), action, request_id)


def finding_events(
    findings: tuple[Finding, ...], *, tenant: str, model: str, request_id: str
) -> tuple[AuditEvent, ...]:
    """The audit events for the findings of a filter run (redactions and flags)."""
    events = []
    for f in findings:
        action: AuditAction = "redact" if f.action == "redact" else "flag"
        if f.action == "block":
            action = "block"
        events.append(AuditEvent(tenant, model, f.rule, action, request_id, f.count))
    return tuple(events)
