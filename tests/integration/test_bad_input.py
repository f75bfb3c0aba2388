"""Every bad request gets the OpenAI error body with the right status, and the runtime stays healthy."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY

GOOD = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(app, path: str, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(app.base_url + path, headers=headers, timeout=60, **kwargs)


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "code"}
    for w in words:
        assert w in body["message"], body["message"]


@pytest.fixture(autouse=True)
def runtime_stays_healthy(airi_app):
    yield
    r = post(airi_app, "/v1/chat/completions", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_malformed_json(airi_app) -> None:
    r = post(
        airi_app,
        "/v1/chat/completions",
        content=b'{"model": "tiny-chat", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, "not valid JSON")


def test_body_not_an_object(airi_app) -> None:
    assert_error(post(airi_app, "/v1/chat/completions", json=[1, 2]), 400, "JSON object")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"max_tokens": -1}, ["max_tokens"]),
        ({"max_tokens": "many"}, ["max_tokens"]),
        ({"temperature": 9}, ["temperature"]),
        ({"messages": "hello"}, ["messages"]),
        ({"messages": []}, ["messages"]),
        ({"messages": [{"role": "wizard", "content": "x"}]}, ["role must be one of"]),
        ({"n": 0}, ["n"]),
    ],
)
def test_schema_violations(airi_app, change, words) -> None:
    assert_error(post(airi_app, "/v1/chat/completions", json=GOOD | change), 400, *words)


def test_missing_model_field(airi_app) -> None:
    body = {k: v for k, v in GOOD.items() if k != "model"}
    assert_error(post(airi_app, "/v1/chat/completions", json=body), 400, "model")


def test_unknown_model(airi_app) -> None:
    r = post(airi_app, "/v1/chat/completions", json=GOOD | {"model": "gpt-17"})
    assert_error(r, 404, "gpt-17", "tiny-chat")
    assert r.json()["error"]["code"] == "model_not_found"


def test_wrong_task_for_model(airi_app) -> None:
    assert_error(
        post(airi_app, "/v1/embeddings", json={"model": "tiny-chat", "input": "x"}), 400, "serves"
    )


@pytest.mark.parametrize("key", [None, "sk-not-a-real-key-000"])
def test_missing_or_wrong_key(airi_app, key) -> None:
    r = post(airi_app, "/v1/chat/completions", json=GOOD, key=key)
    assert_error(r, 401, "API key")


def test_bad_authorization_scheme(airi_app) -> None:
    r = post(
        airi_app,
        "/v1/chat/completions",
        json=GOOD,
        key=None,
        headers={"Authorization": f"Basic {KEY}"},
    )
    assert_error(r, 401, "Bearer")


def test_context_window_exceeded(airi_app) -> None:
    r = post(airi_app, "/v1/chat/completions", json=GOOD | {"max_tokens": 5000})
    assert_error(r, 400, "context window of 1024 tokens")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    long_prompt = "returns shipping warranty " * 400
    r = post(
        airi_app,
        "/v1/completions",
        json={"model": "tiny-chat", "prompt": long_prompt, "max_tokens": 10},
    )
    assert_error(r, 400, "1024")


def test_a_prompt_whose_head_is_over_the_window_is_refused_unread(airi_app) -> None:
    # 40K characters: over twice the 16 characters per token of the window that make the
    # call path tokenize the head first; it alone is over the window.
    head_first = "returns shipping warranty " * 1540
    for path, body in [
        ("/v1/chat/completions", GOOD | {"messages": [{"role": "user", "content": head_first}]}),
        ("/v1/completions", {"model": "tiny-chat", "prompt": head_first, "max_tokens": 4}),
    ]:
        r = post(airi_app, path, json=body)
        assert_error(r, 400, "context window of 1024 tokens", "characters alone have")
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_embedding_input_too_long(airi_app) -> None:
    r = post(airi_app, "/v1/embeddings", json={"model": "minilm", "input": ["word " * 600]})
    assert_error(r, 400, "at most 256")


def test_too_many_embedding_inputs(airi_app) -> None:
    r = post(airi_app, "/v1/embeddings", json={"model": "minilm", "input": ["a"] * 2049})
    assert_error(r, 400, "input has 2049 items; at most 2048 per request")


def test_oversized_body(airi_app) -> None:
    big = GOOD | {"messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_error(post(airi_app, "/v1/chat/completions", json=big), 413, "limit")


def test_unknown_route(airi_app) -> None:
    assert_error(post(airi_app, "/v1/nothing-here", json={}), 404)


def test_openai_client_sees_typed_errors(oai) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=GOOD["messages"])
    with pytest.raises(openai.BadRequestError, match="context window"):
        oai.chat.completions.create(model="tiny-chat", messages=GOOD["messages"], max_tokens=2000)
    # The tenant's cap is checked at the door, before the prompt is tokenized.
    with pytest.raises(openai.BadRequestError, match="over the limit of 32768"):
        oai.chat.completions.create(
            model="tiny-chat", messages=GOOD["messages"], max_tokens=100_000
        )


def _paced_most(app) -> float:
    """The most refusals paced so far by one ingress replica, of those a few /metrics hit."""
    most = 0.0
    for _ in range(8):  # HAProxy spreads them over the replicas; each counts its own
        text = httpx.get(app.base_url + "/metrics", timeout=30).text
        found = re.search(r"^airi_http_refusals_paced_total ([0-9.e+]+)$", text, re.M)
        assert found, "the ingress exports airi_http_refusals_paced_total"
        most = max(most, float(found.group(1)))
    return most


def test_a_flood_of_refusals_is_paced_without_delaying_another_tenant(airi_app) -> None:
    """Tenant B sends 240 invalid requests at once: beyond its burst, each ingress replica
    answers them at the session's pace (20/s after 30), so its last answers wait. Tenant
    A's invalid request, sent in the middle of the flood, is answered at once."""
    bad = b'{"model": "tiny-chat", "messages": ['
    before = _paced_most(airi_app)

    async def one(client: httpx.AsyncClient, key: str) -> float:
        t0 = time.perf_counter()
        r = await client.post(
            "/v1/chat/completions",
            content=bad,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert_error(r, 400, "not valid JSON")
        return time.perf_counter() - t0

    async def main() -> tuple[list[float], float]:
        limits = httpx.Limits(max_connections=64)
        async with (
            httpx.AsyncClient(base_url=airi_app.base_url, timeout=60, limits=limits) as flood,
            httpx.AsyncClient(base_url=airi_app.base_url, timeout=60) as quiet,
        ):
            b = [asyncio.create_task(one(flood, OTHER_KEY)) for _ in range(240)]
            while sum(t.done() for t in b) < 80:  # the flood is under way, and paced
                await asyncio.sleep(0.01)
            a = await one(quiet, KEY)
            return await asyncio.gather(*b), a

    b_waits, a_wait = asyncio.run(main())
    assert _paced_most(airi_app) > before
    # /metrics shows the responses the replica counted (both replicas answered 400s).
    text = httpx.get(airi_app.base_url + "/metrics", timeout=30).text
    assert 'airi_http_responses_total{code="400",route="/v1/chat/completions"}' in text
    # B's slowest answers waited out its pace; A's, sent meanwhile, did not wait for it.
    assert max(b_waits) > 2 * a_wait, (max(b_waits), a_wait)
