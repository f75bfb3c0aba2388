"""The pure half of ``AiriChatModel`` (``airi_ray.langgraph.convert``) and the run book:
message conversion, tool schemas and tool-call parsing, the run identity a LangGraph
config carries, and a run's budget and deadline across its calls, on a fake clock."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.runs import (
    RunBook,
    RunBudgetExceeded,
    RunDeadlineExceeded,
    RunOptions,
    charged_event,
    progress,
)
from airi_ray.langgraph.convert import (
    ai_message,
    read_tool_calls,
    run_identity,
    to_messages,
    tool_choice_name,
    tools_schema,
    trace_id,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_messages_convert_with_tool_calls_and_answers() -> None:
    out = to_messages(
        [
            SystemMessage("be brief"),
            HumanMessage("weather in Oslo?"),
            AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "c1"}]),
            ToolMessage("rain", tool_call_id="c1"),
        ]
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    call = out[2]["tool_calls"][0]
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert out[3]["tool_call_id"] == "c1"


def test_tool_choice_forms() -> None:
    assert tool_choice_name(None) is None
    assert tool_choice_name("any") == "required"
    assert tool_choice_name(True) == "required"
    assert tool_choice_name("weather") == "weather"
    assert tool_choice_name({"type": "function", "function": {"name": "weather"}}) == "weather"
    with pytest.raises(InvalidRequest, match="tool_choice must be"):
        tool_choice_name(3)


def test_tools_schema_per_choice() -> None:
    assert tools_schema([WEATHER], "auto") is None
    assert tools_schema([WEATHER], "weather") == WEATHER["function"]["parameters"]
    required = tools_schema([WEATHER], "required")
    assert required is not None and required["type"] == "array"
    item = required["items"]["anyOf"][0]
    assert item["properties"]["name"]["enum"] == ["weather"]
    with pytest.raises(InvalidRequest, match="not a bound tool; bound: weather"):
        tools_schema([WEATHER], "stocks")
    with pytest.raises(InvalidRequest, match="needs tools"):
        tools_schema([], "required")


def test_named_and_required_answers_become_tool_calls() -> None:
    named = read_tool_calls('{"city": "Oslo"}', "weather", bound=True)
    assert named.content == ""
    assert [(c["name"], c["args"]) for c in named.tool_calls] == [("weather", {"city": "Oslo"})]
    assert named.tool_calls[0]["id"].startswith("call_")
    required = read_tool_calls(
        '[{"name": "weather", "parameters": {"city": "Bergen"}}]', "required", bound=True
    )
    assert [(c["name"], c["args"]) for c in required.tool_calls] == [
        ("weather", {"city": "Bergen"})
    ]


def test_invalid_json_becomes_an_invalid_tool_call() -> None:
    cut = read_tool_calls('{"city": "Os', "weather", bound=True)
    assert cut.tool_calls == []
    assert cut.invalid_tool_calls[0]["name"] == "weather"
    assert "invalid JSON" in cut.invalid_tool_calls[0]["error"]
    assert read_tool_calls("[{", "required", bound=True).invalid_tool_calls


def test_auto_reads_hermes_blocks_and_keeps_the_text() -> None:
    text = (
        'Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    answer = read_tool_calls(text, "auto", bound=True)
    assert answer.content == "Let me check."
    assert answer.tool_calls[0]["args"] == {"city": "Oslo"}
    plain = read_tool_calls("It rains.", None, bound=True)
    assert plain.content == "It rains." and plain.tool_calls == []
    assert read_tool_calls('{"city": "x"}', "weather", bound=False).tool_calls == []


def test_ai_message_carries_usage_and_metadata() -> None:
    answer = read_tool_calls('{"city": "Oslo"}', "weather", bound=True)
    msg = ai_message(answer, "tiny-chat", "stop", "req-1", 12, 5)
    assert msg.usage_metadata == {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}
    assert msg.response_metadata == {"model_name": "tiny-chat", "finish_reason": "tool_calls"}
    assert msg.id == "req-1"
    assert msg.tool_calls[0]["name"] == "weather"


def test_run_identity_from_a_langgraph_config() -> None:
    assert run_identity({}) is None
    assert run_identity(None) is None
    config = {
        "configurable": {"thread_id": "t-1", "airi_token_budget": 100, "airi_deadline_s": 30},
        "metadata": {"langgraph_node": "answer"},
    }
    identity = run_identity(config)
    assert identity is not None
    assert (identity.run_id, identity.node) == ("t-1", "answer")
    assert identity.options == RunOptions(token_budget=100, deadline_s=30)
    with pytest.raises(InvalidRequest, match="token_budget must be a positive integer"):
        run_identity({"configurable": {"thread_id": "t", "airi_token_budget": -1}})
    with pytest.raises(InvalidRequest, match="thread_id must be"):
        run_identity({"configurable": {"thread_id": ""}})
    with pytest.raises(InvalidRequest, match="priority must be one of"):
        run_identity({"configurable": {"thread_id": "t", "airi_priority": "urgent"}})


def test_a_run_has_one_trace_id() -> None:
    assert trace_id("t-1") == trace_id("t-1")
    assert trace_id("t-1") != trace_id("t-2")
    assert 0 < trace_id("t-1") < 2**128


def test_the_run_book_shares_a_budget_across_calls() -> None:
    book = RunBook()
    options = RunOptions(token_budget=100)
    first = book.limits("t", options, now=0.0)
    assert first.max_tokens(prompt_tokens=20, wanted=1000) == 80
    first.charge("tiny-chat", 70)
    again = book.limits("t", options, now=1.0)
    assert again is first
    assert again.max_tokens(prompt_tokens=10, wanted=1000) == 20
    with pytest.raises(RunBudgetExceeded, match="has 30 left"):
        again.max_tokens(prompt_tokens=30, wanted=10)
    again.charge("tiny-chat", 30)
    with pytest.raises(RunBudgetExceeded, match="spent its token budget of 100"):
        book.limits("t", options, now=2.0).check(2.0)
    assert book.limits("other", options, now=2.0).remaining == 100


def test_the_run_book_keeps_a_deadline_from_the_first_call() -> None:
    book = RunBook()
    options = RunOptions(deadline_s=10)
    limits = book.limits("t", options, now=100.0)
    assert limits.call_deadline_s(104.0, 0) == pytest.approx(6.0)
    with pytest.raises(RunDeadlineExceeded):
        book.limits("t", options, now=111.0).check(111.0)


def test_a_run_resumed_in_a_new_process_starts_from_its_recorded_charges() -> None:
    """The graph's process was killed after two calls; the resumed run's first call here
    reads their ``charged`` events: the budget and the deadline go on from them."""
    events = [
        charged_event("tiny-chat", 40, elapsed_s=2.0, node="intent"),
        charged_event("tiny-chat", 35, elapsed_s=5.5, node="answer"),
    ]
    book = RunBook()
    assert book.get("t") is None
    options = RunOptions(token_budget=100, deadline_s=10)
    limits = book.limits("t", options, now=50.0, progress=progress(events, []))
    assert (limits.spent, limits.calls, limits.remaining) == (75, 2, 25)
    assert limits.call_deadline_s(51.0, 0) == pytest.approx(3.5)
    assert book.get("t") is limits
    # Read again later (another call of this process): the book's own count stands.
    limits.charge("tiny-chat", 20)
    assert book.limits("t", options, 52.0, progress(events, [])).remaining == 5


def test_the_run_book_forgets_the_least_recent_run() -> None:
    book = RunBook(max_runs=2)
    options = RunOptions()
    book.limits("a", options, 0.0)
    book.limits("b", options, 0.0)
    book.limits("a", options, 1.0)
    book.limits("c", options, 2.0)
    assert list(book.runs) == ["a", "c"]
