"""The global scheduler on the real cluster: session and prefix routing, embedding batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ray

from airi_ray.runtime import names


def routes(model: str) -> dict[str, int]:
    snapshot = ray.get(names.get_actor(names.SCHEDULER_NAME).snapshot.remote())
    return dict(snapshot[model]["routes"])


def test_later_turns_of_a_session_go_to_the_same_replica(client) -> None:
    before = routes("tiny-chat").get("session", 0)
    for turn in range(3):
        client.chat(
            "tiny-chat", f"turn {turn}: where is my order?", max_tokens=4, session_id="s-42"
        )
    assert routes("tiny-chat").get("session", 0) >= before + 2


def test_a_shared_prompt_prefix_is_routed_to_the_replica_that_cached_it(client) -> None:
    system = "You are the Nimbus Gear support assistant. Policies: " + "returns are free. " * 30
    before = routes("tiny-chat").get("prefix", 0)
    for i in range(3):
        client.complete("tiny-chat", f"{system} Question {i}:", max_tokens=2)
    assert routes("tiny-chat").get("prefix", 0) >= before + 2


def test_bad_scheduling_options_are_refused(client) -> None:
    import pytest

    from airi_ray.core.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="priority must be one of interactive, batch"):
        client.chat("tiny-chat", "hi", max_tokens=2, priority="urgent")
    assert client.chat("tiny-chat", "hi", max_tokens=2, priority="batch").usage.completion_tokens


def test_concurrent_embedding_calls_share_engine_batches(client) -> None:
    def replica_batches() -> tuple[int, int]:
        ids = [
            r["replica_id"]
            for r in client.status()["replicas"]
            if r["model"].startswith("minilm") and r["state"] == "ready"
        ]
        stats = [ray.get(names.get_actor(rid).stats.remote()) for rid in ids]
        return sum(s["embed_batches"] for s in stats), sum(s["embed_batch_items"] for s in stats)

    batches0, items0 = replica_batches()
    with ThreadPoolExecutor(16) as pool:
        vectors = list(pool.map(lambda i: client.embed("minilm", f"text {i}"), range(32)))
    assert all(len(v) == 1 and len(v[0]) == 384 for v in vectors)
    batches1, items1 = replica_batches()
    assert items1 - items0 == 32
    assert batches1 - batches0 < 32  # some calls shared a batch


def test_a_full_tenant_queue_answers_429_with_retry_after(client, airi_app) -> None:
    import copy
    import threading

    import httpx

    from tests.conftest import OTHER_KEY, wait_for

    scheduler = names.get_actor(names.SCHEDULER_NAME)
    controller = names.get_actor(names.CONTROLLER_NAME)
    spec = copy.deepcopy(airi_app.spec)
    spec["tenants"][1]["max_queued"] = 1  # tenant-b may have one request waiting
    ray.get(controller.deploy.remote(spec))
    # Every slot must be free first: calls of earlier tests may still be finishing.
    wait_for(
        lambda: ray.get(scheduler.snapshot.remote())["tiny-chat"]["in_flight"] == 0,
        timeout=120,
        what="earlier calls on tiny-chat to finish",
    )
    # Tenant a fills every slot (2 replicas x 4) with long streams.
    streams = [
        client.chat("tiny-chat", f"long {i}", max_tokens=900, ignore_eos=True, stream=True)
        for i in range(8)
    ]
    try:
        for s in streams:
            next(s)
        url = f"{airi_app.base_url}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {OTHER_KEY}"}
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        }
        queued: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: queued.append(httpx.post(url, json=body, headers=headers, timeout=120))
        )
        waiter.start()
        wait_for(
            lambda: ray.get(scheduler.snapshot.remote())["tiny-chat"]["queue_depth"] >= 1,
            timeout=30,
            what="tenant-b's request to queue",
        )
        refused = httpx.post(url, json=body, headers=headers, timeout=30)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and "per-tenant limit is 1" in error["message"]
    finally:
        for s in streams:
            s.close()
        ray.get(controller.deploy.remote(airi_app.spec))
    waiter.join(timeout=120)
    assert queued and queued[0].status_code == 200  # the queued one ran once slots freed
