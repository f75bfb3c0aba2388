"""Pure decision logic of airi_ray.

Nothing here imports ray, asyncio, a network or a disk library: every decision is a
function or a small object fed with data (and the clock as an argument), so it is unit
tested without a cluster. The Ray actors in ``airi_ray.runtime`` wrap these objects.
"""

from airi_ray.core.errors import (
    AiriError,
    AuthenticationError,
    ContextWindowExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ReplicaUnavailable,
)

__all__ = [
    "AiriError",
    "AuthenticationError",
    "ContextWindowExceeded",
    "InvalidRequest",
    "ModelNotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ReplicaUnavailable",
]
