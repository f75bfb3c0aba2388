"""A request the engine refuses, or one that could harm it, fails alone with a 4xx.

Before, the replica took any engine exception other than ValueError/TypeError for the
death of its engine, marked itself dead, and the call path retried the same request on
every other replica: one malformed request took the model's replicas down. Now only
vLLM's EngineDeadError (or a failed health probe) is death; each case here must leave
the same replicas ready, with engines that still generate.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import ray

from airi_ray.runtime import names
from tests.conftest import KEY

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 4}
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}


def replicas(client: Any) -> dict[str, str]:
    """Every replica id with its state."""
    return {r["replica_id"]: r["state"] for r in client.status()["replicas"]}


@pytest.fixture
def untouched(client: Any) -> Any:
    """The test's requests must leave every replica as it was: same ids, all ready, and
    each engine still answers a real probe (a replica marked dead fails it at once)."""
    before = replicas(client)
    assert set(before.values()) == {"ready"}, before
    yield
    assert replicas(client) == before
    for rid in before:
        ray.get(names.get_actor(rid).probe.remote(), timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", COMPLETION | {"prompt": ""}, "prompt"),
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": ""}]}, "empty"),
        ("/v1/chat/completions", CHAT | {"seed": 2**64}, "seed"),
        ("/v1/completions", COMPLETION | {"prompt": [1, 99999]}, "prompt"),
        ("/v1/chat/completions", CHAT | {"stop": [f"s{i}" for i in range(1000)]}, "stop"),
        ("/v1/chat/completions", CHAT | {"max_tokens": 10**9}, "max_tokens"),
        ("/v1/chat/completions", CHAT | {"response_format": BAD_SCHEMA}, "nope"),
        ("/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", CHAT | {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 10**6}, "logprobs"),
        ("/v1/completions", COMPLETION | {"prompt": [[]]}, "prompt"),
        ("/v1/chat/completions", CHAT | {"stream_options": {"include_usage": True}}, "stream"),
    ],
)
def test_a_poison_body_is_a_4xx_and_harms_no_replica(
    airi_app: Any, untouched: None, path: str, body: dict[str, Any], words: str
) -> None:
    r = httpx.post(
        airi_app.base_url + path,
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert words in r.json()["error"]["message"], r.text[:300]


def _read_channel(gen: Any, wanted: set[str]) -> dict[str, tuple[str, list[int], str | None]]:
    """Read a replica channel until every wanted request has finished: each one's finish
    reason, the token ids of its last step, and its error."""
    got: dict[str, tuple[str, list[int], str | None]] = {}
    for ref in gen:
        for rid, _, ids, finish, error, _ in ray.get(ref):
            if rid in wanted and finish is not None:
                got[rid] = (finish, ids, error)
        if set(got) >= wanted:
            return got
    raise AssertionError(f"the channel ended before {wanted - set(got)} finished")


def test_an_engine_refusal_fails_that_request_and_the_engine_serves_on(
    client: Any, untouched: None
) -> None:
    """A token id outside the vocabulary reaches the engine (token-id prompts do): vLLM
    refuses it with its validation error, which used to mark the replica dead."""
    rid = next(r for r, s in replicas(client).items() if s == "ready" and "tiny" in r)
    replica = names.get_actor(rid)
    channel = f"test-{uuid.uuid4().hex}"
    gen = replica.open_channel.options(num_returns="streaming").remote(channel)
    calls = [("bad", [1, 99999], {"max_tokens": 4}), ("good", [1, 2, 3], {"max_tokens": 4})]
    ray.get(replica.submit.remote(channel, calls))
    done = _read_channel(gen, {"bad", "good"})
    assert done["bad"][0] == "invalid" and "out of vocabulary" in str(done["bad"][2])
    assert done["good"][0] in ("length", "stop") and len(done["good"][1]) >= 1


def test_an_embedding_the_engine_refuses_fails_alone_in_its_batch(
    client: Any, untouched: None
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from airi_ray.core.errors import InvalidRequest

    rid = next(r for r, s in replicas(client).items() if s == "ready" and "minilm" in r)
    replica = names.get_actor(rid)
    inputs = [[[101, 2023, 102]], [[101, 10**7, 102]], [[101, 2178, 102]]]  # one id too big
    with ThreadPoolExecutor(3) as pool:  # together, so they can share an engine batch
        futures = [pool.submit(ray.get, replica.embed.remote(x)) for x in inputs]
        outcomes: list[Any] = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=60))
            except ray.exceptions.RayTaskError as e:
                outcomes.append(e.cause)
    assert isinstance(outcomes[1], InvalidRequest), outcomes[1]
    assert len(outcomes[0][0]) == len(outcomes[2][0]) == 384
