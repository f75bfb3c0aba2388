"""Validation of model-call inputs, context windows, errors and statistics."""

import math
import pickle

import pytest

from airi_ray.core.errors import (
    AiriError,
    ContextWindowExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
)
from airi_ray.core.requests import (
    CallOptions,
    GenerationParams,
    Usage,
    parse_messages,
    probe_head,
    refuse_long_head,
    resolve_max_tokens,
    words_floor,
)
from airi_ray.core.stats import RateWindow, percentile


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 3.0}, "temperature must be between 0 and 2"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ("",)}, "stop"),
        (
            {"seed": 2**64},
            "seed must be an integer from -9223372036854775808 to 9223372036854775807",
        ),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_generation_params_refuse_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        GenerationParams(**kwargs)


def test_parse_messages() -> None:
    msgs = parse_messages(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert msgs[0].content == "ab"
    with pytest.raises(InvalidRequest, match="non-empty list"):
        parse_messages([])
    with pytest.raises(InvalidRequest, match=r"messages\[0\].role must be one of"):
        parse_messages([{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidRequest, match=r"messages\[1\].content must be a string"):
        parse_messages([{"role": "user", "content": "x"}, {"role": "user", "content": 5}])


def test_context_window() -> None:
    assert resolve_max_tokens("m", 100, None, 1024) == 924
    assert resolve_max_tokens("m", 100, 924, 1024) == 924
    with pytest.raises(ContextWindowExceeded, match="context window of 1024 tokens") as e:
        resolve_max_tokens("m", 100, 925, 1024)
    assert "at most 924" in e.value.message and e.value.status == 400
    with pytest.raises(ContextWindowExceeded, match="no room"):
        resolve_max_tokens("m", 1024, None, 1024)


@pytest.mark.parametrize("cls", [InvalidRequest, ContextWindowExceeded, ModelNotFound, Overloaded])
def test_errors_pickle_and_render_openai_bodies(cls: type[AiriError]) -> None:
    e = pickle.loads(pickle.dumps(cls("what went wrong")))
    assert type(e) is cls and e.message == "what went wrong"
    body = e.to_body()["error"]
    assert (
        body["message"] == "what went wrong"
        and body["type"] == cls.type
        and body["code"] == cls.code
    )


def test_usage_tpot() -> None:
    assert Usage(completion_tokens=11, ttft_s=0.1, e2e_s=1.1).tpot_s == pytest.approx(0.1)
    assert Usage(completion_tokens=1, ttft_s=0.1, e2e_s=0.1).tpot_s is None


def test_rate_window_and_percentile() -> None:
    w = RateWindow(10.0)
    w.add(0.0, 50)
    w.add(5.0, 50)
    assert w.rate(5.0) == 10.0
    assert w.rate(12.0) == 5.0
    assert w.rate(30.0) == 0.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"priority": "urgent"}, "priority must be one of interactive, batch"),
        ({"deadline_s": 0}, "deadline_s must be a positive number"),
        ({"deadline_s": True}, "deadline_s must be a positive number"),
        ({"session_id": ""}, "session_id must be a string of 1 to 256"),
        ({"session_id": "x" * 257}, "session_id must be a string of 1 to 256"),
    ],
)
def test_call_options_refuse_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        CallOptions(**kwargs)
    assert CallOptions(priority="batch", deadline_s=2.5, session_id="conv-1").priority == "batch"


def test_too_many_messages_are_refused_naming_the_limit() -> None:
    with pytest.raises(InvalidRequest, match="513 entries; at most 512"):
        parse_messages([{"role": "user", "content": "hi"}] * 513)
    assert len(parse_messages([{"role": "user", "content": "hi"}] * 512)) == 512


def test_a_tenant_class_caps_the_priority_of_its_calls() -> None:
    from airi_ray.core.requests import cap_priority

    assert cap_priority("interactive", "batch") == "batch"
    assert cap_priority("batch", "interactive") == "batch"
    assert cap_priority("interactive", "interactive") == "interactive"


# -- vLLM sampling extras, tool turns, structured outputs ----------------------------------


def test_sampling_extras_go_to_the_engine_by_name() -> None:
    from airi_ray.core.requests import generation_params

    p = generation_params({"max_tokens": 4, "top_k": 5, "logprobs": 2, "stop": "x"})
    assert p.extra == {"top_k": 5, "logprobs": 2} and p.logprobs == 2
    assert p.to_dict() == {
        "top_k": 5,
        "logprobs": 2,
        "max_tokens": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "stop": ["x"],
        "seed": None,
        "ignore_eos": False,
    }
    assert p.with_seed(9).seed == 9 and p.with_seed(9).extra == p.extra


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"extra": {"beam_width": 2}}, "unknown generation arguments beam_width"),
        ({"logprobs": -1}, "logprobs must be a whole number"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a"] * 1000}, "stop must be at most 4"),
    ],
)
def test_bad_sampling_extras_are_refused(kwargs, match) -> None:
    from airi_ray.core.requests import generation_params

    with pytest.raises(InvalidRequest, match=match):
        generation_params(kwargs)


