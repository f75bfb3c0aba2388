"""``AiriCheckpointSaver`` over an in-process context store on LanceDB: LangGraph's own
conformance suite, tenant isolation, durability, first write wins, deletion across a
restart, and a real ``StateGraph`` that fails in a node and resumes from its checkpoint."""

from __future__ import annotations

import asyncio
import operator
from pathlib import Path
from typing import Annotated, Any, TypedDict
from uuid import uuid4

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.test_utils import generate_checkpoint
from langgraph.checkpoint.serde.types import ERROR
from langgraph.graph import END, START, StateGraph

from airi_ray.core.errors import InvalidRequest
from airi_ray.data.records import LanceRecordLog
from airi_ray.langgraph import AiriCheckpointSaver
from airi_ray.runtime.context_store import ContextStore


def _config(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    values = values or {}
    return generate_checkpoint(channel_values=values, channel_versions={k: 1 for k in values})


def _meta(step: int = 0, **extra: Any) -> dict[str, Any]:
    return {"source": "loop", "step": step, "parents": {}, **extra}


@pytest.fixture
def savers(tmp_path: Path) -> Any:
    made: list[AiriCheckpointSaver] = []

    def make(tenant: str = "tenant-a") -> AiriCheckpointSaver:
        store = ContextStore(log=LanceRecordLog(str(tmp_path / "state")))
        saver = AiriCheckpointSaver.over(store, tenant)
        made.append(saver)
        return saver

    yield make
    for s in made:
        s.close()


def test_langgraph_conformance_base_capabilities(tmp_path: Path) -> None:
    made: list[AiriCheckpointSaver] = []

    @checkpointer_test(name="AiriCheckpointSaver")
    async def airi_saver() -> Any:
        saver = AiriCheckpointSaver.local(str(tmp_path / f"state-{len(made)}"), "tenant-a")
        made.append(saver)
        yield saver
        saver.close()

    report = asyncio.run(validate(airi_saver))
    if not report.passed_all_base():
        report.print_report()
        for name, result in report.results.items():
            for failure in result.failures:
                print(name, failure)
    assert report.passed_all_base()
    # The extended capabilities this saver implements pass too.
    assert report.results["copy_thread"].passed is True
    assert report.results["prune"].passed is True
    assert report.results["delete_for_runs"].passed is True


def test_another_tenant_cannot_see_a_thread(savers: Any) -> None:
    a = savers("tenant-a")
    b = a.for_tenant("tenant-b")
    stored = a.put(_config("t1"), _checkpoint({"x": "secret"}), _meta(), {"x": 1})
    assert a.get_tuple(stored).checkpoint["channel_values"] == {"x": "secret"}
    assert b.get_tuple(stored) is None
    assert b.get_tuple(_config("t1")) is None
    assert list(b.list(None)) == []
    assert list(b.list(_config("t1"))) == []
    b.delete_thread("t1")  # another tenant's delete touches nothing
    assert a.get_tuple(_config("t1")) is not None


def test_checkpoints_and_writes_survive_a_restart(savers: Any, tmp_path: Path) -> None:
    a = savers()
    stored = a.put(_config("t1"), _checkpoint({"x": [1, 2]}), _meta(step=3, run="r1"), {"x": 1})
    a.put_writes(stored, [("x", "w0"), (ERROR, "boom")], "task-1", "p")
    a.close()

    again = savers()  # a new store over the same LanceDB folder
    tup = again.get_tuple(_config("t1"))
    assert tup is not None
    assert tup.config["configurable"]["checkpoint_id"] == stored["configurable"]["checkpoint_id"]
    assert tup.checkpoint["channel_values"] == {"x": [1, 2]}
    assert tup.metadata["run"] == "r1"
    assert sorted(w[1:] for w in tup.pending_writes) == [(ERROR, "boom"), ("x", "w0")]
    assert [t.metadata["step"] for t in again.list(None, filter={"run": "r1"})] == [3]


def test_a_tasks_first_write_wins_but_special_writes_are_replaced(savers: Any) -> None:
    s = savers()
    stored = s.put(_config("t1"), _checkpoint(), _meta(), {})
    s.put_writes(stored, [("a", "first"), ("b", "first")], "task-1")
    s.put_writes(stored, [("a", "second")], "task-1")  # a retry with another value: dropped
    s.put_writes(stored, [(ERROR, "e1")], "task-1")
    s.put_writes(stored, [(ERROR, "e2")], "task-1")  # special channel: the last one counts
    s.put_writes(stored, [("a", "other task")], "task-2")
    s.close()

    again = savers()
    writes = sorted(again.get_tuple(stored).pending_writes)
    assert writes == [
        ("task-1", "__error__", "e2"),
        ("task-1", "a", "first"),
        ("task-1", "b", "first"),
        ("task-2", "a", "other task"),
    ]


def test_a_deleted_thread_stays_deleted_after_a_restart(savers: Any) -> None:
    s = savers()
    first = s.put(_config("t1"), _checkpoint({"x": "old"}), _meta(), {"x": 1})
    s.put_writes(first, [("x", "w")], "task-1")
    s.put(_config("t2"), _checkpoint({"x": "kept"}), _meta(), {"x": 1})
    s.delete_thread("t1")
    assert s.get_tuple(_config("t1")) is None
    # The thread id is reused: the new thread starts empty (no old writes or values).
    new = s.put(_config("t1"), _checkpoint({"y": "new"}), _meta(), {"y": 1})
    s.close()

    again = savers()
    tup = again.get_tuple(_config("t1"))
    assert tup.config["configurable"]["checkpoint_id"] == new["configurable"]["checkpoint_id"]
    assert tup.checkpoint["channel_values"] == {"y": "new"}
    assert tup.pending_writes == []
    assert len(list(again.list(_config("t1")))) == 1
    assert again.get_tuple(_config("t2")).checkpoint["channel_values"] == {"x": "kept"}


def test_compaction_drops_the_records_of_a_deleted_thread(tmp_path: Path) -> None:
    log = LanceRecordLog(str(tmp_path / "state"))
    store = ContextStore(log=log)
    saver = AiriCheckpointSaver.over(store, "tenant-a")
    try:
        saver.put(_config("t1"), _checkpoint({"x": "old"}), _meta(), {"x": 1})
        saver.put(_config("t2"), _checkpoint({"x": "kept"}), _meta(), {"x": 1})
        saver.delete_thread("t1")
        saver._run(store._compact())
    finally:
        saver.close()
    left = {(r.kind, r.key) for r in LanceRecordLog(str(tmp_path / "state")).load()}
    assert ("lg_checkpoint", "t1") not in left and ("lg_blob", "t1") not in left
    assert ("lg_tombstone", "t1") in left and ("lg_checkpoint", "t2") in left


def test_bad_input_is_refused_with_what_is_allowed(savers: Any) -> None:
    s = savers()
    with pytest.raises(InvalidRequest, match="thread_id"):
        s.get_tuple({"configurable": {}})
    stored = s.put(_config("t1"), _checkpoint(), _meta(), {})
    with pytest.raises(InvalidRequest, match="strategy must be one of keep_latest, delete"):
        s.prune(["t1"], strategy="everything")
    with pytest.raises(InvalidRequest, match="two different thread ids"):
        s.copy_thread("t1", "t1")
    with pytest.raises(InvalidRequest, match="limit"):
        list(s.list(_config("t1"), limit=-1))
    with pytest.raises(InvalidRequest, match="checkpoint_id"):
        s.put_writes(_config("t1"), [("a", 1)], "task-1")  # no checkpoint to write against
    assert s.get_tuple(stored) is not None  # the bad calls changed nothing


class _State(TypedDict):
    steps: Annotated[list[str], operator.add]


def test_a_graph_resumes_from_its_checkpoint_without_rerunning_done_nodes(savers: Any) -> None:
    calls = {"plan": 0, "act": 0, "report": 0}

    def plan(state: _State) -> dict[str, Any]:
        calls["plan"] += 1
        return {"steps": ["plan"]}

    def act(state: _State) -> dict[str, Any]:
        calls["act"] += 1
        if calls["act"] == 1:
            raise RuntimeError("the tool timed out")
        return {"steps": ["act"]}

    def report(state: _State) -> dict[str, Any]:
        calls["report"] += 1
        return {"steps": ["report"]}

    builder = StateGraph(_State)
    builder.add_node("plan", plan)
    builder.add_node("act", act)
    builder.add_node("report", report)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "act")
    builder.add_edge("act", "report")
    builder.add_edge("report", END)
    config = {"configurable": {"thread_id": f"run-{uuid4()}"}}

    saver = savers()
    with pytest.raises(RuntimeError, match="timed out"):
        builder.compile(checkpointer=saver).invoke({"steps": []}, config)
    saver.close()
    assert calls == {"plan": 1, "act": 1, "report": 0}

    # A new process: a new store over the same folder resumes the thread where it stopped.
    resumed = builder.compile(checkpointer=savers())
    assert resumed.get_state(config).next == ("act",)
    out = resumed.invoke(None, config)
    assert out["steps"] == ["plan", "act", "report"]
    assert calls == {"plan": 1, "act": 2, "report": 1}
    history = list(resumed.get_state_history(config))
    assert history[0].next == () and len(history) >= 4


def test_the_async_graph_api_uses_the_same_store(savers: Any) -> None:
    def add(state: _State) -> dict[str, Any]:
        return {"steps": ["x"]}

    builder = StateGraph(_State)
    builder.add_node("add", add)
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    saver = savers()
    graph = builder.compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "async-1"}}

    async def twice() -> dict[str, Any]:
        await graph.ainvoke({"steps": []}, config)
        return await graph.ainvoke({"steps": []}, config)

    assert asyncio.run(twice())["steps"] == ["x", "x"]
    assert graph.get_state(config).values["steps"] == ["x", "x"]  # sync read of the same
