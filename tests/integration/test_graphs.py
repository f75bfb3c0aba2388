"""Graph runs on the Ray executor: branches, bounded loops, fan-out, budgets, fairness,
checkpoints and resume, all with real model calls through the scheduler."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pytest
import ray
from pydantic import BaseModel

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.graphs import END, START, Field, StateGraph, append, chat, embed
from airi_ray.runtime import names
from tests.conftest import OTHER_KEY, wait_for

SHORT = {"max_tokens": 8, "temperature": 0.0}


def _route(view: dict[str, Any]) -> str:
    return "long" if len(view["question"]) > 20 else "short"


def _short(view: dict[str, Any]) -> dict[str, Any]:
    return {"answer": "short: " + view["question"]}


def branch_graph() -> Any:
    g = StateGraph("branch", {"question": Field(), "answer": Field()}, inputs=["question"])
    g.add_node("route", lambda v: {}, reads=["question"])
    g.add_node(
        "long",
        chat("tiny-chat", lambda v: v["question"], output="answer", **SHORT),
        reads=["question"],
        writes=["answer"],
    )
    g.add_node("short", _short, reads=["question"], writes=["answer"])
    g.add_edge(START, "route")
    g.add_conditional_edges("route", _route, {"long": "long", "short": "short"}, reads=["question"])
    g.add_edge("long", END).add_edge("short", END)
    return g.compile()


def test_a_conditional_branch_takes_each_side(client) -> None:
    client.register_graph(branch_graph())
    short = client.run_graph("branch", {"question": "hi"})
    assert short["status"] == "finished", short
    assert short["state"]["answer"] == "short: hi"
    assert [t[1:] for t in short["trail"]] == [["route", "short"], ["short", "->"]]
    long = client.run_graph("branch", {"question": "tell me about the tents you sell"})
    assert long["status"] == "finished", long
    assert long["state"]["answer"] and not long["state"]["answer"].startswith("short")
    assert long["usage"]["per_model"]["tiny-chat"] > 0


def refine_graph() -> Any:
    def draft(view: dict[str, Any]) -> dict[str, Any]:
        return {"score": view["score"] + view["step"], "drafts": [f"draft {view['score']}"]}

    def grade(view: dict[str, Any]) -> str:
        return "done" if view["score"] >= view["threshold"] else "again"

    fields = {
        "score": Field(default=0),
        "step": Field(),
        "threshold": Field(),
        "drafts": Field(reducer=append),
    }
    g = StateGraph("refine", fields, inputs=["step", "threshold"])
    g.add_node("draft", draft, reads=["score", "step"], writes=["score", "drafts"])
    g.add_node("answer", lambda v: {"drafts": ["final"]}, writes=["drafts"])
    g.add_edge(START, "draft")
    g.add_conditional_edges(
        "draft",
        grade,
        {"again": "draft", "done": "answer"},
        reads=["score", "threshold"],
        max_iterations=4,
        exit="done",
    )
    g.add_edge("answer", END)
    return g.compile()


def test_a_refinement_loop_stops_at_its_threshold_and_at_its_bound(client) -> None:
    client.register_graph(refine_graph())
    met = client.run_graph("refine", {"step": 1, "threshold": 3})
    assert met["state"]["drafts"] == ["draft 0", "draft 1", "draft 2", "final"]
    bounded = client.run_graph("refine", {"step": 1, "threshold": 100})
    # One first draft plus four iterations of the loop, then the bound forces the exit.
    assert len(bounded["state"]["drafts"]) == 5 + 1
    assert any(t[2] == "exit:done" for t in bounded["trail"])


def test_fan_out_model_calls_run_in_parallel(client) -> None:
    fields = {"q": Field(), "a": Field(), "b": Field(), "c": Field(), "all": Field()}
    g = StateGraph("fan", fields, inputs=["q"])
    params = {"max_tokens": 48, "ignore_eos": True, "temperature": 0.0}
    for name in "abc":
        g.add_node(
            name,
            chat("tiny-chat", lambda v: v["q"], output=name, **params),
            reads=["q"],
            writes=[name],
        )
        g.add_edge(START, name)
    g.add_node(
        "join", lambda v: {"all": [v["a"], v["b"], v["c"]]}, reads=list("abc"), writes=["all"]
    )
    g.add_edge(list("abc"), "join").add_edge("join", END)
    client.register_graph(g.compile())
    events = list(client.stream_graph("fan", {"q": "hello"}))
    assert events[-1]["type"] == "run_finished", events[-1]
    node_ms = {e["node"]: e["ms"] for e in events if e["type"] == "node_finished"}
    total_ms = (events[-1]["at"] - events[0]["at"]) * 1000
    assert set(node_ms) == {"a", "b", "c", "join"}
    assert total_ms < node_ms["a"] + node_ms["b"] + node_ms["c"], (total_ms, node_ms)
    assert len(events[-1]["result"]["state"]["all"]) == 3


def chain_graph(name: str, n: int, **params: Any) -> Any:
    fields = {"text": Field(), **{f"out{i}": Field() for i in range(n)}}
    g = StateGraph(name, fields, inputs=["text"])
    prev = START
    for i in range(n):
        node = chat("tiny-chat", lambda v: v["text"], output=f"out{i}", **params)
        g.add_node(f"n{i}", node, reads=["text"], writes=[f"out{i}"])
        g.add_edge(prev, f"n{i}")
        prev = f"n{i}"
    g.add_edge(prev, END)
    return g.compile()


def test_a_run_stops_when_its_token_budget_is_spent(client) -> None:
    client.register_graph(chain_graph("chain", 5, max_tokens=16, ignore_eos=True))
    result = client.run_graph("chain", {"text": "hello there"}, token_budget=60)
    assert result["status"] == "failed", result
    assert result["error"]["code"] == "run_budget_exceeded"
    assert "token budget of 60 tokens" in result["error"]["message"]
    assert result["usage"]["tokens"] <= 60
    assert 1 <= result["usage"]["calls"] < 5


def test_the_tenant_is_charged_on_every_model_a_graph_touches(client) -> None:
    fields = {"q": Field(), "vec": Field(), "answer": Field()}
    g = StateGraph("two-models", fields, inputs=["q"])
    g.add_node(
        "embed", embed("minilm", lambda v: [v["q"]], output="vec"), reads=["q"], writes=["vec"]
    )
    g.add_node(
        "answer",
        chat("tiny-chat", lambda v: v["q"], output="answer", **SHORT),
        reads=["q"],
        writes=["answer"],
    )
    g.add_edge(START, "embed").add_edge("embed", "answer").add_edge("answer", END)
    client.register_graph(g.compile())
    scheduler = names.get_actor(names.SCHEDULER_NAME)

    def counters() -> dict[str, float]:
        snap = ray.get(scheduler.snapshot.remote())
        return {m: snap[m]["tenants"].get("tenant-a", {}).get("admitted", 0) for m in snap}

    before = counters()
    result = client.run_graph("two-models", {"q": "how do I return a tent?"})
    assert result["status"] == "finished", result
    assert len(result["state"]["vec"][0]) == 384
    after = counters()
    assert after["minilm"] == before.get("minilm", 0) + 1
    assert after["tiny-chat"] == before.get("tiny-chat", 0) + 1


def test_bad_runs_are_refused_clearly(client) -> None:
    client.register_graph(branch_graph())
    with pytest.raises(NotFound, match="graph 'nope' is not registered"):
        client.run_graph("nope", {})
    with pytest.raises(InvalidRequest, match="question"):
        client.run_graph("branch", {})
    with pytest.raises(InvalidRequest, match="token_budget must be a positive integer"):
        client.run_graph("branch", {"question": "x"}, token_budget=0)
    with pytest.raises(NotFound, match="not found"):
        client.get_run("run-does-not-exist")


def test_runs_are_scoped_to_their_tenant(client) -> None:
    import airi_ray as airi

    client.register_graph(branch_graph())
    run_id = client.start_run("branch", {"question": "hi"})
    assert client.wait_run(run_id)["status"] == "finished"
    other = airi.connect("auto", api_key=OTHER_KEY)
    try:
        with pytest.raises(NotFound):
            other.get_run(run_id)
    finally:
        other.close()


# -- checkpoints and resume ----------------------------------------------------------------


def _counting(path: str, name: str, gate: str | None = None) -> Any:
    """A node that records each call in a file (which outlives the executor) and, with a
    gate, waits for the gate file before it finishes."""

    def node(view: dict[str, Any]) -> dict[str, Any]:
        with open(path, "a") as f:
            f.write(name + "\n")
        while gate is not None and not Path(gate).exists():
            time.sleep(0.05)
        return {"trace": [name]}

    return node


def test_an_executor_killed_mid_run_resumes_without_rerunning_finished_nodes(
    client, tmp_path: Path
) -> None:
    calls, gate = str(tmp_path / "calls.txt"), str(tmp_path / "gate")
    g = StateGraph("five", {"x": Field(), "trace": Field(reducer=append)}, inputs=["x"])
    prev = START
    for i in range(1, 6):
        g.add_node(f"n{i}", _counting(calls, f"n{i}", gate if i == 3 else None), writes=["trace"])
        g.add_edge(prev, f"n{i}")
        prev = f"n{i}"
    g.add_edge(prev, END)
    client.register_graph(g.compile())
    store = names.get_actor(names.CONTEXT_STORE_NAME)
    run_id = client.start_run("five", {"x": 1})

    def checkpoints() -> int:
        return len(ray.get(store.run.remote("tenant-a", run_id))["checkpoints"])

    wait_for(lambda: checkpoints() == 2 and "n3" in Path(calls).read_text(), what="n3 running")
    executor = names.get_actor(names.GRAPH_EXECUTOR_NAME)
    pid = ray.get(executor.stats.remote())["pid"]
    ray.kill(executor, no_restart=False)
    # Only once the old process is gone may n3 finish (in its new incarnation).
    wait_for(lambda: _pid() not in (None, pid), what="the executor to restart")
    Path(gate).touch()
    assert client.resume_run(run_id) == run_id
    result = client.wait_run(run_id)
    assert result["status"] == "finished", result
    assert result["state"]["trace"] == ["n1", "n2", "n3", "n4", "n5"]
    ran = Path(calls).read_text().split()
    # n3 was running when the executor died: it runs again; n1 and n2 never do.
    assert ran.count("n1") == ran.count("n2") == 1
    assert ran.count("n3") == 2 and ran.count("n4") == ran.count("n5") == 1


def _pid() -> int | None:
    try:
        executor = names.get_actor(names.GRAPH_EXECUTOR_NAME)
        return int(ray.get(executor.stats.remote(), timeout=5)["pid"])
    except Exception:
        return None


# -- HTTP and conversations -------------------------------------------------------------------


def test_graph_runs_over_http(airi_app, client) -> None:
    import httpx

    from tests.conftest import KEY

    client.register_graph(branch_graph())
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{airi_app.base_url}/v1/graphs/branch/runs"
    r = httpx.post(url, json={"input": {"question": "hi"}}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["state"]["answer"] == "short: hi"
    started = httpx.post(url, json={"input": {"question": "hi"}, "wait": False}, headers=headers)
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    got = wait_for(
        lambda: (
            (g := httpx.get(f"{url}/{run_id}", headers=headers).json())["status"] == "finished"
            and g
        ),
        what="the run to finish",
    )
    assert got["state"]["answer"] == "short: hi"
    assert (
        httpx.get(
            f"{airi_app.base_url}/v1/graphs/refine/runs/{run_id}", headers=headers
        ).status_code
        == 404
    )
    bad = httpx.post(url, json={"input": {}, "token_budget": 0}, headers=headers)
    assert bad.status_code == 400 and "token_budget" in bad.json()["error"]["message"]
    missing = httpx.post(f"{airi_app.base_url}/v1/graphs/nope/runs", json={}, headers=headers)
    assert missing.status_code == 404
    listed = httpx.get(f"{airi_app.base_url}/v1/graphs", headers=headers).json()["data"]
    assert "branch" in {g["name"] for g in listed}


def test_a_conversation_id_carries_memory_across_chat_calls(oai, client) -> None:
    conversation = f"conv-{time.time_ns()}"
    first = oai.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "My order number is 4417."}],
        max_tokens=8,
        extra_body={"conversation_id": conversation},
    )
    assert first.choices[0].message.content is not None
    stream = oai.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "What was my order number?"}],
        max_tokens=8,
        stream=True,
        extra_body={"conversation_id": conversation},
    )
    second = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    turns = client.conversation(conversation)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == "My order number is 4417."
    assert turns[3]["content"] == second
    # The model saw the first turn: the second call's prompt holds both questions.
    usage = oai.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "And again?"}],
        max_tokens=2,
        extra_body={"conversation_id": conversation},
    ).usage
    alone = oai.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "And again?"}], max_tokens=2
    ).usage
    assert usage.prompt_tokens > alone.prompt_tokens + 10


def test_cancelling_a_run_aborts_its_model_calls(client) -> None:
    client.register_graph(chain_graph("long-chain", 3, max_tokens=900, ignore_eos=True))
    run_id = client.start_run("long-chain", {"text": "go"})
    scheduler = names.get_actor(names.SCHEDULER_NAME)

    def in_flight() -> int:
        return ray.get(scheduler.snapshot.remote())["tiny-chat"]["in_flight"]

    wait_for(lambda: in_flight() > 0, what="the first call to start")
    result = client.cancel_run(run_id)
    assert result["status"] == "cancelled"
    wait_for(lambda: in_flight() == 0, timeout=10, what="the call to be aborted")


def test_node_retries_and_timeouts(client, tmp_path: Path) -> None:
    from airi_ray.graphs import RetryPolicy

    attempts = str(tmp_path / "attempts.txt")

    def flaky(view: dict[str, Any]) -> dict[str, Any]:
        with open(attempts, "a") as f:
            f.write("x")
        if len(Path(attempts).read_text()) < 3:
            raise ConnectionError("transient")
        return {"out": "ok"}

    async def slow(view: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(30)
        return {"out": "late"}

    g = StateGraph("flaky", {"out": Field()})
    g.add_node("flaky", flaky, writes=["out"], retry=RetryPolicy(max_attempts=3, backoff_s=0.01))
    g.add_edge(START, "flaky").add_edge("flaky", END)
    client.register_graph(g.compile())
    result = client.run_graph("flaky", {})
    assert result["status"] == "finished" and result["state"]["out"] == "ok"
    assert Path(attempts).read_text() == "xxx"

    g = StateGraph("slow", {"out": Field()})
    g.add_node("slow", slow, writes=["out"], retry=RetryPolicy(max_attempts=2), timeout_s=0.2)
    g.add_edge(START, "slow").add_edge("slow", END)
    client.register_graph(g.compile())
    started = time.monotonic()
    result = client.run_graph("slow", {})
    assert result["status"] == "failed" and result["error"]["code"] == "node_failed"
    assert "node 'slow' timed out (after 2 attempt(s))" in result["error"]["message"]
    assert time.monotonic() - started < 10


class Verdict(BaseModel):
    verdict: Literal["refund", "exchange", "repair"]
    days: Literal[7, 14, 30]


def test_a_chat_node_with_a_response_format_gets_a_parsed_answer(client) -> None:
    g = StateGraph("structured", {"question": Field(), "decision": Field()}, inputs=["question"])
    g.add_node(
        "decide",
        chat(
            "tiny-chat",
            lambda v: v["question"],
            output="decision",
            response_format=Verdict,
            max_tokens=40,
        ),
        reads=["question"],
        writes=["decision"],
    )
    g.add_edge(START, "decide").add_edge("decide", END)
    client.register_graph(g.compile())
    for question in ("my tent is torn", "the stove arrived late"):
        run = client.run_graph("structured", {"question": question})
        assert run["status"] == "finished", run
        Verdict.model_validate(run["state"]["decision"])


def test_a_node_fits_a_long_conversation_and_its_sources_into_the_window(client) -> None:
    """``ctx.fit``: sources first, then the newest turns that fit the 1024-token window
    with the answer's tokens kept; the model then takes the prompt as it is."""
    old = [
        {"role": r, "content": f"turn {i}: " + "the tent pole bent in the wind again " * 12}
        for i, r in zip(range(20), ["user", "assistant"] * 10, strict=True)
    ]
    hits = [
        {"id": "care#1", "text": "Dry the tent before you store it.", "score": 0.9},
        {"id": "care#2", "text": "Poles are covered for two years.", "score": 0.7},
    ]

    async def answer(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
        turns = [*old, {"role": "user", "content": view["question"]}]
        window = await ctx.fit(
            "tiny-chat", turns, system="Answer from the sources.", chunks=hits, max_tokens=64
        )
        text = await ctx.chat("tiny-chat", list(window.messages), max_tokens=64, ignore_eos=True)
        kept = len(window.messages) - 1
        return {"answer": text, "cited": list(window.cited_ids), "kept": kept}

    fields = {"question": Field(), "answer": Field(), "cited": Field(), "kept": Field()}
    g = StateGraph("fitted", fields, inputs=["question"])
    g.add_node("answer", answer, reads=["question"], writes=["answer", "cited", "kept"])
    g.add_edge(START, "answer").add_edge("answer", END)
    client.register_graph(g.compile())
    run = client.run_graph("fitted", {"question": "Is a bent pole covered?"})
    assert run["status"] == "finished", run["error"]
    state = run["state"]
    assert state["cited"] == ["care#1", "care#2"]
    assert 1 < state["kept"] < len(old) + 1  # the question and the newest turns, not all 20
    assert run["usage"]["calls"] == 1
