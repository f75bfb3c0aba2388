"""The context store's LangGraph checkpoint methods (``lg_*``), on both record logs: what
the saver sees through them, concurrent repeated writes, deletion, pruning and compaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from airi_ray.core.errors import InvalidRequest
from airi_ray.data.records import LanceRecordLog, MemoryRecordLog, RecordLog
from airi_ray.runtime.context_store import ContextStore


@pytest.fixture(params=["lance", "memory"])
def make_log(request: Any, tmp_path: Path) -> Any:
    memory = MemoryRecordLog()

    def make() -> RecordLog:
        return LanceRecordLog(str(tmp_path / "state")) if request.param == "lance" else memory

    return make


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def checkpoint(cid: str, parent: str | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "checkpoint_id": cid,
        "parent_id": parent,
        "checkpoint": f"msgpack:{cid}",
        "metadata": "msgpack:md",
        "meta": {"source": "loop", **meta},
        "versions": {"x": cid},
    }


async def put(store: ContextStore, thread: str, cid: str, **kw: Any) -> None:
    await store.lg_put("a", thread, "", checkpoint(cid, **kw), [["x", cid, f"value-{cid}"]])


def test_a_put_is_read_back_newest_first_and_survives_a_restart(make_log: Any) -> None:
    async def write() -> None:
        store = ContextStore(log=make_log())
        await put(store, "t1", "c1")
        await put(store, "t1", "c2", parent="c1", step=1)
        await store.lg_put_writes("a", "t1", "", "c2", "task", [["x", 0, "w"]], "p")

    run(write())
    store = ContextStore(log=make_log())
    got = run(store.lg_get("a", "t1", ""))
    assert got["checkpoint_id"] == "c2" and got["parent_id"] == "c1"
    assert got["values"] == {"x": "value-c2"} and got["writes"] == [["task", "x", "w"]]
    assert [c["checkpoint_id"] for c in run(store.lg_list("a", "t1"))] == ["c2", "c1"]
    assert [c["checkpoint_id"] for c in run(store.lg_list("a", filter={"step": 1}))] == ["c2"]
    assert run(store.lg_get("b", "t1", "")) is None
    assert run(store.lg_list("b")) == []


def test_concurrent_writes_of_one_slot_keep_the_first(make_log: Any) -> None:
    async def go() -> Any:
        store = ContextStore(log=make_log())
        await put(store, "t1", "c1")
        writes = [
            store.lg_put_writes("a", "t1", "", "c1", "task", [["x", 0, f"v{i}"]]) for i in range(5)
        ]
        await asyncio.gather(*writes)  # none fails with a conflict
        return store

    run(go())
    got = run(ContextStore(log=make_log()).lg_get("a", "t1", ""))
    assert got["writes"] == [["task", "x", "v0"]]


def test_prune_keeps_the_latest_in_one_commit_and_compaction_drops_the_rest(
    make_log: Any,
) -> None:
    async def go() -> tuple[int, int]:
        store = ContextStore(log=make_log())
        for i in range(3):
            await put(store, "t1", f"c{i}")
        await put(store, "t2", "c9")
        before = store.commits
        await store.lg_prune("a", ["t1", "t1", "missing"], "keep_latest")
        return before, store.commits

    before, after = run(go())
    assert after == before + 1
    store = ContextStore(log=make_log())
    assert [c["checkpoint_id"] for c in run(store.lg_list("a", "t1"))] == ["c2"]
    assert run(store.lg_get("a", "t1", ""))["values"] == {"x": "value-c2"}
    run(store._compact())
    log = make_log()
    t1 = sorted(r.name for r in log.load() if r.key == "t1" and r.kind == "lg_checkpoint")
    assert t1 == ['["","c2",0]']
    assert [c["checkpoint_id"] for c in run(ContextStore(log=log).lg_list("a", "t2"))] == ["c9"]


def test_delete_for_runs_rewrites_the_threads_it_touches(make_log: Any) -> None:
    async def go() -> None:
        store = ContextStore(log=make_log())
        await put(store, "t1", "c1", run_id="r1")
        await put(store, "t1", "c2", parent="c1", run_id="r2")
        await store.lg_put_writes("a", "t1", "", "c2", "task", [["x", 0, "w"]])
        await put(store, "t2", "c3", run_id="r1")
        await store.lg_put("b", "t1", "", checkpoint("c1", run_id="r1"), [])
        await store.lg_delete_for_runs("a", ["r1", "unknown"])

    run(go())
    store = ContextStore(log=make_log())
    assert [c["checkpoint_id"] for c in run(store.lg_list("a", "t1"))] == ["c2"]
    assert run(store.lg_get("a", "t1", ""))["writes"] == [["task", "x", "w"]]
    assert run(store.lg_list("a", "t2")) == []
    assert [c["checkpoint_id"] for c in run(store.lg_list("b"))] == ["c1"]  # another tenant


def test_delete_hides_a_thread_of_the_tenant_only(make_log: Any) -> None:
    async def go() -> int:
        store = ContextStore(log=make_log())
        await put(store, "t1", "c1")
        await store.lg_put("b", "t1", "", checkpoint("c1"), [])
        await store.lg_delete_thread("a", "t1")
        await store.lg_delete_thread("a", "never-written")  # a no-op, not an error
        return store.stats()["records"]

    # What is held for idempotency: b's checkpoint and a's tombstone, not a's dead records.
    assert run(go()) == 2
    store = ContextStore(log=make_log())
    assert store.stats()["records"] == 0  # nothing is read before it is used
    assert run(store.lg_get("a", "t1", "")) is None
    assert run(store.lg_get("b", "t1", ""))["checkpoint_id"] == "c1"
    assert store.stats()["records"] == 2  # read back: the same, without the dead ones
    assert not [r for r in make_log().load() if r.key == "never-written"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.lg_put("a", "", "", checkpoint("c1"), []), "thread_id must be a string"),
        (lambda s: s.lg_put("a", "t", 3, checkpoint("c1"), []), "checkpoint_ns must be"),
        (lambda s: s.lg_put("a", "t", "", {"meta": {}}, []), "checkpoint.versions"),
        (
            lambda s: s.lg_put("a", "t", "", checkpoint("c1"), [["x", "1"]]),
            r"blobs\[0\] must be \[channel, version, value\]",
        ),
        (
            lambda s: s.lg_put_writes("a", "t", "", "c1", "task", [["x", "0", "v"]]),
            r"writes\[0\] idx must be an integer",
        ),
        (
            lambda s: s.lg_put_writes("a", "t", "", "c1", "task", [["x", 0, 1]]),
            r"writes\[0\] value must be a serialized string",
        ),
        (
            lambda s: s.lg_put_writes("a", "t", "", "c1", "task", [["x", 0, "a"], ["y", 0, "b"]]),
            "two writes with the same idx",
        ),
        (lambda s: s.lg_list("a", "t", limit=-1), "limit must be a non-negative integer"),
        (lambda s: s.lg_list("a", "t", filter=["source"]), "filter must be an object"),
        (lambda s: s.lg_prune("a", ["t"], "all"), "strategy must be one of keep_latest, delete"),
        (lambda s: s.lg_copy_thread("a", "t", "t"), "two different thread ids"),
    ],
)
def test_bad_input_is_refused(call: Any, message: str) -> None:
    store = ContextStore(log=MemoryRecordLog())
    with pytest.raises(InvalidRequest, match=message):
        run(call(store))
    assert store.stats()["records"] == 0


def test_compaction_quotes_the_ids_of_a_deleted_thread(make_log: Any) -> None:
    odd = "it's a \"thread\" ' OR '1'='1"

    async def go() -> None:
        store = ContextStore(log=make_log())
        await put(store, odd, "c1")
        await put(store, "it", "c2")
        await store.lg_put("b", odd, "", checkpoint("c3"), [])
        await store.lg_delete_thread("a", odd)
        await store._compact()

    run(go())
    left = {(r.tenant, r.key, r.kind) for r in make_log().load()}
    assert left == {
        ("a", odd, "lg_tombstone"),
        ("a", "it", "lg_checkpoint"),
        ("a", "it", "lg_blob"),
        ("b", odd, "lg_checkpoint"),
    }
