"""The Python client handle: same path, same checks, typed errors."""

from __future__ import annotations

import pytest

import airi_ray as airi
from airi_ray.core.errors import (
    AuthenticationError,
    ContextWindowExceeded,
    InvalidRequest,
    ModelNotFound,
)


def test_chat_complete_embed(client) -> None:
    r = client.chat("tiny-chat", "What is Nimbus Plus?", max_tokens=16, temperature=0)
    assert r.text and r.usage.completion_tokens <= 16 and r.finish_reason in ("stop", "length")
    assert r.usage.ttft_s is not None and r.usage.ttft_s > 0
    streamed = "".join(
        client.chat("tiny-chat", "What is Nimbus Plus?", max_tokens=16, temperature=0, stream=True)
    )
    assert streamed == r.text
    c = client.complete("tiny-chat", "Our warranty", max_tokens=8, temperature=0)
    assert c.usage.completion_tokens <= 8
    vectors = client.embed("minilm", ["one", "two", "three"])
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)


def test_models_and_status(client) -> None:
    models = {m["name"]: m for m in client.models()}
    assert models["tiny-chat"]["max_model_len"] == 1024 and models["minilm"]["task"] == "embed"
    status = client.status()
    assert status["app"] == "test"
    assert (
        sum(
            1
            for r in status["replicas"]
            if r["model"].startswith("tiny-chat") and r["state"] == "ready"
        )
        >= 1
    )


def test_typed_errors(client, airi_app) -> None:
    with pytest.raises(ModelNotFound, match="deployed models"):
        client.chat("no-such-model", "hi")
    with pytest.raises(ContextWindowExceeded, match="1024"):
        client.chat("tiny-chat", "hi", max_tokens=2000)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        client.chat("tiny-chat", "hi", max_tokens=-3)
    with pytest.raises(InvalidRequest, match="unknown generation argument"):
        client.chat("tiny-chat", "hi", max_tokenz=3)
    bad = airi.connect("auto", api_key="sk-wrong-key-00000000")
    try:
        with pytest.raises(AuthenticationError):
            bad.chat("tiny-chat", "hi")
    finally:
        bad.close()
    assert client.chat("tiny-chat", "hi", max_tokens=2).usage.completion_tokens >= 1


def test_bad_spec_is_refused_and_app_keeps_serving(client, airi_app) -> None:
    with pytest.raises(InvalidRequest, match="replicas"):
        airi.deploy(airi_app.spec | {"models": [{"name": "x", "model": "y", "replicas": -1}]})
    assert client.chat("tiny-chat", "hi", max_tokens=2).text is not None
