"""The global scheduler on the real cluster: session and prefix routing, embedding batches."""

from __future__ import annotations

import copy
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import ray

from airi_ray.runtime import names
from tests.conftest import OTHER_KEY, wait_for


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


def engine_cache_blocks(model: str) -> int:
    snapshot = ray.get(names.get_actor(names.SCHEDULER_NAME).snapshot.remote())
    return int(snapshot[model]["engine_cache_blocks"])


def test_a_shared_prompt_prefix_is_routed_to_the_replica_that_cached_it(client) -> None:
    # tiny-chat runs with ``prefix_cache_view: engine``: routing reads what the engines'
    # KV cache events say they hold, so the first prompt's blocks must reach the
    # scheduler from the engine before the next two can follow them. Its own from the
    # first token, and long enough for two of the CPU backend's 128-token blocks.
    system = f"[{uuid.uuid4().hex}] You are the Nimbus Gear support assistant. Policies: "
    system += "returns are free. " * 70
    before = routes("tiny-chat").get("prefix", 0)
    known = engine_cache_blocks("tiny-chat")
    client.complete("tiny-chat", f"{system} Question 0:", max_tokens=2)
    wait_for(
        lambda: engine_cache_blocks("tiny-chat") >= known + 8,
        timeout=10,
        what="the engine's cache events at the scheduler",
    )
    for i in (1, 2):
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
    scheduler = names.get_actor(names.SCHEDULER_NAME)
    controller = names.get_actor(names.CONTROLLER_NAME)
    spec = copy.deepcopy(airi_app.spec)
    spec["tenants"][1]["max_queued"] = 1  # tenant-b may have one request waiting
    ray.get(controller.deploy.remote(spec))
    try:
        # A stream of 900 tokens lasts about ten seconds here, and the test needs every
        # slot busy while tenant-b's two requests arrive; on a slow machine the first
        # streams can end before the last one starts, so an attempt that finds a slot
        # free again is made anew (the refusal is checked only with every slot busy).
        for _attempt in range(3):
            outcome = _one_full_queue_attempt(client, airi_app, scheduler)
            if outcome is not None:
                break
        else:
            raise AssertionError("in 3 attempts a slot freed before tenant-b's requests came")
    finally:
        ray.get(controller.deploy.remote(airi_app.spec))
    refused, queued = outcome
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "per-tenant limit is 1" in error["message"]
    assert queued.status_code == 200, queued.text  # the queued one ran once slots freed


def _one_full_queue_attempt(
    client, airi_app, scheduler
) -> tuple[httpx.Response, httpx.Response] | None:
    """Fill every slot of tiny-chat with tenant-a's streams, queue one request of
    tenant-b and send it another: the two answers, or None if a slot freed too soon."""

    def tiny() -> dict:
        return ray.get(scheduler.snapshot.remote())["tiny-chat"]

    # Every replica ready and every slot free first: calls of earlier tests may still be
    # finishing, and a replica may still be coming back from an earlier test.
    view = wait_for(
        lambda: (
            (t := tiny())["in_flight"] == 0
            and len(t["replicas"]) == 2
            and all(r["ready"] for r in t["replicas"])
            and t
        ),
        timeout=120,
        what="tiny-chat's 2 replicas to be ready and idle",
    )
    slots = sum(r["max_concurrency"] for r in view["replicas"])
    streams = [
        client.chat("tiny-chat", f"long {i}", max_tokens=900, ignore_eos=True, stream=True)
        for i in range(slots)
    ]
    url = f"{airi_app.base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        try:
            for s in streams:
                next(s)
            if tiny()["in_flight"] < slots:
                return None
            waiter = pool.submit(httpx.post, url, json=body, headers=headers, timeout=120)
            wait_for(
                lambda: tiny()["queue_depth"] >= 1 or waiter.done(),
                timeout=30,
                what="tenant-b's request to queue",
            )
            if waiter.done():  # it found a free slot: a stream had ended already
                assert waiter.result().status_code == 200, waiter.result().text
                return None
            refused = httpx.post(url, json=body, headers=headers, timeout=30)
            if refused.status_code == 200:  # the queued one left the queue meanwhile
                return None
        finally:
            for s in streams:
                s.close()
        return refused, waiter.result(timeout=120)
