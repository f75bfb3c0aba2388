"""The names of airi's Ray actors, and the one place a named actor is looked up.

A leaf: it imports only Ray, so every layer that calls an actor by name can import it.
"""

from __future__ import annotations

from typing import Any

import ray

NAMESPACE = "airi"
# Ray's own resource of the head node (``ray._common.constants.HEAD_NODE_RESOURCE_NAME``):
# a sliver of it pins an actor there. The control actors and the ingress replicas live on
# the head, which outlives the workers: a worker node's loss takes only model replicas.
ON_HEAD = {"node:__internal_head__": 0.001}

CONTROLLER_NAME = "airi-controller"
SCHEDULER_NAME = "airi-scheduler"
CONTEXT_STORE_NAME = "airi-context-store"
GRAPH_EXECUTOR_NAME = "airi-graph-executor"
FEATURE_SERVER_NAME = "airi-feature-server"
OBSERVER_NAME = "airi-observer"


def pool_name(accelerator_type: str) -> str:
    """The name of the accelerator pool actor of ``accelerator_type``."""
    return f"airi-pool-{accelerator_type}"


def get_actor(name: str) -> Any:
    """A named airi actor; raises ``ValueError`` when it does not exist."""
    return ray.get_actor(name, namespace=NAMESPACE)
