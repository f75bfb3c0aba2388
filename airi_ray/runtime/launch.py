"""The one place ``ray.remote`` is applied, with options taken from the app spec.

The actor classes (``ModelReplica``, ``GlobalScheduler``, ``ContextStore``, ``GraphExecutor``,
``FeatureServer``, ``Observer``, ``AcceleratorPool``, ``Controller``) are plain Python classes;
this module turns them into named Ray actors. Only the controller (which starts the app's
actors) and the app layer (which starts the controller) import it; everything else finds
an actor by name (``airi_ray.runtime.names``). The ``Controller`` class imports this module,
so ``start_singleton`` takes it from the caller instead of importing it.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from airi_ray.config import ModelSpec
from airi_ray.runtime.context_store import ContextStore
from airi_ray.runtime.feature_server import FeatureServer
from airi_ray.runtime.graph_executor import GraphExecutor
from airi_ray.runtime.names import (
    CONTEXT_STORE_NAME,
    FEATURE_SERVER_NAME,
    GRAPH_EXECUTOR_NAME,
    NAMESPACE,
    OBSERVER_NAME,
    ON_HEAD,
    SCHEDULER_NAME,
    get_actor,
    pool_name,
)
from airi_ray.runtime.observer import Observer
from airi_ray.runtime.pools import AcceleratorPool
from airi_ray.runtime.replica import ModelReplica
from airi_ray.runtime.scheduler import GlobalScheduler

__all__ = [
    "get_actor",  # the controller finds the replicas it adopts with the handles it starts
    "get_or_start_context_store",
    "get_or_start_feature_server",
    "get_or_start_graph_executor",
    "get_or_start_observer",
    "get_or_start_pool",
    "get_or_start_scheduler",
    "replica_options",
    "start_replica",
    "start_singleton",
]

# Async actors: thousands of concurrent calls (waiting acquires, open channels) are normal.
_MAX_CONCURRENCY = 10_000


def replica_options(spec: ModelSpec, replica_id: str) -> dict[str, Any]:
    env = {
        # Ray gives num_cpus=0 actors one OMP thread; set the engine's threads explicitly.
        "OMP_NUM_THREADS": str(spec.cpu_threads or max(int(spec.num_cpus), 1)),
        "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib or 1),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's "auto" binding pins every CPU engine to the same first core and reserves
        # the rest; with several engines per machine, let the OS place their threads.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    return {
        "name": replica_id,
        "namespace": NAMESPACE,
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "resources": dict(spec.resources),
        "max_concurrency": _MAX_CONCURRENCY,
        "max_restarts": 0,  # the controller replaces dead replicas itself
        # Detached: a replica outlives a controller that crashed (the restarted one
        # adopts it), so serving goes on meanwhile. The controller stops it itself.
        "lifetime": "detached",
        "runtime_env": {"env_vars": env},
    }


def start_replica(
    replica_id: str, spec: ModelSpec, placement: tuple[Any, dict[str, float]] | None = None
) -> Any:
    """Start a replica actor; with ``placement`` (a placement group and its bundle), inside
    that bundle, asking for exactly the bundle's devices and CPUs."""
    options = replica_options(spec, replica_id)
    if placement is not None:
        group, bundle = placement
        options["num_gpus"] = bundle.get("GPU", 0)
        options["num_cpus"] = min(spec.num_cpus, bundle.get("CPU", 0))
        options["resources"] = {
            k: v for k, v in bundle.items() if k not in ("GPU", "CPU") and not k.startswith("node:")
        }
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
    cls = ray.remote(ModelReplica).options(**options)
    return cls.remote(replica_id, spec.model_dump())


def start_singleton(cls: type, name: str, *args: Any) -> Any:
    """A detached, named, restarting actor of ``cls`` on the head node: created once per
    cluster, found afterwards (the app layer starts the controller with it).
    A restarted actor gets the same ``args`` again."""
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources=dict(ON_HEAD),
            max_restarts=-1,
            max_concurrency=_MAX_CONCURRENCY,
        )
        .remote(*args)
    )


def get_or_start_scheduler() -> Any:
    return start_singleton(GlobalScheduler, SCHEDULER_NAME, True)  # durable accounting


def get_or_start_context_store(uri: str) -> Any:
    return start_singleton(ContextStore, CONTEXT_STORE_NAME, uri)


def get_or_start_graph_executor() -> Any:
    return start_singleton(GraphExecutor, GRAPH_EXECUTOR_NAME)


def get_or_start_feature_server(uri: str, views: list[dict[str, Any]]) -> Any:
    return start_singleton(FeatureServer, FEATURE_SERVER_NAME, uri, views)


def get_or_start_observer() -> Any:
    return start_singleton(Observer, OBSERVER_NAME)


def get_or_start_pool(accelerator_type: str) -> Any:
    return start_singleton(AcceleratorPool, pool_name(accelerator_type), accelerator_type)
