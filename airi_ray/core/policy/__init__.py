"""Inference-time policy, pure: keys, tenant limits, content filters and audit records.

The shell (the scheduler actor and the ingress) owns one ``KeyRing``, one
``PolicyEngine`` and a ``FilterSet`` per tenant and model, and calls them on every model
call, passing the clock as ``now``:

- at the edge: ``KeyRing.authenticate(key, now)`` names the tenant (401 otherwise);
- at admission: ``PolicyEngine.check_request_shape``, ``PolicyEngine.admit`` and
  ``FilterSet.check_input`` on the prompt (and on retrieved documents);
- per streamed chunk: ``StreamFilter.feed``, then ``finish``; or ``check_output``;
- at release: ``PolicyEngine.release`` with the real token counts.

Refusals raise the typed errors of ``errors.py`` (403, 429 with ``retry_after_s``, 400);
``refusal_event`` and ``finding_events`` turn refusals and findings into ``AuditEvent``s.
"""

from airi_ray.core.policy.audit import (
    ACTIONS,
    Action,
    AuditEvent,
    Finding,
    finding_events,
    refusal_event,
)
from airi_ray.core.policy.engine import Admission, PolicyEngine, TenantPolicy, Usage, allows
from airi_ray.core.policy.errors import (
    BudgetExceeded,
    ContentBlocked,
    PermissionDenied,
    RateLimited,
    RequestLimitExceeded,
)
from airi_ray.core.policy.filters import (
    FilterConfig,
    FilterResult,
    FilterSet,
    StreamFilter,
    filter_turns,
    iban_valid,
    luhn_valid,
)
from airi_ray.core.policy.heuristics import (
    InjectionHeuristic,
    InjectionScore,
    SemanticFilter,
    semantic_windows,
)
from airi_ray.core.policy.keys import (
    KEY_PREFIX,
    MAX_KEY_CHARS,
    KeyRecord,
    KeyRing,
    hash_key,
    new_key,
    new_salt,
    parse_key_id,
)
from airi_ray.core.policy.limits import Budget, TokenBucket

__all__ = [
    "ACTIONS",
    "Action",
    "Admission",
    "AuditEvent",
    "Budget",
    "BudgetExceeded",
    "ContentBlocked",
    "FilterConfig",
    "FilterResult",
    "FilterSet",
    "Finding",
    "InjectionHeuristic",
    "InjectionScore",
    "KEY_PREFIX",
    "KeyRecord",
    "KeyRing",
    "MAX_KEY_CHARS",
    "PermissionDenied",
    "PolicyEngine",
    "RateLimited",
    "RequestLimitExceeded",
    "SemanticFilter",
    "semantic_windows",
    "StreamFilter",
    "TenantPolicy",
    "TokenBucket",
    "Usage",
    "allows",
    "filter_turns",
    "finding_events",
    "hash_key",
    "iban_valid",
    "luhn_valid",
    "new_key",
    "new_salt",
    "parse_key_id",
    "refusal_event",
]
