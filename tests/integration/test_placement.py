"""Accelerator pools on placement groups, on the session's fake heterogeneous cluster
(2 H100 and 4 L4 declared as Ray resources): preference order, overflow, fractional sharing,
`pending: no capacity` instead of a hang, and the autoscaler."""

from __future__ import annotations

import copy
import threading
from typing import Any

import httpx
import ray

from airi_ray.runtime import names
from tests.conftest import wait_for


def _model(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def test_replicas_run_in_pool_bundles_of_their_preferred_type(client) -> None:
    status = client.status()
    assert _model(status, "tiny-chat")["accelerators"] == {"H100": 2}
    assert _model(status, "minilm")["accelerators"] == {"L4": 1}
    pools = status["pools"]
    assert pools["H100"]["used_devices"] == 2.0 and pools["H100"]["free_devices"] == 0.0
    assert pools["L4"]["used_devices"] == 0.5
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert sum(g["name"].startswith("airi-tiny-chat") for g in groups) == 2


def test_overflow_sharing_pending_and_autoscaling(airi_app, client) -> None:
    """One extra model shows several things, since each engine start costs half a minute:
    preferring H100, it overflows to L4 (tiny-chat holds both H100) and its first replica
    shares the half-used L4 device of minilm rather than breaking into an empty one; a model
    that only takes H100 is pending, and the deploy does not wait for it; idle, the
    autoscaler removes a replica after its delay, and under a burst it starts one again."""
    controller = names.get_actor(names.CONTROLLER_NAME)
    spec = copy.deepcopy(airi_app.spec)
    tiny = spec["models"][0]
    auto = {
        **tiny,
        "name": "tiny-auto",
        "replicas": 2,  # the starting count; both load together
        "placement": {"accelerator_types": ["H100", "L4"], "fraction": 0.5},
        "autoscale": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_tokens_per_replica": 100,
            "scale_down_delay_s": 2,
            "upscale_cooldown_s": 0,
        },
    }
    stuck = {
        **tiny,
        "name": "tiny-h100",
        "replicas": 1,
        "placement": {"accelerator_types": ["H100"]},
    }
    spec["models"] += [auto, stuck]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            client.chat("tiny-auto", "Tell me about tents.", max_tokens=64, ignore_eos=True)

    try:
        status = ray.get(controller.deploy.remote(spec))  # returns: pending does not block it
        assert _model(status, "tiny-auto")["accelerators"] == {"L4": 2}
        pending = _model(status, "tiny-h100")
        assert pending["ready_replicas"] == 0
        assert pending["pending"].startswith("no capacity") and "H100" in pending["pending"]
        leases = ray.get(names.get_actor("airi-pool-L4").leases.remote())
        shared = [lease for lease in leases if lease["model"] == "tiny-auto"]
        minilm = next(lease for lease in leases if lease["model"] == "minilm")
        place = (minilm["node_id"], minilm["devices"])
        assert place in [(lease["node_id"], lease["devices"]) for lease in shared]

        wait_for(
            lambda: (
                (m := _model(client.status(), "tiny-auto"))["replicas"] == 1
                and m["accelerators"] == {"L4": 1}
            ),
            timeout=60,
            what="the idle model to scale down to its minimum",
        )
        # Three streams carry about 3 x 70 tokens, over 1 x 100: the target wants more.
        workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for w in workers:
            w.start()
        wait_for(
            lambda: (
                (m := _model(client.status(), "tiny-auto"))["replicas"] == 2
                and m["accelerators"] == {"L4": 2}
            ),
            timeout=60,
            what="the autoscaler to start a second replica under load",
        )
        stop.set()
        events = client.status()["events"]
        assert any("autoscale tiny-auto@1" in e and "2 -> 1" in e for e in events), events
        assert any("autoscale tiny-auto@1" in e and "1 -> 2" in e for e in events), events
        metrics = httpx.get(f"{airi_app.base_url}/metrics").text
        assert 'airi_autoscale_decisions_total{direction="up",model="tiny-auto"}' in metrics
        assert 'airi_autoscale_decisions_total{direction="down",model="tiny-auto"}' in metrics
        for w in workers:
            w.join(timeout=120)
    finally:
        stop.set()
        ray.get(controller.deploy.remote(airi_app.spec))

    def released() -> bool:
        return len(ray.get(names.get_actor("airi-pool-L4").leases.remote())) == 1

    wait_for(released, timeout=30, what="tiny-auto's bundles to be released")
    assert "tiny-h100" not in {m["name"] for m in client.status()["models"]}
