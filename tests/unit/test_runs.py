"""A run's token budget and deadline split, and the calls ahead of each node."""

from __future__ import annotations

import pytest

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.graph import END, START, Field, StateGraph
from airi_ray.core.nodes import ModelCall, calls_ahead
from airi_ray.core.runs import (
    RunBudgetExceeded,
    RunDeadlineExceeded,
    RunLimits,
    RunOptions,
    charged_event,
    last_status,
    progress,
)


def test_the_budget_caps_each_call_and_stops_the_run() -> None:
    limits = RunLimits(RunOptions(token_budget=100), started_at=0.0)
    assert limits.max_tokens(prompt_tokens=30, wanted=500) == 70
    limits.charge("a", 60)
    limits.charge("b", 30)
    assert limits.remaining == 10 and limits.per_model == {"a": 60, "b": 30}
    assert limits.max_tokens(prompt_tokens=5, wanted=8) == 5
    with pytest.raises(RunBudgetExceeded, match="has 10 left, not enough for a call with a 10"):
        limits.max_tokens(prompt_tokens=10, wanted=8)
    limits.charge("a", 10)
    with pytest.raises(RunBudgetExceeded, match="spent its token budget of 100 tokens"):
        limits.check(now=1.0)


def test_no_budget_means_no_cap() -> None:
    limits = RunLimits(RunOptions(), started_at=0.0)
    assert limits.remaining is None and limits.max_tokens(1000, 64) == 64
    limits.check(now=1e9)


def test_the_deadline_is_shared_among_the_calls_ahead() -> None:
    limits = RunLimits(RunOptions(deadline_s=10.0), started_at=100.0)
    assert limits.call_deadline_s(now=102.0, calls_ahead=3) == pytest.approx(2.0)
    assert limits.call_deadline_s(now=102.0, calls_ahead=0) == pytest.approx(8.0)
    assert RunLimits(RunOptions(), 0.0).call_deadline_s(now=5.0, calls_ahead=2) is None
    with pytest.raises(RunDeadlineExceeded):
        limits.call_deadline_s(now=111.0, calls_ahead=0)
    with pytest.raises(RunDeadlineExceeded):
        limits.check(now=110.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": "urgent"}, "priority must be one of"),
        ({"token_budget": 0}, "token_budget must be a positive integer"),
        ({"token_budget": True}, "token_budget must be a positive integer"),
        ({"deadline_s": -1}, "deadline_s must be"),
        ({"deadline_s": 10**9}, "deadline_s must be"),
    ],
)
def test_bad_run_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        RunOptions(**options)


def test_calls_ahead_counts_model_calls_on_the_longest_path() -> None:
    call = ModelCall("chat", "m", lambda v: "x", "out")
    g = StateGraph("g", {"out": Field(), "n": Field(default=0)})
    g.add_node("intent", call, writes=["out"])
    g.add_node("tool", lambda v: {}, writes=[])
    g.add_node("draft", call, writes=["out"])
    g.add_node("answer", call, writes=["out"])
    g.add_edge(START, "intent").add_edge("intent", "tool").add_edge("tool", "draft")
    g.add_conditional_edges(
        "draft",
        lambda v: "done",
        {"again": "draft", "done": "answer"},
        max_iterations=2,
        exit="done",
    )
    g.add_edge("answer", END)
    ahead = calls_ahead(g.compile())
    assert ahead == {"intent": 2, "tool": 2, "draft": 1, "answer": 0}


# -- what carries across a resume ----------------------------------------------------------


def test_a_resumed_run_keeps_its_spent_time_against_the_deadline() -> None:
    options = RunOptions(deadline_s=50.0)
    done = progress([{"status": "started"}], [{"step": 0, "node": "a", "elapsed_s": 40.0}])
    limits = RunLimits.resumed(options, now=1000.0, progress=done)
    assert limits.elapsed(1000.0) == 40.0 and limits.elapsed(1005.0) == 45.0
    assert limits.call_deadline_s(1005.0, calls_ahead=0) == pytest.approx(5.0)
    limits.check(now=1009.0)
    with pytest.raises(RunDeadlineExceeded):
        limits.check(now=1010.0)
    with pytest.raises(RunDeadlineExceeded):
        limits.call_deadline_s(1010.0, calls_ahead=1)


def test_a_resumed_run_keeps_its_spent_tokens_including_an_interrupted_node() -> None:
    events = [
        {"status": "started"},
        charged_event("m", 30, 1.0, "a"),
        charged_event("m", 25, 2.0, "b"),  # b was interrupted before its checkpoint
        charged_event("e", 5, 2.5, "b"),
    ]
    checkpoints = [{"step": 0, "node": "a", "usage": {"m": 30}, "elapsed_s": 1.5}]
    done = progress(events, checkpoints)
    assert dict(done.per_model) == {"m": 55, "e": 5} and done.calls == 3
    assert done.elapsed_s == 2.5
    limits = RunLimits.resumed(RunOptions(token_budget=70), now=0.0, progress=done)
    assert limits.spent == 60 and limits.remaining == 10 and limits.calls == 3
    with pytest.raises(RunBudgetExceeded, match="has 10 left"):
        limits.max_tokens(prompt_tokens=10, wanted=8)


def test_a_run_recorded_without_charges_counts_its_checkpoints() -> None:
    checkpoints = [{"usage": {"m": 30}}, {"usage": {"m": 10, "e": 2}}, {"usage": {}}]
    done = progress([{"status": "started"}], checkpoints)
    assert dict(done.per_model) == {"m": 40, "e": 2} and done.calls == 3
    assert done.elapsed_s == 0.0


def test_the_last_status_skips_the_charges() -> None:
    events = [{"status": "started"}, charged_event("m", 1, 0.1, "a"), {"status": "resumed"}]
    assert last_status([*events, charged_event("m", 1, 0.2, "b")]) == {"status": "resumed"}
    assert last_status([*events, {"status": "finished"}])["status"] == "finished"
    with pytest.raises(ValueError, match="no recorded start"):
        last_status([charged_event("m", 1, 0.1, "a")])
