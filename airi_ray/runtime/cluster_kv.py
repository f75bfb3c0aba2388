"""Every read and write of Ray's internal KV store: the deployed spec, the API key
records, the graphs registered from Python, the ingress settings.

The KV store lives in the cluster's GCS, so what is kept here outlives any actor: a
restarted actor reads the last deployed spec back from it.
"""

from __future__ import annotations

import json
from typing import Any

import ray

from airi_ray.config import AppSpec, parse_spec

SPEC_KEY = b"airi/app_spec"  # the deployed spec, without its API keys
KEYS_KEY = b"airi/api_keys"  # key records (salted hashes): the spec's and `airi keys`'s
GRAPHS_KEY = "airi/graphs/"  # prefix: graphs registered from Python (pickled)


def get(key: bytes | str) -> bytes | None:
    """The value under ``key``, None when there is none."""
    value: bytes | None = ray.experimental.internal_kv._internal_kv_get(key)
    return value


def put(key: bytes | str, value: bytes) -> None:
    ray.experimental.internal_kv._internal_kv_put(key, value)


def delete(key: bytes | str) -> None:
    ray.experimental.internal_kv._internal_kv_del(key)


def keys(prefix: bytes | str) -> list[bytes]:
    """The keys that start with ``prefix``."""
    found: list[bytes] = ray.experimental.internal_kv._internal_kv_list(prefix)
    return found


def saved_spec_dict() -> dict[str, Any] | None:
    """The last deployed spec (without its keys) as the controller saved it, unparsed."""
    saved = get(SPEC_KEY)
    return json.loads(saved) if saved else None


def saved_spec() -> AppSpec | None:
    """The last deployed spec (without its keys), as the controller saved it."""
    saved = saved_spec_dict()
    return parse_spec(saved, source="saved spec") if saved is not None else None


def save_spec(spec: AppSpec) -> None:
    """Keep the deployed spec (without its keys) for restarted actors."""
    put(SPEC_KEY, spec.model_dump_json().encode())


def delete_spec() -> None:
    delete(SPEC_KEY)


def saved_keys() -> dict[str, Any] | None:
    """The key records the controller saved (``runtime.keys``), unparsed."""
    saved = get(KEYS_KEY)
    return json.loads(saved) if saved else None


def save_keys(data: dict[str, Any]) -> None:
    put(KEYS_KEY, json.dumps(data).encode())


def delete_keys() -> None:
    delete(KEYS_KEY)


def save_graph(name: str, blob: bytes) -> None:
    """Keep a pickled graph, so that a restarted executor registers it again."""
    put(GRAPHS_KEY + name, blob)


def saved_graphs() -> list[tuple[bytes, bytes]]:
    """The pickled graphs registered from Python, with their keys."""
    found = []
    for key in keys(GRAPHS_KEY):
        blob = get(key)
        if blob:
            found.append((key, blob))
    return found


def delete_graphs() -> None:
    for key in keys(GRAPHS_KEY):
        delete(key)
