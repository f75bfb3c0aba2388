"""Typed errors that reach users.

Each error carries the HTTP status, the OpenAI error ``type`` and ``code`` it maps to, and
a message that says what was wrong and what is allowed. They pickle cleanly, so an error
raised inside a Ray actor arrives at the caller as the same type.
"""

from __future__ import annotations

from typing import Any


class AiriError(Exception):
    """Base of every user-facing airi error."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code))

    def to_body(self) -> dict[str, dict[str, Any]]:
        """The OpenAI error body: ``{"error": {"message", "type", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def _rebuild(cls: type[AiriError], message: str, code: str | None) -> AiriError:
    return cls(message, code=code)


class InvalidRequest(AiriError):
    status = 400
    type = "invalid_request_error"


class ContextWindowExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(AiriError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(AiriError):
    """No such object for this tenant (another tenant's objects are "not found" too, so
    their ids cannot be probed)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(AiriError):
    """An idempotency key reused for different content."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Fenced(Conflict):
    """A write from an execution of a graph run that has since lost its claim on the run
    (another executor resumed it): the write is refused, and that execution stops."""

    code = "fenced"


class ModelNotFound(NotFound):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(AiriError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(AiriError):
    """A bounded queue (the tenant's or the model's) is full; the caller should retry later.

    ``retry_after_s`` is the scheduler's hint for the HTTP ``Retry-After`` header (None when
    it has no estimate); it survives pickling, so it reaches the ingress from the actor.
    """

    status = 429
    type = "overloaded_error"
    code = "queue_full"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_overloaded, (type(self), self.message, self.code, self.retry_after_s))


def _rebuild_overloaded(
    cls: type[Overloaded], message: str, code: str | None, retry_after_s: float | None
) -> Overloaded:
    return cls(message, code=code, retry_after_s=retry_after_s)


class StaleState(AiriError):
    """Policy state (the API key ring) could not be refreshed for longer than it may be
    used: the request is refused rather than judged by revoked or missing keys."""

    status = 503
    type = "service_unavailable"
    code = "stale_policy_state"


class ReplicaUnavailable(AiriError):
    """No ready replica could serve the request (none deployed, or all failed)."""

    status = 503
    type = "service_unavailable"
    code = "no_ready_replica"


class SchedulerStarting(ReplicaUnavailable):
    """The scheduler was restarted and has not yet been given the app's spec and replicas:
    callers wait and ask again (``core.retries.scheduler_retry_delay``), so a restart
    refuses no call that the scheduler would have served."""

    code = "scheduler_starting"
