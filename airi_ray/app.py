"""An app's lifecycle on a Ray cluster: join it, deploy a spec, connect, shut the app down.

The top of the package: ``deploy`` reaches every layer (the controller, graphs, the
ingress) and ``connect`` returns a ``Client`` (handing it ``deploy``), so this module imports
the client, and nothing below imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from airi_ray.client import Client
from airi_ray.config import AppSpec, load_spec, parse_spec
from airi_ray.core.errors import InvalidRequest
from airi_ray.graphs import _function, build_graph, run_builder
from airi_ray.runtime import cluster_kv, launch
from airi_ray.runtime.backend import BackendThread, _get, pickle_graph
from airi_ray.runtime.controller import Controller
from airi_ray.runtime.names import (
    CONTEXT_STORE_NAME,
    CONTROLLER_NAME,
    FEATURE_SERVER_NAME,
    GRAPH_EXECUTOR_NAME,
    NAMESPACE,
    SCHEDULER_NAME,
    get_actor,
)


def init_ray(address: str | None = "auto") -> None:
    """Join the Ray cluster at ``address`` ("auto": the local one) unless already joined."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


def connect(address: str | None = "auto", api_key: str | None = None) -> Client:
    """Connect to a running airi app on the Ray cluster at ``address``.

    Raises:
        InvalidRequest: no airi app runs there (start one with ``airi up``).
    """
    init_ray(address)
    try:
        get_actor(CONTROLLER_NAME)
    except ValueError:
        raise InvalidRequest(
            "no airi app is running on this Ray cluster; start one with `airi up`"
        ) from None
    return Client(api_key, deploy=deploy)


def deploy(spec: AppSpec | dict[str, Any] | str | Path, wait: bool = True) -> dict[str, Any]:
    """Deploy an app spec on the connected Ray cluster: models, graphs, then the HTTP ingress.

    Raises:
        InvalidRequest: the spec is invalid, or a model failed to start (with its error).
    """
    if isinstance(spec, (str, Path)):
        app = load_spec(spec)
    elif isinstance(spec, AppSpec):
        app = spec
    else:
        app = parse_spec(spec)

    # Built here, where the spec's `module:function` names import, and before anything
    # changes on the cluster, so a graph that does not compile changes nothing. Graphs
    # with a builder are built once the models are ready (the builder may use them).
    graphs = [build_graph(g) for g in app.graphs if g.builder is None]
    builders = [g for g in app.graphs if g.builder is not None]
    for g in builders:
        _function(g.builder)  # an import error, before anything changes
    init_ray(None)
    controller = launch.start_singleton(Controller, CONTROLLER_NAME)
    status = _get(controller.deploy.remote(app.model_dump(), wait or bool(builders)))
    graphs += [run_builder(g, app, BackendThread()) for g in builders]
    if graphs:
        executor = launch.get_or_start_graph_executor()
        ray.get([executor.register.remote(pickle_graph(g)) for g in graphs])
    if app.ingress.enabled:
        # Serve, FastAPI and vLLM's protocol models load only for an app with an ingress.
        from airi_ray.serve.ingress import run_ingress

        run_ingress(app.ingress)
    return status


def shutdown() -> None:
    """Stop the app: ingress, replicas, scheduler and controller (the Ray cluster stays)."""
    from ray import serve

    try:
        serve.shutdown()
    except Exception:
        pass
    cluster_kv.delete_graphs()
    names = (
        CONTROLLER_NAME,
        SCHEDULER_NAME,
        GRAPH_EXECUTOR_NAME,
        CONTEXT_STORE_NAME,
        FEATURE_SERVER_NAME,
    )
    for name in names:
        try:
            handle = get_actor(name)
        except ValueError:
            continue
        if name == CONTROLLER_NAME:
            try:
                ray.get(handle.shutdown.remote(), timeout=60)
            except Exception:
                pass
        ray.kill(handle, no_restart=True)
    # Replicas are detached (they outlive a crashed controller): whatever the controller
    # could not stop goes now, with the pools.
    left = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    ]
    handles = []
    for name in left:
        try:
            handles.append(get_actor(name))
        except ValueError:
            pass
    # A replica stops its engine processes itself (killed, it would leave them running).
    stops = [h.shutdown.remote() for h in handles if hasattr(h, "shutdown")]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=30)
    for h in handles:
        ray.kill(h, no_restart=True)
