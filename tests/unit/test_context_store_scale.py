"""The context store with a bounded hot set, on both record logs: keys evicted (or never
read since a restart) are answered, numbered, deduplicated and fenced as held ones; start-up
reads no more than the traces; compaction runs beside the commits, not in their way."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from airi_ray.core.errors import Conflict, Fenced
from airi_ray.data.records import LanceRecordLog, MemoryRecordLog, Record, RecordLog
from airi_ray.runtime import context_store
from airi_ray.runtime.context_store import ContextStore


@pytest.fixture(params=["lance", "memory"])
def make_log(request: Any, tmp_path: Path) -> Any:
    memory = MemoryRecordLog()

    def make() -> RecordLog:
        return LanceRecordLog(str(tmp_path / "state")) if request.param == "lance" else memory

    return make


class CountingLog:
    """A log that counts what the store reads from it."""

    def __init__(self, inner: RecordLog) -> None:
        self.inner = inner
        self.full_loads = 0
        self.key_loads: list[tuple[tuple[str, ...], str, str | None]] = []
        self.kind_loads: list[tuple[tuple[str, ...], str | None]] = []

    def load(self) -> list[Record]:
        self.full_loads += 1
        return self.inner.load()

    def load_key(self, kinds: tuple[str, ...], key: str, tenant: str | None = None) -> list[Record]:
        self.key_loads.append((kinds, key, tenant))
        return self.inner.load_key(kinds, key, tenant)

    def load_kinds(self, kinds: tuple[str, ...], tenant: str | None = None) -> list[Record]:
        self.kind_loads.append((kinds, tenant))
        return self.inner.load_kinds(kinds, tenant)

    def append(self, records: list[Record]) -> None:
        self.inner.append(records)

    def compact(self) -> None:
        self.inner.compact()

    def prune(self, kind: str, before: float) -> None:
        self.inner.prune(kind, before)

    def drop(self, kinds: tuple[str, ...], tenant: str, key: str, below_seq: int) -> None:
        self.inner.drop(kinds, tenant, key, below_seq)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def user(content: str, **kw: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **kw}


def checkpoint(cid: str, **meta: Any) -> dict[str, Any]:
    return {
        "checkpoint_id": cid,
        "parent_id": None,
        "checkpoint": f"msgpack:{cid}",
        "metadata": "msgpack:md",
        "meta": {"source": "loop", **meta},
        "versions": {"x": cid},
    }


async def fill(store: ContextStore) -> None:
    """Five conversations, three runs and three threads, interleaved so keys get evicted."""
    for round in range(3):
        for c in range(5):
            await store.append_turns("a", f"c{c}", [user(f"c{c} turn {round}")])
        for r in range(3):
            await store.run_event("a", f"r{r}", round, {"type": "step", "n": round})
            await store.checkpoint("a", f"r{r}", round, "node", {"out": round})
        for t in range(3):
            cid = f"{round:04d}"
            blob = [["x", cid, f"t{t} value {round}"]]
            await store.lg_put("a", f"t{t}", "", checkpoint(cid, run_id=f"run{round}"), blob)


async def check(store: ContextStore) -> None:
    for c in range(5):
        turns = await store.conversation("a", f"c{c}")
        assert [(t["seq"], t["content"]) for t in turns] == [
            (i, f"c{c} turn {i}") for i in range(3)
        ]
    for r in range(3):
        got = await store.run("a", f"r{r}")
        assert [e["n"] for e in got["events"]] == [0, 1, 2]
        assert sorted(c["step"] for c in got["checkpoints"]) == [0, 1, 2]
        assert got["next_event_seq"] == 3
    for t in range(3):
        got = await store.lg_get("a", f"t{t}", "")
        assert got["checkpoint_id"] == "0002" and got["values"] == {"x": f"t{t} value 2"}
        listed = await store.lg_list("a", f"t{t}")
        assert [c["checkpoint_id"] for c in listed] == ["0002", "0001", "0000"]


def test_a_small_bound_answers_everything_after_eviction_and_restart(make_log: Any) -> None:
    async def go() -> ContextStore:
        store = ContextStore(log=make_log(), max_hot_keys=2)
        await fill(store)
        await check(store)
        return store

    store = run(go())
    assert store.stats()["hot_keys"] <= 2
    assert store.stats()["loads"] > 11  # keys were evicted and read again
    restarted = ContextStore(log=make_log(), max_hot_keys=2)
    assert restarted.stats()["records"] == 0
    run(check(restarted))
    assert restarted.stats()["hot_keys"] <= 2


def test_a_cold_conversations_retries_are_deduplicated(make_log: Any) -> None:
    async def go(store: ContextStore) -> None:
        assert await store.append_turns("a", "c1", [user("hi", seq=7)]) == [7]
        first = await store.append_turns("a", "c1", [user("q"), user("q2")], request_id="req")
        assert first == [8, 9]
        await store.append_turns("a", "other", [user("evicts c1")])
        assert store.stats()["hot_keys"] == 1
        # c1 is cold: the retries are recognised from the log.
        assert await store.append_turns("a", "c1", [user("hi", seq=7)]) == [7]
        assert await store.append_turns("a", "c1", [user("q"), user("q2")], "req") == [8, 9]
        await store.append_turns("a", "other", [user("evicts c1 again")])
        with pytest.raises(Conflict, match="different content"):
            await store.append_turns("a", "c1", [user("changed", seq=7)])
        await store.append_turns("a", "other", [user("and again")])
        with pytest.raises(Conflict, match="request id 'req' already appended other turns"):
            await store.append_turns("a", "c1", [user("other question")], "req")
        await store.append_turns("a", "other", [user("and again")], "req-2")
        assert await store.append_turns("a", "c1", [user("next")]) == [10]

    run(go(ContextStore(log=make_log(), max_hot_keys=1)))
    restarted = ContextStore(log=make_log(), max_hot_keys=1)
    turns = run(restarted.conversation("a", "c1"))
    assert [(t["seq"], t["content"]) for t in turns] == [
        (7, "hi"),
        (8, "q"),
        (9, "q2"),
        (10, "next"),
    ]
    assert run(restarted.append_turns("a", "c1", [user("q"), user("q2")], "req")) == [8, 9]


def test_a_cold_threads_first_write_wins(make_log: Any) -> None:
    async def go(store: ContextStore) -> dict[str, Any]:
        await store.lg_put("a", "t1", "", checkpoint("c1"), [["x", "c1", "v"]])
        await store.lg_put_writes("a", "t1", "", "c1", "task", [["x", 0, "first"]])
        await store.lg_get("a", "t2", "")  # evicts t1
        await store.lg_put_writes("a", "t1", "", "c1", "task", [["x", 0, "second"]])
        await store.lg_get("a", "t2", "")
        return await store.lg_get("a", "t1", "")

    assert run(go(ContextStore(log=make_log(), max_hot_keys=1)))["writes"] == [
        ["task", "x", "first"]
    ]
    assert len([r for r in make_log().load() if r.kind == "lg_write"]) == 1


def test_fencing_holds_for_a_cold_run(make_log: Any) -> None:
    async def go(store: ContextStore) -> None:
        await store.run_event("a", "r1", 0, {"type": "started"})
        assert await store.claim_run("a", "r1", "executor-1") == 1
        await store.run_event("a", "r2", 0, {"type": "started"})  # evicts r1
        with pytest.raises(Fenced):
            await store.run_event("a", "r1", 1, {"type": "step"}, token=0)
        await store.run_event("a", "r2", 1, {"type": "step"})
        assert await store.claim_run("a", "r1", "executor-2") == 2
        await store.run("a", "r2")
        with pytest.raises(Fenced):
            await store.checkpoint("a", "r1", 0, "node", {}, token=1)
        await store.run_event("a", "r1", 1, {"type": "step"}, token=2)
        await store.run("a", "r2")
        assert (await store.run("a", "r1"))["token"] == 2

    run(go(ContextStore(log=make_log(), max_hot_keys=1)))
    restarted = ContextStore(log=make_log(), max_hot_keys=1)
    with pytest.raises(Fenced):
        run(restarted.run_event("a", "r1", 2, {"type": "step"}, token=1))
    assert run(restarted.claim_run("a", "r1", "executor-3")) == 3


def test_another_tenants_cold_run_is_not_found(make_log: Any) -> None:
    from airi_ray.core.errors import NotFound

    run(ContextStore(log=make_log()).run_event("a", "r1", 0, {"type": "started"}))
    store = ContextStore(log=make_log(), max_hot_keys=1)
    for call in (
        store.run("b", "r1"),
        store.claim_run("b", "r1", "e"),
        store.run_event("b", "r1", 1, {"type": "step"}),
    ):
        with pytest.raises(NotFound):
            run(call)
    assert run(store.run("a", "r1"))["next_event_seq"] == 1


def test_start_up_reads_only_the_traces_and_concurrent_misses_share_one_read(
    make_log: Any,
) -> None:
    async def write() -> None:
        store = ContextStore(log=make_log())
        await store.append_turns("a", "c1", [user("hi")])
        await store.add_traces([("a", "tr1", [{"span_id": "ab", "start_ns": 1}])])

    run(write())
    log = CountingLog(make_log())
    store = ContextStore(log=log, max_hot_keys=4)
    assert log.full_loads == 0 and log.kind_loads == [(("trace",), None)]
    assert store.stats()["records"] == 1  # the trace

    async def read() -> list[Any]:
        return await asyncio.gather(*[store.conversation("a", "c1") for _ in range(10)])

    assert all(len(turns) == 1 for turns in run(read()))
    assert log.key_loads == [(("turn",), "c1", "a")]
    assert run(store.trace("a", "tr1"))[0]["span_id"] == "ab"
    assert log.full_loads == 0


def test_a_cross_thread_listing_covers_held_and_cold_threads(make_log: Any) -> None:
    async def go(store: ContextStore) -> list[str]:
        for t in range(4):
            cid = f"000{t}"
            await store.lg_put("a", f"t{t}", "", checkpoint(cid, run_id=f"r{t % 2}"), [])
        await store.lg_put("b", "t9", "", checkpoint("0009"), [])  # another tenant
        listed = await store.lg_list("a", limit=3)
        return [c["thread_id"] for c in listed]

    store = ContextStore(log=make_log(), max_hot_keys=2)
    assert run(go(store)) == ["t3", "t2", "t1"]
    run(store.lg_delete_for_runs("a", ["r1"]))  # t1 and t3, one of them cold
    assert [c["thread_id"] for c in run(store.lg_list("a"))] == ["t2", "t0"]
    restarted = ContextStore(log=make_log(), max_hot_keys=1)
    assert [c["thread_id"] for c in run(restarted.lg_list("a"))] == ["t2", "t0"]
    assert [c["thread_id"] for c in run(restarted.lg_list("b"))] == ["t9"]


def test_a_by_key_read_quotes_user_ids(tmp_path: Path) -> None:
    log = LanceRecordLog(str(tmp_path / "state"))
    odd = "x' OR '1'='1"
    log.append([Record("turn", "a", k, 0, "user", "{}", 1.0) for k in (odd, "y")])
    log.append([Record("turn", odd, "y", 0, "user", "{}", 1.0)])
    assert [r.key for r in log.load_key(("turn",), odd, "a")] == [odd]
    assert [r.tenant for r in log.load_key(("turn",), "y", odd)] == [odd]
    assert sorted(r.tenant for r in log.load_key(("turn",), "y")) == ["a", odd]
    assert log.load_kinds(("turn",), "it's") == []
    log.compact()  # builds the index on key: the same answers through it
    assert [r.key for r in log.load_key(("turn",), odd, "a")] == [odd]
    with pytest.raises(ValueError, match="record kinds must be identifiers"):
        log.load_kinds(("turn' OR 1=1 --",))


class GatedLog(CountingLog):
    """A LanceDB log whose compaction waits until the test opens the gate."""

    def __init__(self, inner: RecordLog) -> None:
        super().__init__(inner)
        self.started = threading.Event()
        self.gate = threading.Event()
        self.compactions = 0

    def compact(self) -> None:
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.inner.compact()
        self.compactions += 1


def test_writes_are_acknowledged_while_a_compaction_runs_and_none_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context_store, "COMPACT_EVERY", 4)
    log = GatedLog(LanceRecordLog(str(tmp_path / "state")))

    async def writer(store: ContextStore, w: int, n: int, start: int) -> None:
        for i in range(start, start + n):
            await store.append_turns("a", f"w{w}", [user(f"{w}-{i}")])

    async def go() -> ContextStore:
        store = ContextStore(log=log, max_hot_keys=2)
        await asyncio.gather(*[writer(store, w, 3, 0) for w in range(4)])
        await asyncio.to_thread(log.started.wait, 10)
        assert store.stats()["compacting"]
        # The compaction is stuck at the gate: writes must still be acknowledged.
        before = store.commits
        await asyncio.wait_for(asyncio.gather(*[writer(store, w, 5, 3) for w in range(4)]), 20)
        assert store.commits > before and store.stats()["compacting"]
        log.gate.set()  # now a real LanceDB compaction runs while writes go on
        await asyncio.wait_for(asyncio.gather(*[writer(store, w, 12, 8) for w in range(4)]), 60)
        while store.stats()["compacting"]:
            await asyncio.sleep(0.01)
        return store

    store = run(go())
    assert log.compactions >= 1
    assert store.commits >= 4
    restarted = ContextStore(log=LanceRecordLog(str(tmp_path / "state")))
    for w in range(4):
        turns = run(restarted.conversation("a", f"w{w}"))
        assert [t["content"] for t in turns] == [f"{w}-{i}" for i in range(20)]
        assert [t["seq"] for t in turns] == list(range(20))
    assert len(LanceRecordLog(str(tmp_path / "state")).load()) == 80
