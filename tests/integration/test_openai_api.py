"""The HTTP API driven by the official ``openai`` client, streaming included."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.conftest import KEY

CHAT = [{"role": "user", "content": "How do I return an item?"}]


def test_models_list(oai) -> None:
    ids = {m.id for m in oai.models.list().data}
    assert ids == {"tiny-chat", "minilm"}


def test_chat_non_streaming(oai) -> None:
    r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(oai) -> None:
    args = dict(model="tiny-chat", messages=CHAT, max_tokens=32, temperature=0)
    whole = oai.chat.completions.create(**args).choices[0].message.content
    chunks = list(
        oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streaming_arrives_in_several_chunks(oai) -> None:
    stream = oai.chat.completions.create(
        model="tiny-chat",
        messages=CHAT,
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 1


def test_completions(oai) -> None:
    r = oai.completions.create(
        model="tiny-chat", prompt="Nimbus Plus members get", max_tokens=16, temperature=0
    )
    assert r.choices[0].text and r.usage.completion_tokens <= 16
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(
            model="tiny-chat",
            prompt="Nimbus Plus members get",
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    assert streamed == r.choices[0].text


def test_embeddings_float_and_base64(oai, airi_app) -> None:
    r = oai.embeddings.create(
        model="minilm", input=["free returns within 30 days", "shipping to Canada"]
    )
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    v = np.array(r.data[0].embedding)
    assert abs(np.linalg.norm(v) - 1.0) < 1e-3  # MiniLM normalises its embeddings
    raw = httpx.post(
        f"{airi_app.base_url}/v1/embeddings",
        json={
            "model": "minilm",
            "input": "free returns within 30 days",
            "encoding_format": "base64",
        },
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, v, atol=1e-5)


def test_similar_texts_embed_closer(oai) -> None:
    a, b, c = (
        np.array(d.embedding)
        for d in oai.embeddings.create(
            model="minilm",
            input=[
                "How do I return my boots?",
                "What is the returns policy?",
                "Tent pole repair kit",
            ],
        ).data
    )
    assert a @ b > a @ c


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_health_and_metrics_need_no_key(airi_app, path) -> None:
    assert httpx.get(airi_app.base_url + path).status_code == 200


def test_metrics_are_labelled_by_model_and_tenant(oai, airi_app) -> None:
    oai.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=8)
    text = httpx.get(f"{airi_app.base_url}/metrics").text
    for needle in (
        'airi_ttft_seconds_count{model="tiny-chat",tenant="tenant-a"}',
        'airi_requests_total{model="tiny-chat",outcome="ok",tenant="tenant-a"}',
        "airi_time_per_output_token_seconds",
        "airi_output_tokens_per_second",
        'airi_queue_depth{model="tiny-chat",tenant="tenant-a"}',
        'airi_admission_decisions_total{decision="admitted",model="tiny-chat",tenant="tenant-a"}',
        'airi_virtual_token_counter{model="tiny-chat",tenant="tenant-a"}',
        "airi_routing_decisions_total",
        "airi_kv_cache_usage_ratio",
        'airi_prefix_cache_hit_rate{model="tiny-chat"}',
        "airi_http_responses_total",
    ):
        assert needle in text, needle
    # Each replica counts the responses it sent; of three more reads, one is the second at
    # some replica (there are two), which counted the first.
    texts = [httpx.get(f"{airi_app.base_url}/metrics").text for _ in range(3)]
    assert any('airi_http_responses_total{code="200",route="/metrics"}' in t for t in texts)


def test_a_retried_chat_with_one_idempotency_key_stores_the_exchange_once(oai, client) -> None:
    """The openai client resends its extra headers on every retry: a chat with a
    conversation_id and an Idempotency-Key, sent twice, is stored once and answered once."""
    import time

    conversation = f"conv-oai-{time.time_ns()}"
    args = dict(
        model="tiny-chat",
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        extra_body={"conversation_id": conversation},
        extra_headers={"Idempotency-Key": f"oai-{time.time_ns()}"},
    )
    first = oai.chat.completions.create(**args)
    again = oai.chat.completions.create(**args)
    # The retry is answered from the store: the same answer, no model call (no prompt read).
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.choices[0].finish_reason == first.choices[0].finish_reason
    assert again.usage.prompt_tokens == 0
    turns = client.conversation(conversation)
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[1]["content"] == first.choices[0].message.content
