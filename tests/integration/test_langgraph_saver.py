"""``AiriCheckpointSaver.on_cluster`` over the session cluster's context store actor:
LangGraph's conformance suite, tenant isolation, and a graph that fails and resumes with
its checkpoints in the actor, called from LangGraph's sync API."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict
from uuid import uuid4

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.graph import END, START, StateGraph

from airi_ray.langgraph import AiriCheckpointSaver
from tests.conftest import App


def test_conformance_on_the_cluster_context_store(airi_app: App) -> None:
    made: list[AiriCheckpointSaver] = []

    # The actor's state outlives each capability's saver: a tenant per capability keeps
    # one suite's threads (and its tenant-wide listings) out of the next one's.
    @checkpointer_test(name="AiriCheckpointSaver on Ray")
    async def on_cluster() -> Any:
        saver = AiriCheckpointSaver.on_cluster(f"lg-conformance-{uuid4().hex[:12]}")
        made.append(saver)
        yield saver
        saver.close()

    report = asyncio.run(validate(on_cluster))
    if not report.passed_all_base():
        report.print_report()
        for name, result in report.results.items():
            for failure in result.failures:
                print(name, failure)
    assert report.passed_all_base()
    assert report.results["copy_thread"].passed is True
    assert report.results["prune"].passed is True
    assert report.results["delete_for_runs"].passed is True


class _State(TypedDict):
    steps: Annotated[list[str], operator.add]


def test_a_graph_resumes_from_the_actor_and_other_tenants_see_nothing(airi_app: App) -> None:
    calls = {"plan": 0, "act": 0}

    def plan(state: _State) -> dict[str, Any]:
        calls["plan"] += 1
        return {"steps": ["plan"]}

    def act(state: _State) -> dict[str, Any]:
        calls["act"] += 1
        if calls["act"] == 1:
            raise RuntimeError("the tool timed out")
        return {"steps": ["act"]}

    builder = StateGraph(_State)
    builder.add_node("plan", plan)
    builder.add_node("act", act)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "act")
    builder.add_edge("act", END)
    config = {"configurable": {"thread_id": f"cluster-run-{uuid4()}"}}

    a = AiriCheckpointSaver.on_cluster("tenant-a")
    b = AiriCheckpointSaver.on_cluster("tenant-b")
    try:
        try:
            builder.compile(checkpointer=a).invoke({"steps": []}, config)
        except RuntimeError as e:
            assert "timed out" in str(e)
        else:
            raise AssertionError("the first run should fail in act")
        assert b.get_tuple(config) is None
        assert list(b.list(config)) == []

        again = AiriCheckpointSaver.on_cluster("tenant-a")  # a new client of the same actor
        try:
            out = builder.compile(checkpointer=again).invoke(None, config)
        finally:
            again.close()
        assert out["steps"] == ["plan", "act"]
        assert calls == {"plan": 1, "act": 2}

        a.delete_thread(config["configurable"]["thread_id"])
        assert a.get_tuple(config) is None
    finally:
        a.close()
        b.close()
