"""Single-flight resume of graph runs, on the executor without Ray: the executor talks to
a real ``ContextStore`` (on a memory log) through a fake actor handle, and an executor's
death is its handle going silent (nothing it sends arrives any more)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from airi_ray.core.errors import Fenced, InvalidRequest, NotFound
from airi_ray.core.graph import END, START, Field, StateGraph, append
from airi_ray.core.requests import Usage
from airi_ray.data.records import MemoryRecordLog
from airi_ray.runtime import graph_executor
from airi_ray.runtime.context_store import ContextStore
from airi_ray.runtime.graph_executor import GraphExecutor

TENANT = "t1"
POLLERS = 8
NODES = [f"n{i}" for i in range(1, 6)]


class Handle:
    """An object's async methods as an actor's: ``handle.method.remote(...)`` returns an
    awaitable, started in call order (as Ray delivers one caller's actor calls). Once
    ``dead``, calls never answer, like those of a process that is gone."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)

        def remote(*args: Any) -> asyncio.Future[Any]:
            if self.dead:
                return asyncio.get_running_loop().create_future()
            return asyncio.ensure_future(method(*args))

        return SimpleNamespace(remote=remote)


class Controller:
    async def graph_acl(self) -> dict[str, list[str]]:
        return {}  # no ACL: every tenant may run every graph


class Generation:
    """A finished model answer as the call path streams it."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    def __aiter__(self) -> Any:
        async def tokens() -> Any:
            yield "ok", None, None

        return tokens()


class Path:
    """The call path: every chat costs 10 prompt and 20 completion tokens, and asks the
    run's cap first, as the real path does before it admits a call."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, model: str, messages: Any, params: Any, tenant: str, options: Any,
                   cap: Callable[[int], int]) -> Generation:  # fmt: skip
        cap(10)
        self.calls += 1
        return Generation(Usage(prompt_tokens=10, completion_tokens=20, finish_reason="stop"))


class Clock:
    """``time`` for the executor: monotonic seconds move only when a test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def perf_counter(self) -> float:
        return self.t

    def time(self) -> float:
        return 1_700_000_000.0 + self.t


@pytest.fixture
def store() -> ContextStore:
    return ContextStore(log=MemoryRecordLog())


@pytest.fixture
def make_executor(monkeypatch: pytest.MonkeyPatch, store: ContextStore) -> Any:
    """``make_executor()`` -> (executor, its store handle): a new executor incarnation."""

    def no_ray(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a unit test must not reach Ray")

    # Belt and braces: nothing here may connect to (or start) a Ray cluster.
    monkeypatch.setattr(graph_executor.ray, "init", no_ray)
    monkeypatch.setattr(graph_executor.ray, "get_actor", no_ray)
    monkeypatch.setattr(graph_executor, "trace_sink", lambda traces: None)  # spans: dropped
    monkeypatch.setattr(graph_executor.cluster_kv, "saved_graphs", lambda: [])
    handles: list[Handle] = []

    def get_actor(name: str) -> Any:
        if name == graph_executor.CONTEXT_STORE_NAME:
            return handles[-1]
        if name == graph_executor.CONTROLLER_NAME:
            return Handle(Controller())
        raise ValueError(f"no actor {name!r} in this test")  # the observer: timings dropped

    monkeypatch.setattr(graph_executor, "get_actor", get_actor)

    def make(graph: Any) -> tuple[GraphExecutor, Handle]:
        handles.append(Handle(store))
        executor = GraphExecutor()
        executor._add(graph)
        executor._calls = Path()  # type: ignore[assignment]
        return executor, handles[-1]

    return make


class Gate:
    """Blocks the first execution of a node (the one the crash interrupts), not a rerun."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.first = True

    async def block_once(self) -> None:
        if self.first:
            self.first = False
            await self.open.wait()


