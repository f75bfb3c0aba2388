"""The errors a policy decision raises, on top of the typed errors in ``airi_ray.core.errors``.

Each carries ``rule``, the name of the policy rule that refused (``"model_acl"``, ``"rpm"``,
``"budget"``, ``"email"``...), so the caller can write an audit event and count the refusal
without parsing the message. Like every ``AiriError`` they pickle to the same type, with
their extra fields, so a refusal raised inside a Ray actor reaches the ingress intact.
"""

from __future__ import annotations

from typing import Any

from airi_ray.core.errors import AiriError, InvalidRequest, Overloaded


def _rebuild(cls: type[AiriError], message: str, kwargs: dict[str, Any]) -> AiriError:
    return cls(message, **kwargs)


class PermissionDenied(AiriError):
    """403: the tenant may not use this model or graph (or has no policy at all)."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"

    def __init__(self, message: str, *, code: str | None = None, rule: str = "model_acl") -> None:
        super().__init__(message, code=code)
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, {"code": self.code, "rule": self.rule}))


class ContentBlocked(AiriError):
    """A content filter configured to block matched the text: 400 or 403, per the filter."""

    status = 400
    type = "invalid_request_error"
    code = "content_filtered"

    def __init__(
        self, message: str, *, code: str | None = None, rule: str = "content", status: int = 400
    ) -> None:
        if status not in (400, 403):
            raise ValueError(f"a blocked request answers 400 or 403, not {status}")
        super().__init__(message, code=code)
        self.rule = rule
        self.status = status
        self.type = "invalid_request_error" if status == 400 else "permission_error"

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"code": self.code, "rule": self.rule, "status": self.status}
        return (_rebuild, (type(self), self.message, kwargs))


class RateLimited(Overloaded):
    """429: over a requests/minute, tokens/minute or concurrency limit of the tenant."""

    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        rule: str = "rpm",
    ) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"code": self.code, "retry_after_s": self.retry_after_s, "rule": self.rule}
        return (_rebuild, (type(self), self.message, kwargs))


class BudgetExceeded(RateLimited):
    """429: the tenant spent its token budget for the current period."""

    code = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        rule: str = "budget",
    ) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s, rule=rule)


class RequestLimitExceeded(InvalidRequest):
    """400: a request field (``max_tokens``, ``n``, stop list, messages...) is over its limit."""

    code = "request_limit_exceeded"

    def __init__(self, message: str, *, code: str | None = None, rule: str = "request") -> None:
        super().__init__(message, code=code)
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, {"code": self.code, "rule": self.rule}))
