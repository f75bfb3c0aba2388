"""Replica behaviour: engine stats, health probe, cancellation of abandoned streams."""

from __future__ import annotations

import httpx
import ray

from airi_ray.runtime import names
from tests.conftest import KEY, wait_for


def tiny_replicas(client) -> list[str]:
    return [
        r["replica_id"]
        for r in client.status()["replicas"]
        if r["model"].startswith("tiny-chat") and r["state"] == "ready"
    ]


def test_probe_runs_a_real_token_and_stats_come_from_vllm(client) -> None:
    handle = names.get_actor(tiny_replicas(client)[0])
    assert 0 < ray.get(handle.probe.remote()) < 30
    stats = ray.get(handle.stats.remote())
    assert set(stats) >= {
        "running",
        "waiting",
        "kv_cache_usage",
        "prefix_cache_queries",
        "prefix_cache_hits",
    }


def test_prefix_cache_hits_on_repeated_prompt(client) -> None:
    prompt = "Nimbus Gear shipping policy. " * 20  # several full KV blocks
    before = sum(
        ray.get(names.get_actor(r).stats.remote())["prefix_cache_hits"]
        for r in tiny_replicas(client)
    )
    for _ in range(3):
        client.complete("tiny-chat", prompt, max_tokens=2)
    after = wait_for(
        lambda: (
            (
                s := sum(
                    ray.get(names.get_actor(r).stats.remote())["prefix_cache_hits"]
                    for r in tiny_replicas(client)
                )
            )
            > before
            and s
        ),
        timeout=10,
        what="prefix-cache hits",
    )
    assert after > before


def test_abandoned_http_stream_is_aborted_in_the_engine(client, airi_app) -> None:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": 1000 - 64,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST",
        f"{airi_app.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)

    # The client hung up long before 900 tokens: nothing may keep running in any replica.
    def idle() -> bool:
        return all(
            ray.get(names.get_actor(rid).stats.remote())["in_flight"] == 0
            for rid in tiny_replicas(client)
        )

    wait_for(idle, timeout=30, what="the abandoned request to be aborted")


def test_abandoned_python_stream_is_aborted(client) -> None:
    stream = client.chat("tiny-chat", "go on", max_tokens=900, ignore_eos=True, stream=True)
    next(stream)
    stream.close()

    def idle() -> bool:
        return all(
            ray.get(names.get_actor(rid).stats.remote())["in_flight"] == 0
            for rid in tiny_replicas(client)
        )

    wait_for(idle, timeout=30, what="the abandoned request to be aborted")
