"""Ray actors (thin shells around ``airi_ray.core`` objects) and the one call path.

``actors`` applies ``ray.remote`` in one place; ``replica``, ``scheduler`` and ``controller``
are plain classes; ``calls`` is the path every model call takes (acquire a lease, stream from
the replica, release), shared by the client, the ingress and graphs; ``backend`` is every
call of the app for a tenant the caller names, which the ingress and the client call through.
"""

NAMESPACE = "airi"
CONTROLLER_NAME = "airi-controller"
SCHEDULER_NAME = "airi-scheduler"
CONTEXT_STORE_NAME = "airi-context-store"
GRAPH_EXECUTOR_NAME = "airi-graph-executor"
FEATURE_SERVER_NAME = "airi-feature-server"
OBSERVER_NAME = "airi-observer"
SPEC_KEY = b"airi/app_spec"  # internal KV: the deployed spec, without its API keys
