"""The OpenAI protocol layer on vLLM's request models: what a body becomes, what is
refused, and how answers are read back (tool calls, logprobs)."""

from __future__ import annotations

import json

import pytest

from airi_ray.core.errors import InvalidRequest
from airi_ray.serve import protocol as p

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}


def test_a_chat_body_becomes_generation_params() -> None:
    body = p.parse(
        p.ChatRequest,
        CHAT
        | {
            "n": 2,
            "seed": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "top_k": 3,
            "max_completion_tokens": 7,
            "priority": "batch",
            "response_format": {"type": "json_object"},
        },
    )
    params, n = p.generation(body)
    assert n == 2 and params.max_tokens == 7 and params.seed == 5
    assert params.extra == {
        "top_k": 3,
        "logprobs": 2,
        "structured_outputs": {"json_object": True},
    }
    assert body.priority == "batch"
    assert p.choice_params(params, 1).seed == 6  # seed + choice index, as vLLM


def test_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    body = p.parse(
        p.CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]], "echo": True, "logprobs": 1}
    )
    params, _ = p.generation(body)
    assert params.extra == {"logprobs": 1, "prompt_logprobs": 1}
    assert p.prompts_of(body) == [[1, 2], [3]]
    assert params.max_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize(
    "change, match",
    [
        ({"seed": 2**64}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream"),
        ({"n": 0}, "n must be at least 1"),
        ({"priority": 3}, "priority"),
        ({"use_beam_search": True}, "use_beam_search is not supported"),
        ({"echo": True}, "echo is not supported"),
        ({"top_logprobs": 2}, "logprobs"),
    ],
)
def test_bad_or_unserved_chat_bodies_are_refused(change, match) -> None:
    with pytest.raises(InvalidRequest, match=match):
        p.generation(p.parse(p.ChatRequest, CHAT | change))


def test_too_many_choices_are_refused() -> None:
    p.check_choices(8, 8)
    with pytest.raises(InvalidRequest, match="at most 64"):
        p.check_choices(5, 13)


def test_named_and_required_tool_choices_constrain_the_output() -> None:
    named = p.parse(
        p.ChatRequest,
        CHAT | {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    )
    plan = p.tool_plan(named, None)
    assert plan.mode == "named" and plan.function == "f"
    params, _ = p.generation(named)
    assert params.extra["structured_outputs"]["json"]["properties"] == {"a": {"type": "integer"}}
    content, calls = p.read_tool_calls(plan, '{"a": 1}', named, None)
    assert content is None and calls[0].function.name == "f"
    assert json.loads(calls[0].function.arguments) == {"a": 1}

    required = p.parse(p.ChatRequest, CHAT | {"tools": [TOOL], "tool_choice": "required"})
    plan = p.tool_plan(required, None)
    assert plan.mode == "required"
    _, calls = p.read_tool_calls(plan, '[{"name": "f", "parameters": {"a": 2}}]', required, None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"a": 2})]
    # Cut short by max_tokens: no calls, the text stays visible.
    assert p.read_tool_calls(plan, '[{"name": "f", "par', required, None) == (
        '[{"name": "f", "par',
        [],
    )


def test_tool_choice_auto_needs_a_tool_parser() -> None:
    body = p.parse(p.ChatRequest, CHAT | {"tools": [TOOL]})
    with pytest.raises(InvalidRequest, match="no tool_parser"):
        p.tool_plan(body, None)
    assert p.tool_plan(body, "hermes").mode == "auto"
    assert p.tool_plan(p.parse(p.ChatRequest, CHAT), None).mode == "none"


def test_completion_logprobs_offsets_follow_the_text() -> None:
    lp = p.completion_logprobs([("A", None, []), ("bc", -0.5, [("bc", -0.5), ("x", -2.0)])], 3)
    assert lp.text_offset == [3, 4]
    assert lp.token_logprobs == [None, -0.5]
    assert lp.top_logprobs == [None, {"bc": -0.5, "x": -2.0}]


def test_chat_logprobs_carry_bytes_and_top_entries() -> None:
    lp = p.chat_logprobs([("é", -0.1, [("é", -0.1), ("e", -3.0)])])
    entry = lp.content[0]
    assert entry.bytes == list("é".encode()) and [t.token for t in entry.top_logprobs] == ["é", "e"]