def five(ran: list[str], gate: Gate, n3: Any = None) -> Any:
    """n1 -> ... -> n5, each node counting its runs in ``ran``; n3 blocks the first time."""

    def counting(name: str) -> Any:
        async def node(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
            ran.append(name)
            if name == "n3":
                if n3 is not None:
                    await n3(ctx)
                await gate.block_once()
            return {"trace": [name]}

        return node

    g = StateGraph("five", {"x": Field(), "trace": Field(reducer=append)}, inputs=["x"])
    prev = START
    for i in range(1, 6):
        g.add_node(f"n{i}", counting(f"n{i}"), writes=["trace"])
        g.add_edge(prev, f"n{i}")
        prev = f"n{i}"
    g.add_edge(prev, END)
    return g.compile()


async def until(condition: Callable[[], Any], what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(store: ContextStore, run_id: str) -> int:
    return sum(r.kind == "checkpoint" for r in store._runs.get(run_id, []))


def ended(store: ContextStore, run_id: str) -> bool:
    """The run's end event is stored (an executor records it without awaiting it)."""
    return any(
        r.kind == "run" and json.loads(r.body).get("status") in ("finished", "failed")
        for r in store._runs.get(run_id, [])
    )


async def crash_at_n3(make: Any, store: ContextStore, graph: Any, **options: Any) -> Any:
    """Start a run on a first executor and let it die while n3 runs (n1, n2 checkpointed)."""
    first, handle = make(graph)
    run_id = await first.start(TENANT, "five", {"x": 1}, options)
    await until(lambda: checkpoints(store, run_id) == 2, "n1 and n2 checkpointed")
    handle.dead = True
    return first, run_id


async def poll_all(executor: GraphExecutor, run_id: str) -> list[Any]:
    """POLLERS concurrent callers of every kind: waits, resumes then waits, event streams."""

    async def resume_then_wait() -> Any:
        assert await executor.resume(TENANT, run_id) == run_id
        return await executor.wait(TENANT, run_id)

    async def stream() -> Any:
        return [e async for e in executor.events(TENANT, run_id)][-1]["result"]

    kinds = [executor.wait, lambda _t, _r: resume_then_wait(), lambda _t, _r: stream()]
    return await asyncio.gather(*[kinds[i % 3](TENANT, run_id) for i in range(POLLERS)])


def test_concurrent_pollers_of_an_orphaned_run_resume_it_once(
    make_executor: Any, store: ContextStore
) -> None:
    ran: list[str] = []
    gate = Gate()
    graph = five(ran, gate)

    async def scenario() -> None:
        first, run_id = await crash_at_n3(make_executor, store, graph)
        second, _ = make_executor(graph)
        results = await poll_all(second, run_id)
        for r in results:
            assert r["status"] == "finished", r
            assert r["state"]["trace"] == ["n1", "n2", "n3", "n4", "n5"]
        # n3 was running when the first executor died: it runs again, once; the rest once.
        assert {n: ran.count(n) for n in sorted(set(ran))} == {
            "n1": 1, "n2": 1, "n3": 2, "n4": 1, "n5": 1
        }  # fmt: skip
        record = await store.run(TENANT, run_id)
        statuses = [e["status"] for e in record["events"]]
        assert statuses == ["started", "resumed", "finished"], statuses
        assert record["token"] == 1  # one claim
        assert await second.wait(TENANT, run_id) == results[0]  # later polls: no resume
        with pytest.raises(InvalidRequest, match="already finished"):
            await second.resume(TENANT, run_id)
        first._runs[run_id].task.cancel()  # the dead executor's leftovers

    asyncio.run(scenario())


def test_an_executor_that_lost_its_claim_is_fenced_and_stops(
    make_executor: Any, store: ContextStore
) -> None:
    ran: list[str] = []
    gate = Gate()
    graph = five(ran, gate)

    async def scenario() -> None:
        stale, handle = make_executor(graph)
        run_id = await stale.start(TENANT, "five", {"x": 1})
        await until(lambda: checkpoints(store, run_id) == 2, "n1 and n2 checkpointed")
        # The first executor is only stalled (in n3), not dead: a second one takes over.
        fresh, _ = make_executor(graph)
        results = await poll_all(fresh, run_id)
        assert all(r["status"] == "finished" for r in results), results
        stale_wait = asyncio.ensure_future(stale.wait(TENANT, run_id))
        gate.open.set()  # the stale executor's n3 ends: its checkpoint is refused
        with pytest.raises(Fenced, match="claimed by another execution"):
            await stale_wait
        assert run_id not in stale._runs  # a later caller there goes to the store
        assert ran.count("n5") == 1  # the stale executor never got that far
        assert ran.count("n4") <= 2  # at most the one node started before the refusal
        await until(lambda: ended(store, run_id), "the fresh executor's end to be stored")
        record = await store.run(TENANT, run_id)
        assert [e["status"] for e in record["events"]] == ["started", "resumed", "finished"]
        assert sorted(c["node"] for c in record["checkpoints"]) == [f"n{i}" for i in range(1, 6)]
        assert handle.dead is False

    asyncio.run(scenario())


def test_the_interrupted_nodes_tokens_count_against_the_budget_after_a_resume(
    make_executor: Any, store: ContextStore
) -> None:
    ran: list[str] = []

    async def three_calls(ctx: Any) -> None:  # n3's calls: charged, then the crash
        await ctx.chat("m", "hi")
        await ctx.chat("m", "hi")
        await ctx.chat("m", "hi")

    graph = five(ran, Gate(), n3=three_calls)

    async def scenario() -> None:
        first, run_id = await crash_at_n3(make_executor, store, graph, token_budget=150)
        await until(lambda: first._path().calls == 3, "n3's calls")
        second, _ = make_executor(graph)
        # Spent: 90 tokens in the interrupted n3; its rerun needs 90 more of the 60 left.
        result = await second.wait(TENANT, run_id)
        assert result["status"] == "failed", result
        assert result["error"]["code"] == "run_budget_exceeded", result["error"]
        assert result["usage"]["tokens"] == 150 and second._path().calls == 2
        first._runs[run_id].task.cancel()

    asyncio.run(scenario())


def test_the_time_spent_before_a_crash_counts_against_the_deadline(
    make_executor: Any, store: ContextStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(graph_executor, "time", clock)
    ran: list[str] = []

    async def slow_call(ctx: Any) -> None:  # 30 s pass in n3 before its call
        clock.t += 30.0
        await ctx.chat("m", "hi")

    graph = five(ran, Gate(), n3=slow_call)

    async def scenario() -> None:
        first, run_id = await crash_at_n3(make_executor, store, graph, deadline_s=50.0)
        await until(lambda: first._path().calls == 1, "n3's call")
        clock.t += 1000.0  # the executor is down a long while: that time is not counted
        second, _ = make_executor(graph)
        # 30 s spent before the crash (recorded with n3's call), 30 s more in the rerun.
        result = await second.wait(TENANT, run_id)
        assert result["status"] == "failed", result
        assert "the run passed its deadline of 50 s" in result["error"]["message"], result
        assert second._path().calls == 0
        first._runs[run_id].task.cancel()

    asyncio.run(scenario())


def test_a_run_that_ended_is_answered_from_the_store_and_never_resumed(
    make_executor: Any, store: ContextStore
) -> None:
    ran: list[str] = []
    gate = Gate()
    gate.first = False  # nothing blocks: the run ends on the first executor
    graph = five(ran, gate)

    async def scenario() -> None:
        first, _ = make_executor(graph)
        run_id = await first.start(TENANT, "five", {"x": 1})
        assert (await first.wait(TENANT, run_id))["status"] == "finished"
        await until(lambda: store._runs[run_id][-1].kind == "run", "the end recorded")
        second, _ = make_executor(graph)
        got = await asyncio.gather(*[second.wait(TENANT, run_id) for _ in range(POLLERS)])
        assert all(r["status"] == "finished" and r["state"]["trace"] == NODES for r in got)
        events = [e async for e in second.events(TENANT, run_id)]
        assert [e["type"] for e in events] == ["run_finished"]
        with pytest.raises(InvalidRequest, match="already finished; nothing to resume"):
            await second.resume(TENANT, run_id)
        with pytest.raises(NotFound, match="not found"):
            await second.wait("t2", run_id)  # another tenant's run
        assert len(ran) == 5 and run_id not in second._runs
        assert (await store.run(TENANT, run_id))["token"] == 0  # never claimed

    asyncio.run(scenario())
