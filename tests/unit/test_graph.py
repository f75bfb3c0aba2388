"""The graph core: compile checks, supersteps, reducers, loops, checkpoints, run_local."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.graph import (
    END,
    REDUCERS,
    START,
    CompiledGraph,
    Field,
    GraphError,
    Node,
    RetryPolicy,
    RunError,
    RunState,
    StateGraph,
    add,
    append,
    merge,
    replace,
    run_local,
)


def writer(**writes: Any) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A node action returning fixed writes."""
    return lambda view: dict(writes)


def logger(name: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A node action appending its name to the ``log`` field."""
    return lambda view: {"log": name}


def log_graph(name: str = "g") -> StateGraph:
    return StateGraph(name, {"log": Field(append, [])})


def drive(
    graph: CompiledGraph, state: RunState, order: Callable[[list[str]], list[str]] = sorted
) -> RunState:
    """Run to the end with the actions as callables, completing each step's nodes in ``order``."""
    while not state.done:
        for name in order(list(state.pending)):
            node = graph.nodes[name]
            state = graph.complete(state, name, node.action(graph.view(state, name)))
    return state


# -- reducers and small parts ------------------------------------------------------------


def test_reducers() -> None:
    assert replace(1, 2) == 2
    assert append(None, "a") == ["a"]
    assert append(["a"], ["b", "c"]) == ["a", "b", "c"]
    assert append(["a"], ("b",)) == ["a", ("b",)]
    assert add(None, 3) == 3 and add(2, 0.5) == 2.5
    assert merge(None, {"a": 1}) == {"a": 1}
    assert merge({"a": 1, "b": 1}, {"b": 2}) == {"a": 1, "b": 2}
    assert [REDUCERS[k] for k in ("replace", "append", "add", "merge")] == [
        replace,
        append,
        add,
        merge,
    ]


def test_reducers_do_not_mutate_the_old_value() -> None:
    old_list, old_dict = ["a"], {"a": 1}
    append(old_list, "b")
    merge(old_dict, {"b": 2})
    assert old_list == ["a"] and old_dict == {"a": 1}


def test_retry_policy_delays_double_up_to_the_cap() -> None:
    p = RetryPolicy(max_attempts=5, backoff_s=1.0, max_backoff_s=3.0)
    assert [p.delay_s(k) for k in range(1, 6)] == [0.0, 1.0, 2.0, 3.0, 3.0]
    assert RetryPolicy().delay_s(2) == 0.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1, got 0"),
        ({"backoff_s": -1.0}, "must not be negative"),
    ],
)
def test_retry_policy_refuses_bad_values(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(GraphError, match=words):
        RetryPolicy(**kwargs)


# -- supersteps --------------------------------------------------------------------------


def test_linear_chain_runs_one_node_per_step() -> None:
    g = (
        StateGraph("chain", {"x": Field(), "y": Field(), "z": Field()}, inputs=["x"])
        .add_node("double", lambda v: {"y": v["x"] * 2}, reads=["x"], writes=["y"])
        .add_node("inc", lambda v: {"z": v["y"] + 1}, reads=["y"], writes=["z"])
        .add_edge(START, "double")
        .add_edge("double", "inc")
        .add_edge("inc", END)
        .compile()
    )
    s0 = g.start({"x": 3})
    assert (s0.step, s0.pending, s0.ready, s0.done) == (0, ("double",), ("double",), False)
    s1 = g.complete(s0, "double", {"y": 6})
    assert (s1.step, s1.pending, s1.values["y"]) == (1, ("inc",), 6)
    final = run_local(g, {"x": 3})
    assert final.done and final.values == {"x": 3, "y": 6, "z": 7}
    assert final.step == 2
    assert final.visits == {"double": 1, "inc": 1}
    assert final.trail == ((0, "double", "->"), (1, "inc", "->"))


def test_fan_out_of_three_then_join() -> None:
    g = log_graph()
    for name in ("a", "b", "c", "d", "after"):
        g.add_node(name, logger(name), writes=["log"])
    g.add_edge(START, "a")
    for name in ("b", "c", "d"):
        g.add_edge("a", name)
    g.add_edge(["b", "c", "d"], "after").add_edge("after", END)
    cg = g.compile()

    s = g.compile().start({})
    s = cg.complete(s, "a", {"log": "a"})
    assert (s.step, s.pending) == (1, ("b", "c", "d"))
    s = cg.complete(s, "c", {"log": "c"})
    s = cg.complete(s, "b", {"log": "b"})
    assert s.pending == ("d",) and s.values["log"] == ["a"]  # merged only at step end
    assert set(s.completed) == {"b", "c"}
    s = cg.complete(s, "d", {"log": "d"})
    assert (s.step, s.pending, s.joins) == (2, ("after",), {})
    # Merged in node-name order, whatever the completion order.
    assert s.values["log"] == ["a", "b", "c", "d"]
    final = run_local(cg, {})
    assert final.values["log"] == ["a", "b", "c", "d", "after"]
    assert final.visits["after"] == 1


def test_join_waits_across_supersteps() -> None:
    # 'slow' finishes one step after 'fast': the join records 'fast' and waits.
    g = log_graph()
    for name in ("fast", "slow1", "slow2", "both"):
        g.add_node(name, logger(name), writes=["log"])
    g.add_edge(START, "fast").add_edge(START, "slow1").add_edge("slow1", "slow2")
    g.add_edge(["fast", "slow2"], "both").add_edge("both", END)
    cg = g.compile()
    s = cg.start({})
    s = cg.complete(cg.complete(s, "fast", {}), "slow1", {})
    assert s.pending == ("slow2",) and s.joins == {"both": ("fast",)}
    s = cg.complete(s, "slow2", {})
    assert s.pending == ("both",) and s.joins == {}
    assert run_local(cg, {}).values["log"] == ["fast", "slow1", "slow2", "both"]


def test_a_target_reached_from_several_sources_runs_once() -> None:
    g = log_graph()
    for name in ("a", "b", "t"):
        g.add_node(name, logger(name), writes=["log"])
    g.add_edge(START, "a").add_edge(START, "b").add_edge("a", "t").add_edge("b", "t")
    final = run_local(g.compile(), {})
    assert final.values["log"] == ["a", "b", "t"]
    assert final.visits["t"] == 1


def test_all_nodes_of_a_step_see_the_state_at_its_start() -> None:
    seen: dict[str, Any] = {}

    def reader(name: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        def act(view: Mapping[str, Any]) -> dict[str, Any]:
            seen[name] = view["n"]
            return {"n": 10}

        return act

    g = (
        StateGraph("g", {"n": Field(add, 0)})
        .add_node("a", reader("a"), reads=["n"], writes=["n"])
        .add_node("b", reader("b"), reads=["n"], writes=["n"])
        .add_edge(START, "a")
        .add_edge(START, "b")
        .compile()
    )
    assert run_local(g, {}).values["n"] == 20
    assert seen == {"a": 0, "b": 0}


def test_a_node_cannot_change_the_state_through_its_view() -> None:
    def meddle(view: dict[str, Any]) -> dict[str, Any]:
        view["docs"].append("sneaky")
        return {}

    g = (
        StateGraph("g", {"docs": Field(append, ["d1"])})
        .add_node("meddle", meddle, reads=["docs"])
        .add_edge(START, "meddle")
        .compile()
    )
    assert run_local(g, {}).values["docs"] == ["d1"]


def test_defaults_are_copied_per_run() -> None:
    g = (
        StateGraph("g", {"log": Field(append, [])})
        .add_node("a", logger("a"), writes=["log"])
        .add_edge(START, "a")
        .compile()
    )
    assert run_local(g, {}).values["log"] == ["a"]
    assert run_local(g, {}).values["log"] == ["a"]
    assert g.fields["log"].default == []


def test_complete_leaves_the_old_state_as_it_was() -> None:
    g = (
        StateGraph("g", {"log": Field(append, [])})
        .add_node("a", logger("a"), writes=["log"])
        .add_node("b", logger("b"), writes=["log"])
        .add_edge(START, "a")
        .add_edge("a", "b")
        .compile()
    )
    s0 = g.start({})
    before = s0.to_dict()
    s1 = g.complete(s0, "a", {"log": "a"})
    assert s0.to_dict() == before
    g.complete(s1, "b", {"log": "b"})
    assert s1.values["log"] == ["a"] and s1.pending == ("b",)


# -- branches and loops ------------------------------------------------------------------


def intent_graph() -> CompiledGraph:
    """intent -> (code | chat) -> answer: a conditional choice of model."""
    fields = {"question": Field(), "intent": Field(), "draft": Field(), "answer": Field()}
    return (
        StateGraph("intent", fields, inputs=["question"])
        .add_node(
            "classify",
            lambda v: {"intent": "code" if "python" in v["question"] else "chat"},
            reads=["question"],
            writes=["intent"],
        )
        .add_node("coder", writer(draft="def f(): ..."), reads=["question"], writes=["draft"])
        .add_node("chatter", writer(draft="hello"), reads=["question"], writes=["draft"])
        .add_node(
            "answer", lambda v: {"answer": v["draft"].upper()}, reads=["draft"], writes=["answer"]
        )
        .add_edge(START, "classify")
        .add_conditional_edges(
            "classify",
            lambda v: v["intent"],
            {"code": "coder", "chat": "chatter"},
            reads=["intent"],
        )
        .add_edge("coder", "answer")
        .add_edge("chatter", "answer")
        .add_edge("answer", END)
        .compile()
    )


@pytest.mark.parametrize(
    "question, side, other, answer",
    [
        ("how do I sort in python", "coder", "chatter", "DEF F(): ..."),
        ("how are you", "chatter", "coder", "HELLO"),
    ],
)
def test_conditional_branch_takes_each_side(
    question: str, side: str, other: str, answer: str
) -> None:
    final = run_local(intent_graph(), {"question": question})
    assert final.values["answer"] == answer
    assert final.visits[side] == 1 and final.visits[other] == 0
    assert final.trail[0] == (0, "classify", "code" if side == "coder" else "chat")


def test_branch_to_end_stops_the_run() -> None:
    g = (
        StateGraph("g", {"stop": Field(), "log": Field(append, [])}, inputs=["stop"])
        .add_node("check", logger("check"), writes=["log"])
        .add_node("more", logger("more"), writes=["log"])
        .add_edge(START, "check")
        .add_conditional_edges(
            "check",
            lambda v: "stop" if v["stop"] else "go",
            {"stop": END, "go": "more"},
            reads=["stop"],
        )
        .compile()
    )
    assert run_local(g, {"stop": True}).values["log"] == ["check"]
    assert run_local(g, {"stop": False}).values["log"] == ["check", "more"]


def test_router_returning_an_unknown_key_is_a_run_error() -> None:
    g = (
        StateGraph("g", {})
        .add_node("a", writer())
        .add_node("b", writer())
        .add_edge(START, "a")
        .add_conditional_edges("a", lambda v: "maybe", {"yes": "b", "no": END})
        .compile()
    )
    with pytest.raises(RunError, match=r"'a' returned 'maybe'; allowed keys: 'yes', 'no'"):
        run_local(g, {})


def rag_graph(threshold: float, max_iterations: int = 2) -> CompiledGraph:
    """retrieve -> generate -> grade; grade loops to rewrite -> retrieve until good enough."""
    fields = {
        "question": Field(),
        "query": Field(),
        "context": Field(),
        "draft": Field(),
        "score": Field(),
        "answer": Field(),
        "attempts": Field(add, 0),
    }

    def generate(v: Mapping[str, Any]) -> dict[str, Any]:
        return {"draft": f"draft from {v['context']}", "attempts": 1}

    def grade(v: Mapping[str, Any]) -> dict[str, Any]:
        return {"score": 0.3 * v["attempts"]}  # each attempt improves the draft

    return (
        StateGraph("rag", fields, inputs=["question"])
        .add_node(
            "retrieve",
            lambda v: {"context": f"docs for {v['query'] or v['question']}"},
            reads=["question", "query"],
            writes=["context"],
        )
        .add_node("generate", generate, reads=["context", "attempts"], writes=["draft", "attempts"])
        .add_node("grade", grade, reads=["draft", "attempts"], writes=["score"])
        .add_node(
            "rewrite",
            lambda v: {"query": v["question"] + "?"},
            reads=["question"],
            writes=["query"],
        )
        .add_node("answer", lambda v: {"answer": v["draft"]}, reads=["draft"], writes=["answer"])
        .add_edge(START, "retrieve")
        .add_edge("retrieve", "generate")
        .add_edge("generate", "grade")
        .add_conditional_edges(
            "grade",
            lambda v: "good" if v["score"] >= threshold else "retry",
            {"good": "answer", "retry": "rewrite"},
            reads=["score"],
            max_iterations=max_iterations,
            exit="good",
        )
        .add_edge("rewrite", "retrieve")
        .add_edge("answer", END)
        .compile()
    )


def test_refinement_loop_stops_at_its_threshold() -> None:
    final = run_local(rag_graph(threshold=0.5, max_iterations=5), {"question": "q"})
    # score 0.3 after one attempt, 0.6 after two: one retry.
    assert final.visits["generate"] == 2 and final.visits["rewrite"] == 1
    assert final.iterations == {"grade": 1}
    assert [t for t in final.trail if t[1] == "grade"] == [
        (2, "grade", "retry"),
        (6, "grade", "good"),
    ]
    assert final.values["answer"] == "draft from docs for q?"


def test_refinement_loop_stops_at_its_bound() -> None:
    final = run_local(rag_graph(threshold=10.0, max_iterations=2), {"question": "q"})
    assert final.visits["generate"] == 3 and final.visits["rewrite"] == 2
    assert final.visits["answer"] == 1
    assert final.iterations == {"grade": 2}
    grades = [t[2] for t in final.trail if t[1] == "grade"]
    assert grades == ["retry", "retry", "exit:good"]
    assert final.values["attempts"] == 3


def test_self_loop_through_a_branch() -> None:
    g = (
        StateGraph("g", {"n": Field(add, 0)})
        .add_node("tick", writer(n=1), writes=["n"])
        .add_edge(START, "tick")
        .add_conditional_edges(
            "tick", lambda v: "again", {"again": "tick", "done": END}, max_iterations=3, exit="done"
        )
        .compile()
    )
    assert g.back_paths == {"tick": frozenset({"again"})}
    final = run_local(g, {})
    assert final.values["n"] == 4 and final.trail[-1] == (3, "tick", "exit:done")


# -- reducers across parallel nodes ------------------------------------------------------


def test_append_from_parallel_nodes() -> None:
    g = StateGraph("g", {"docs": Field(append)})
    g.add_node("web", writer(docs=["w1", "w2"]), writes=["docs"])
    g.add_node("kb", writer(docs="k1"), writes=["docs"])
    g.add_node("cache", writer(docs=[]), writes=["docs"])
    for n in ("web", "kb", "cache"):
        g.add_edge(START, n)
    assert run_local(g.compile(), {}).values["docs"] == ["k1", "w1", "w2"]


def test_add_and_merge_from_parallel_nodes() -> None:
    g = StateGraph("g", {"tokens": Field(add), "meta": Field(merge)})
    g.add_node("a", writer(tokens=3, meta={"a": 1, "k": "a"}), writes=["tokens", "meta"])
    g.add_node("b", writer(tokens=4, meta={"b": 2, "k": "b"}), writes=["tokens", "meta"])
    g.add_edge(START, "a").add_edge(START, "b")
    values = run_local(g.compile(), {}).values
    assert values["tokens"] == 7 and values["meta"] == {"a": 1, "b": 2, "k": "b"}


def test_conflicting_replace_writes_are_a_run_error() -> None:
    g = (
        StateGraph("g", {"answer": Field()})
        .add_node("a", writer(answer="A"), writes=["answer"])
        .add_node("b", writer(answer="B"), writes=["answer"])
        .add_edge(START, "a")
        .add_edge(START, "b")
        .compile()
    )
    with pytest.raises(RunError, match=r"nodes 'a' and 'b' both wrote 'answer' in step 0"):
        run_local(g, {})


def test_undeclared_write_is_a_run_error() -> None:
    g = (
        StateGraph("g", {"x": Field(), "y": Field()})
        .add_node("a", writer(y=1), writes=["x"])
        .add_edge(START, "a")
        .compile()
    )
    with pytest.raises(
        RunError, match=r"node 'a' wrote 'y', which it does not declare \(writes: 'x'\)"
    ):
        run_local(g, {})
    with pytest.raises(RunError, match=r"returned NoneType; a node returns a mapping"):
        g.complete(g.start({}), "a", None)  # type: ignore[arg-type]


def test_completing_a_node_that_is_not_pending_is_a_run_error() -> None:
    g = intent_graph()
    s = g.start({"question": "hi"})
    with pytest.raises(
        RunError, match=r"node 'answer' is not pending in step 0 \(pending: 'classify'\)"
    ):
        g.complete(s, "answer", {})
    with pytest.raises(RunError, match=r"has no node 'ghost'"):
        g.complete(s, "ghost", {})
    s = g.complete(s, "classify", {"intent": "chat"})
    with pytest.raises(RunError, match="not pending"):
        g.complete(s, "classify", {"intent": "chat"})


# -- compile errors ----------------------------------------------------------------------


def base() -> StateGraph:
    """A valid graph to break: a -> b, with fields x (input) and y."""
    return (
        StateGraph("g", {"x": Field(), "y": Field()}, inputs=["x"])
        .add_node("a", writer(y=1), reads=["x"], writes=["y"])
        .add_node("b", writer(), reads=["y"])
        .add_edge(START, "a")
        .add_edge("a", "b")
    )


def loop_graph(**branch: Any) -> StateGraph:
    """retrieve -> grade -(retry)-> rewrite -> retrieve, grade -(good)-> END."""
    return (
        StateGraph("loop", {"s": Field()})
        .add_node("retrieve", writer())
        .add_node("grade", writer(s=1), writes=["s"])
        .add_node("rewrite", writer())
        .add_edge(START, "retrieve")
        .add_edge("retrieve", "grade")
        .add_edge("rewrite", "retrieve")
        .add_conditional_edges(
            "grade", lambda v: "good", {"good": END, "retry": "rewrite"}, reads=["s"], **branch
        )
    )


COMPILE_ERRORS: list[tuple[str, Callable[[], StateGraph], str]] = [
    (
        "unknown edge target",
        lambda: base().add_edge("b", "ghost"),
        r"edge 'b' -> 'ghost' names unknown node 'ghost' \(nodes: 'a', 'b', or END\)",
    ),
    (
        "unknown edge source",
        lambda: base().add_edge("ghost", "b"),
        r"edge 'ghost' -> 'b' names unknown node 'ghost'",
    ),
    (
        "unknown join source",
        lambda: base().add_edge(["a", "ghost"], "b"),
        r"edge 'a', 'ghost' -> 'b' names unknown node 'ghost'",
    ),
    (
        "unknown branch target",
        lambda: base().add_conditional_edges("b", lambda v: "k", {"k": "ghost"}),
        r"branch from 'b' path 'k' goes to unknown node 'ghost'",
    ),
    (
        "unknown branch source",
        lambda: base().add_conditional_edges("ghost", lambda v: "k", {"k": END}),
        r"conditional edges from 'ghost': unknown node",
    ),
    ("duplicate node", lambda: base().add_node("a", writer()), r"node 'a' is added twice"),
    (
        "node named START",
        lambda: base().add_node(START, writer()),
        r"'__start__' is reserved for the graph's entry and exit",
    ),
    (
        "node named END",
        lambda: base().add_node(END, writer()),
        r"'__end__' is reserved",
    ),
    (
        "no edge from START",
        lambda: StateGraph("g", {}).add_node("a", writer()).add_edge("a", END),
        r"graph 'g' has no edge from START",
    ),
    (
        "unreachable node",
        lambda: base().add_node("island", writer()).add_edge("island", END),
        r"node 'island' is not reachable from START",
    ),
    (
        "join with an unreachable source",
        lambda: base().add_node("c", writer()).add_node("d", writer()).add_edge(["b", "c"], "d"),
        r"node 'c' is not reachable from START",
    ),
    (
        "plain cycle",
        lambda: base().add_edge("b", "a"),
        r"cycle 'a' -> 'b' -> 'a' is made only of plain edges",
    ),
    (
        "plain self loop",
        lambda: base().add_edge("b", "b"),
        r"cycle 'b' -> 'b' is made only of plain edges",
    ),
    (
        "unbounded loop",
        lambda: loop_graph(),
        r"loop through 'grade' -> 'rewrite' has no bound: "
        r"pass max_iterations and exit to add_conditional_edges",
    ),
    (
        "bound without exit",
        lambda: loop_graph(max_iterations=2),
        r"loop through 'grade' -> 'rewrite' has max_iterations but no exit",
    ),
    (
        "exit not a path key",
        lambda: loop_graph(max_iterations=2, exit="done"),
        r"branch from 'grade': exit 'done' is not a key of its paths \(keys: 'good', 'retry'\)",
    ),
    (
        "exit closing the loop",
        lambda: loop_graph(max_iterations=2, exit="retry"),
        r"exit 'retry' goes to 'rewrite', which loops back to 'grade'; the exit must leave",
    ),
    (
        "max_iterations below 1",
        lambda: loop_graph(max_iterations=0, exit="good"),
        r"branch from 'grade': max_iterations must be at least 1, got 0",
    ),
    (
        "node reads an undeclared field",
        lambda: base().add_node("c", writer(), reads=["nope"]).add_edge("b", "c"),
        r"node 'c' reads 'nope', which is not a declared field \(fields: 'x', 'y'\)",
    ),
    (
        "branch reads an undeclared field",
        lambda: base().add_conditional_edges("b", lambda v: "k", {"k": END}, reads=["nope"]),
        r"branch from 'b' reads 'nope', which is not a declared field",
    ),
    (
        "node reads a field nobody writes",
        lambda: (
            StateGraph("g", {"context": Field()})
            .add_node("answer", writer(), reads=["context"])
            .add_edge(START, "answer")
        ),
        r"node 'answer' reads 'context', which no node writes and is not an input",
    ),
    (
        "branch reads a field nobody writes",
        lambda: (
            StateGraph("g", {"flag": Field()})
            .add_node("a", writer())
            .add_edge(START, "a")
            .add_conditional_edges("a", lambda v: "k", {"k": END}, reads=["flag"])
        ),
        r"branch from 'a' reads 'flag', which no node writes and is not an input",
    ),
    (
        "node writes an undeclared field",
        lambda: base().add_node("c", writer(), writes=["nope"]).add_edge("b", "c"),
        r"node 'c' writes 'nope', which is not a declared field",
    ),
    (
        "input not a field",
        lambda: (
            StateGraph("g", {"x": Field()}, inputs=["x", "q"])
            .add_node("a", writer())
            .add_edge(START, "a")
        ),
        r"input 'q' is not a declared field \(fields: 'x'\)",
    ),
    (
        "bad timeout",
        lambda: base().add_node("c", writer(), timeout_s=0).add_edge("b", "c"),
        r"node 'c' timeout_s must be positive or None, got 0",
    ),
    (
        "two joins into one node",
        lambda: (
            base()
            .add_node("c", writer())
            .add_node("d", writer())
            .add_edge("a", "c")
            .add_edge(["b", "c"], "d")
            .add_edge(["a", "b"], "d")
        ),
        r"node 'd' is the target of two joins",
    ),
    (
        "two branches from one node",
        lambda: (
            base()
            .add_conditional_edges("b", lambda v: "k", {"k": END})
            .add_conditional_edges("b", lambda v: "k", {"k": END})
        ),
        r"node 'b' has conditional edges twice",
    ),
    (
        "edge from END",
        lambda: base().add_edge(END, "a"),
        r"starts at END",
    ),
    (
        "field not a Field",
        lambda: StateGraph("g", {"x": "replace"}),  # type: ignore[dict-item]
        r"field 'x' must be a Field, got str",
    ),
]


@pytest.mark.parametrize(
    "build, message", [c[1:] for c in COMPILE_ERRORS], ids=[c[0] for c in COMPILE_ERRORS]
)
def test_compile_errors_name_the_offender(build: Callable[[], StateGraph], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        build().compile()


def test_the_unbroken_graphs_compile() -> None:
    base().compile()
    loop_graph(max_iterations=1, exit="good").compile()


def test_reads_are_satisfied_by_inputs_writes_or_defaults() -> None:
    (
        StateGraph("g", {"x": Field(), "d": Field(default="hi"), "w": Field()}, inputs=["x"])
        .add_node("a", writer(w=1), reads=["x", "d"], writes=["w"])
        .add_node("b", writer(), reads=["w"])
        .add_edge(START, "a")
        .add_edge("a", "b")
        .compile()
    )


# -- start() -----------------------------------------------------------------------------


def input_graph() -> CompiledGraph:
    fields = {"q": Field(), "k": Field(default=3), "hist": Field(append, []), "other": Field()}
    return (
        StateGraph("in", fields, inputs=["q", "k", "hist"])
        .add_node("a", writer(other=1), reads=["q", "k", "hist"], writes=["other"])
        .add_edge(START, "a")
        .compile()
    )


def test_start_fills_defaults_and_keeps_inputs() -> None:
    s = input_graph().start({"q": "why"})
    assert s.values == {"q": "why", "k": 3, "hist": [], "other": None}
    assert input_graph().start({"q": "why", "k": 5}).values["k"] == 5


def test_start_refuses_unknown_inputs() -> None:
    with pytest.raises(
        RunError, match=r"graph 'in' has no input 'other' \(inputs: 'q', 'k', 'hist'\)"
    ):
        input_graph().start({"q": "why", "other": 1})


def test_start_refuses_missing_required_inputs() -> None:
    with pytest.raises(
        RunError, match=r"missing required input\(s\) 'q' \(inputs: 'q', 'k', 'hist'\)"
    ):
        input_graph().start({"k": 1})


def test_start_to_end_only_is_done_at_once() -> None:
    g = StateGraph("g", {}).add_edge(START, END).compile()
    s = g.start({})
    assert s.done and s.pending == ()


# -- checkpoints -------------------------------------------------------------------------


def test_run_state_round_trips_through_json() -> None:
    g = rag_graph(threshold=10.0)
    final = run_local(g, {"question": "q"})
    again = RunState.from_dict(json.loads(json.dumps(final.to_dict())))
    assert again == final


def test_from_dict_refuses_a_non_checkpoint() -> None:
    with pytest.raises(RunError, match=r"checkpoint has no 'values'"):
        RunState.from_dict({"step": 0})


def fanout_graph() -> CompiledGraph:
    g = StateGraph(
        "fan", {"log": Field(append, []), "n": Field(add, 0), "q": Field()}, inputs=["q"]
    )
    g.add_node("split", logger("split"), reads=["q"], writes=["log"])
    for name in ("w1", "w2", "w3"):
        g.add_node(
            name,
            lambda v, name=name: {"log": name, "n": len(v["q"])},
            reads=["q"],
            writes=["log", "n"],
        )
        g.add_edge("split", name)
    g.add_node("merge", lambda v: {"log": f"merge {v['n']}"}, reads=["n"], writes=["log"])
    g.add_edge(START, "split").add_edge(["w1", "w2", "w3"], "merge").add_edge("merge", END)
    return g.compile()


def test_resume_from_a_mid_superstep_checkpoint() -> None:
    g = fanout_graph()
    whole = run_local(g, {"q": "abc"})

    s = g.start({"q": "abc"})
    s = g.complete(s, "split", {"log": "split"})
    s = g.complete(s, "w2", {"log": "w2", "n": 3})  # one of three done, then the crash
    checkpoint = json.dumps(s.to_dict())

    resumed = RunState.from_dict(json.loads(checkpoint))
    assert resumed.pending == ("w1", "w3") and set(resumed.completed) == {"w2"}
    final = drive(g, resumed)
    assert final == whole
    assert final.values["log"] == ["split", "w1", "w2", "w3", "merge 9"]


# -- run_local ---------------------------------------------------------------------------


def test_run_local_retries_a_failing_node() -> None:
    calls: list[int] = []

    def flaky(view: Mapping[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("replica went away")
        return {"out": "ok"}

    def build(attempts: int) -> CompiledGraph:
        return (
            StateGraph("g", {"out": Field()})
            .add_node("flaky", flaky, writes=["out"], retry=RetryPolicy(max_attempts=attempts))
            .add_edge(START, "flaky")
            .compile()
        )

    assert run_local(build(3), {}).values["out"] == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionError, match="replica went away"):
        run_local(build(2), {})
    assert len(calls) == 2


def test_run_local_with_a_custom_call_for_spec_actions() -> None:
    g = (
        StateGraph("g", {"q": Field(), "a": Field()}, inputs=["q"])
        .add_node("llm", {"model": "small"}, reads=["q"], writes=["a"])
        .add_edge(START, "llm")
        .compile()
    )

    def call(node: Node, view: dict[str, Any]) -> dict[str, Any]:
        return {"a": f"{node.action['model']}: {view['q']}"}

    assert run_local(g, {"q": "hi"}, call).values["a"] == "small: hi"
    with pytest.raises(RunError, match=r"node 'llm' has a dict action, which is not callable"):
        run_local(g, {"q": "hi"})


def test_run_local_gives_up_after_max_steps() -> None:
    with pytest.raises(RunError, match=r"did not finish within max_steps=3 supersteps"):
        run_local(rag_graph(threshold=10.0), {"question": "q"}, max_steps=3)


# -- describe and purity -----------------------------------------------------------------


def test_describe_is_json_able() -> None:
    d = rag_graph(threshold=0.5).describe()
    json.dumps(d)
    assert d["name"] == "rag"
    assert [n["name"] for n in d["nodes"]] == ["retrieve", "generate", "grade", "rewrite", "answer"]
    assert d["fields"]["attempts"]["reducer"] == "add"
    [branch] = d["branches"]
    assert branch == {
        "source": "grade",
        "paths": {"good": "answer", "retry": "rewrite"},
        "reads": ["score"],
        "max_iterations": 2,
        "exit": "good",
        "loops": ["retry"],
    }
    assert {"sources": ["rewrite"], "target": "retrieve"} in d["edges"]


def test_graph_module_imports_no_runtime() -> None:
    code = (
        "import sys, airi_ray.core.graph;"
        "bad = [m for m in ('ray', 'asyncio', 'socket', 'lancedb', 'pyarrow') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- property: completion order within a superstep does not matter -----------------------


@st.composite
def layered_dags(draw: st.DrawFn) -> tuple[CompiledGraph, int]:
    """Random layers of nodes; each node is fed by one or more nodes of the layer above,
    through plain edges or a join. Every node appends its name and adds its index."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    g = StateGraph("dag", {"log": Field(append, []), "total": Field(add, 0)})
    layers: list[list[str]] = []
    for depth, size in enumerate(sizes):
        layer = [f"n{depth}_{i}" for i in range(size)]
        for i, name in enumerate(layer):
            g.add_node(
                name, lambda v, name=name, i=i: {"log": name, "total": i}, writes=["log", "total"]
            )
            if depth == 0:
                g.add_edge(START, name)
                continue
            above = layers[-1]
            feeders = draw(st.lists(st.sampled_from(above), min_size=1, unique=True))
            if len(feeders) > 1 and draw(st.booleans()):
                g.add_edge(feeders, name)
            else:
                for f in feeders:
                    g.add_edge(f, name)
        layers.append(layer)
    return g.compile(), sum(sizes)


@settings(max_examples=60, deadline=None)
@given(layered_dags(), st.randoms(use_true_random=False))
def test_completion_order_within_a_step_does_not_change_the_result(
    dag: tuple[CompiledGraph, int], rnd: random.Random
) -> None:
    graph, n_nodes = dag

    def shuffled(names: list[str]) -> list[str]:
        rnd.shuffle(names)
        return names

    reference = run_local(graph, {})
    final = drive(graph, graph.start({}), shuffled)
    assert final == reference
    assert len(final.values["log"]) == n_nodes and all(v == 1 for v in final.visits.values())
