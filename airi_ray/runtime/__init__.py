"""Ray actors (thin shells around ``airi_ray.core`` objects) and the one call path.

``names`` names the actors and finds them (the one ``ray.get_actor``); ``launch`` applies
``ray.remote`` in one place and is imported only by the controller and the app layer;
``cluster_kv`` is every read and write of Ray's internal KV store. ``replica``,
``scheduler`` and ``controller`` are plain classes; ``calls`` is the path every model call
takes (acquire a lease, stream from the replica, release), shared by the client, the
ingress, graph runs and the data plane; ``backend`` is every call of the app for a tenant
the caller names, which the ingress and the client call through.
"""
