"""Two Ray nodes on this machine: a worker node with its own accelerator is removed under
load, then a new one joins (issue 21, item 7).

The cluster is its own (``ray.cluster_utils.Cluster``: the head and a worker node, each a
raylet of its own), so this module runs in its own session: ``make test-multinode``. The
head has one (fake) H100, the worker one L4, and tiny-chat's two replicas take a whole
accelerator each: one lands on each node, through the accelerator pools.

What must hold when the worker dies with streams in flight: every stream completes (the
ones on the lost replica migrate to the head's), the control actors (on the head) keep
their process and their state, and a node that joins later gets a replica again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import pytest

from tests.conftest import _free_port, wait_for

pytestmark = pytest.mark.multinode

MODEL = "tiny-chat"
KEY = "sk-airi-e00000000001-multiNodeTenantKey01"
TOKENS = 120
STREAMS = 8


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray
    from ray.cluster_utils import Cluster

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    port = _free_port()
    spec = {
        "name": "multinode",
        "models": [
            {
                "name": MODEL,
                "model": str(ensure_tiny_model()),
                "replicas": 2,
                "num_cpus": 0.5,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "max_concurrency": 8,
                "placement": {"accelerator_types": ["L4", "H100"]},
                "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
            }
        ],
        "tenants": [{"name": "tenant-m", "api_keys": [KEY]}],
        "ingress": {"port": port},
        "storage": {"uri": str(tmp_path_factory.mktemp("state"))},
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {"accelerator_type:H100": 1},
            "include_dashboard": False,
        },
    )
    worker = cluster.add_node(num_cpus=2, resources={"accelerator_type:L4": 1})
    ray.init(address=cluster.address, namespace="airi", log_to_driver=False)
    try:
        airi.deploy(spec)
        client = airi.connect("auto", api_key=KEY)
        yield {"cluster": cluster, "worker": worker, "client": client, "port": port}
        client.close()
    finally:
        airi.shutdown()
        ray.shutdown()
        cluster.shutdown()


def ready(client: Any, accelerator: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in client.status()["replicas"]
        if r["model"].startswith(MODEL)
        and r["state"] == "ready"
        and (accelerator is None or r.get("accelerator") == accelerator)
    ]


def control_pids() -> dict[str, tuple[str, int]]:
    """Node and process of each named airi control actor."""
    import ray

    from airi_ray.runtime import names

    out = {}
    for name in (names.CONTROLLER_NAME, names.SCHEDULER_NAME, names.CONTEXT_STORE_NAME):
        handle = names.get_actor(name)
        out[name] = ray.get(
            handle.__ray_call__.remote(
                lambda self: (ray.get_runtime_context().get_node_id(), os.getpid())
            ),
            timeout=30,
        )
    return out


def stream(port: int, failures: list[str], chunks: list[int], lock: threading.Lock) -> None:
    import openai

    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    try:
        tokens = 0
        for chunk in oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "tell me a long story"}],
            max_tokens=TOKENS,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            timeout=120,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    chunks[0] += 1
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens != TOKENS:
            failures.append(f"ended after {tokens} of {TOKENS} tokens")
    except Exception as e:  # an error event, a broken connection, a 5xx
        failures.append(f"{type(e).__name__}: {e}")


def test_one_replica_on_each_node_and_control_actors_on_the_head(two_nodes) -> None:
    import ray

    client = two_nodes["client"]
    wait_for(lambda: len(ready(client)) == 2, timeout=120, what="two ready replicas")
    assert sorted(r["accelerator"] for r in ready(client)) == ["H100", "L4"]
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head
    assert {node for node, _ in control_pids().values()} == {head}


def test_streams_survive_the_loss_of_the_worker_node(two_nodes) -> None:
    client, cluster, port = two_nodes["client"], two_nodes["cluster"], two_nodes["port"]
    wait_for(lambda: len(ready(client)) == 2, timeout=120, what="two ready replicas")
    convo = "conv-multinode-1"
    client.chat(MODEL, "remember me", conversation_id=convo, max_tokens=4)
    before = control_pids()

    failures: list[str] = []
    chunks, lock = [0], threading.Lock()
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream, port, failures, chunks, lock) for _ in range(STREAMS)]
        # Every stream under way (the scheduler spreads them over both replicas) before
        # the node goes.
        wait_for(lambda: chunks[0] >= 2 * STREAMS, timeout=60, what="the streams to start")
        cluster.remove_node(two_nodes["worker"], allow_graceful=False)
        _, hung = wait(futures, timeout=180)
    assert not hung, f"{len(hung)} streams hung"
    assert not failures, failures

    # The control actors never moved nor restarted, and kept what they held.
    assert control_pids() == before
    history = client.conversation(convo)
    assert any(t.get("content") == "remember me" for t in history), history
    wait_for(lambda: ready(client, "L4") == [], timeout=60, what="the lost replica to go")
    assert len(ready(client, "H100")) == 1

    # A new node with an L4 joins: the fleet is whole again, a replica on it.
    two_nodes["worker"] = cluster.add_node(num_cpus=2, resources={"accelerator_type:L4": 1})
    wait_for(lambda: len(ready(client, "L4")) == 1, timeout=180, what="a replica on the new node")
    assert client.chat(MODEL, "hi again", max_tokens=4).usage.completion_tokens == 4
