"""A replica that dies before answering: its requests are retried elsewhere; it is replaced."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray

from airi_ray.runtime import actors
from tests.conftest import wait_for


def test_requests_survive_a_replica_killed_before_first_token(client) -> None:
    replicas = [
        r["replica_id"]
        for r in client.status()["replicas"]
        if r["model"].startswith("tiny-chat") and r["state"] == "ready"
    ]
    assert len(replicas) == 2
    victim = replicas[0]
    ray.kill(actors.get_actor(victim), no_restart=True)
    # The scheduler still routes to the dead replica until the controller notices: these
    # requests hit it before any token exists and must be retried on the survivor.
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: client.chat("tiny-chat", f"question {i}", max_tokens=8), range(8))
        )
    assert all(r.usage.completion_tokens > 0 for r in results)

    def replaced() -> bool:
        reps = [r for r in client.status()["replicas"] if r["model"].startswith("tiny-chat")]
        return (
            victim not in {r["replica_id"] for r in reps}
            and sum(r["state"] == "ready" for r in reps) == 2
        )

    wait_for(replaced, timeout=240, what="the controller to replace the dead replica")
