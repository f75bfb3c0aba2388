"""airi-ray: an AI runtime on Ray.

Models on vLLM replicas, one scheduler for every model call, an OpenAI-compatible HTTP
API and Python handles::

    import airi_ray as airi
    client = airi.connect("auto", api_key="...")
    client.chat("tiny-chat", "How long do returns take?").text

The public names load lazily, so ``import airi_ray.core`` stays free of Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncClient": "airi_ray.client",
    "Client": "airi_ray.client",
    "Completion": "airi_ray.runtime.backend",
    "connect": "airi_ray.app",
    "deploy": "airi_ray.app",
    "shutdown": "airi_ray.app",
    "AppSpec": "airi_ray.config",
    "ModelSpec": "airi_ray.config",
    "TenantSpec": "airi_ray.config",
    "load_spec": "airi_ray.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'airi_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
