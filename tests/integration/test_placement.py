"""Accelerator pools on placement groups, on the session's fake heterogeneous cluster
(2 H100 and 4 L4 declared as Ray resources): preference order, overflow, fractional sharing,
and `pending: no capacity` instead of a hang."""

from __future__ import annotations

import copy
from typing import Any

import ray

from airi_ray.runtime import actors
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


def test_overflow_fraction_sharing_and_pending(airi_app, client) -> None:
    controller = actors.get_actor(actors.CONTROLLER_NAME)
    spec = copy.deepcopy(airi_app.spec)
    tiny = spec["models"][0]
    extra = {
        **tiny,
        "name": "tiny-extra",
        "replicas": 1,
        # H100 is full (tiny-chat holds both): it falls back to L4, where it shares the
        # half-used device of minilm rather than breaking into an empty one.
        "placement": {"accelerator_types": ["H100", "L4"], "fraction": 0.5},
    }
    stuck = {
        **tiny,
        "name": "tiny-h100",
        "replicas": 1,
        "placement": {"accelerator_types": ["H100"]},
    }
    spec["models"] += [extra, stuck]
    try:
        status = ray.get(controller.deploy.remote(spec))  # returns: pending does not block it
        assert _model(status, "tiny-extra")["accelerators"] == {"L4": 1}
        pending = _model(status, "tiny-h100")
        assert pending["ready_replicas"] == 0
        assert pending["pending"].startswith("no capacity") and "H100" in pending["pending"]
        leases = ray.get(actors.get_actor("airi-pool-L4").leases.remote())
        places = {lease["model"]: (lease["node_id"], tuple(lease["devices"])) for lease in leases}
        assert places["tiny-extra"] == places["minilm"]
        assert client.chat("tiny-extra", "hi", max_tokens=4).usage.completion_tokens > 0
    finally:
        ray.get(controller.deploy.remote(airi_app.spec))

    def released() -> bool:
        return len(ray.get(actors.get_actor("airi-pool-L4").leases.remote())) == 1

    wait_for(released, timeout=30, what="tiny-extra's bundle to be released")
    assert "tiny-h100" not in {m["name"] for m in client.status()["models"]}