def test_tool_turns_parse_and_render_for_the_template() -> None:
    msgs = parse_messages(
        [
            {"role": "user", "content": "where is A1?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "order_status", "arguments": '{"order": "A1"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
        ]
    )
    assistant = msgs[1].turn()
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0]["function"] == {
        "name": "order_status",
        "arguments": {"order": "A1"},  # templates iterate arguments as a mapping
    }
    assert msgs[2].turn("redacted") == {
        "role": "tool",
        "content": "redacted",
        "tool_call_id": "call_1",
    }


@pytest.mark.parametrize(
    "calls, match",
    [
        ("nope", "tool_calls must be a list"),
        ([{"function": {"arguments": "{}"}}], "tool_calls must be a list"),
        ([{"function": {"name": "f", "arguments": "{not json"}}], "not valid JSON"),
    ],
)
def test_bad_tool_calls_are_refused(calls, match) -> None:
    with pytest.raises(InvalidRequest, match=match):
        parse_messages([{"role": "assistant", "content": None, "tool_calls": calls}])


def test_structured_output_of_a_pydantic_model_and_of_openai_formats() -> None:
    from typing import Literal

    from pydantic import BaseModel

    from airi_ray.core.requests import structured_output

    class Verdict(BaseModel):
        verdict: Literal["yes", "no"]

    guide, read = structured_output(Verdict)
    assert guide["json"]["properties"]["verdict"]["enum"] == ["yes", "no"]
    assert read('{"verdict": "no"}') == Verdict(verdict="no")
    assert structured_output({"type": "json_object"})[0] == {"json_object": True}
    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert structured_output(fmt)[0] == {"json": schema}
    with pytest.raises(InvalidRequest, match="response_format must be"):
        structured_output({"type": "xml"})


def test_a_long_prompt_is_probed_by_a_head_that_ends_before_a_space() -> None:
    assert probe_head("word " * 100, max_model_len=16) is None  # short: tokenized whole
    text = "word " * 1000
    head = probe_head(text, max_model_len=16)
    assert head is not None and text.startswith(head)
    assert len(head) <= 16 * 16 and text[len(head)] == " "
    assert probe_head("x" * 10_000, max_model_len=16) is None  # no space to cut at


def test_a_head_over_the_window_is_refused_naming_the_window() -> None:
    refuse_long_head("m", "a b", 1023, 1024)  # room for one token
    with pytest.raises(ContextWindowExceeded, match="context window of 1024 tokens") as e:
        refuse_long_head("m", "a b", 1024, 1024)
    assert "first 3 characters alone have at least 1024 tokens" in e.value.message


def test_a_heads_tokens_never_outnumber_the_whole_prompts() -> None:
    """What the probe relies on, with a real tokenizer (the demo model's)."""
    import random

    from transformers import AutoTokenizer

    from airi_ray.models.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    words = ["tents", "boots", "refund", " ", "\n", "Nimbus", "42", "!?", "é", "日本"]
    rng = random.Random(7)
    for _ in range(50):
        text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", "  "]) for _ in range(300))
        head = probe_head(text, max_model_len=8)
        if head is None:
            continue
        count = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        assert count <= len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_texts_words_floor_its_tokens() -> None:
    """What the words floor relies on, with a real tokenizer (the demo model's ByteLevel
    BPE): never more words than tokens, whatever the spacing and characters."""
    import random

    from transformers import AutoTokenizer

    from airi_ray.models.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    backend = tokenizer.backend_tokenizer
    assert type(backend.pre_tokenizer).__name__ == "ByteLevel" and backend.normalizer is None
    pieces = ["tents", "boots", "a", "!", "?", "'s", "42", "é", "日本", "🚀", "\x1c", "\x1f"]
    gaps = [" ", "", "\n", "  ", "\t", "\u3000", "\xa0", "\x1c", "\u2028"]
    rng = random.Random(11)
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(gaps) for _ in range(rng.randint(1, 60)))
        floor = words_floor(text, "ByteLevel", normalized=False)
        assert floor is not None
        assert floor <= len(tokenizer(text, add_special_tokens=False)["input_ids"]), repr(text)


def test_the_words_floor_is_only_counted_where_it_holds() -> None:
    assert words_floor("a b c", "ByteLevel", normalized=False) == 3
    assert words_floor("a\x1cb", "WhitespaceSplit", normalized=False) == 1  # not white space
    assert words_floor("a b c", "Metaspace", normalized=False) is None  # cuts at " " only
    assert words_floor("a b c", "ByteLevel", normalized=True) is None
    assert words_floor("a b c", None, normalized=False) is None
