"""The context store's contract, run against both record logs (LanceDB and memory)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from airi_ray.core.errors import Conflict, Fenced, InvalidRequest, NotFound
from airi_ray.data.records import LanceRecordLog, MemoryRecordLog, RecordLog
from airi_ray.runtime.context_store import ContextStore


@pytest.fixture(params=["lance", "memory"])
def make_log(request: Any, tmp_path: Path) -> Any:
    memory = MemoryRecordLog()

    def make() -> RecordLog:
        # A new log object over the same storage: what a restarted actor sees.
        return LanceRecordLog(str(tmp_path / "state")) if request.param == "lance" else memory

    return make


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_turns_are_ordered_and_survive_a_restart(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    seqs = run(store.append_turns("t1", "c1", [{"role": "user", "content": "hi"}]))
    seqs += run(store.append_turns("t1", "c1", [{"role": "assistant", "content": "hello"}]))
    assert seqs == [0, 1]
    again = ContextStore(log=make_log())
    turns = run(again.conversation("t1", "c1"))
    assert [(t["seq"], t["role"], t["content"]) for t in turns] == [
        (0, "user", "hi"),
        (1, "assistant", "hello"),
    ]
    assert [t["content"] for t in run(again.conversation("t1", "c1", last=1))] == ["hello"]


def test_a_retried_write_is_stored_once(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    turn = {"role": "user", "content": "hi", "seq": 7}
    run(store.append_turns("t1", "c1", [turn]))
    assert run(store.append_turns("t1", "c1", [turn])) == [7]
    restarted = ContextStore(log=make_log())
    assert run(restarted.append_turns("t1", "c1", [turn])) == [7]
    assert len(run(restarted.conversation("t1", "c1"))) == 1
    with pytest.raises(Conflict, match="different content"):
        run(restarted.append_turns("t1", "c1", [{**turn, "content": "other"}]))


def test_a_retried_request_appends_its_turns_once(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    question = {"role": "user", "content": "where is my order?"}
    first = [question, {"role": "assistant", "content": "on its way", "finish_reason": "stop"}]
    assert run(store.append_turns("t1", "c1", first, request_id="idem-1")) == [0, 1]
    # The retried chat answered again, differently: the first answer is kept.
    retry = [question, {"role": "assistant", "content": "it shipped"}]
    assert run(store.append_turns("t1", "c1", retry, request_id="idem-1")) == [0, 1]
    # Another request with the same words is a new exchange.
    assert run(store.append_turns("t1", "c1", first, request_id="idem-2")) == [2, 3]
    restarted = ContextStore(log=make_log())
    assert run(restarted.append_turns("t1", "c1", retry, request_id="idem-1")) == [0, 1]
    turns = run(restarted.conversation("t1", "c1"))
    assert [t["content"] for t in turns] == ["where is my order?", "on its way"] * 2
    assert [t.get("request_id") for t in turns] == ["idem-1"] * 2 + ["idem-2"] * 2
    assert [t.get("finish_reason") for t in turns] == [None, "stop"] * 2
    # The request id is the tenant's and the conversation's: elsewhere it is new.
    assert run(restarted.append_turns("t2", "c1", first, request_id="idem-1")) == [0, 1]
    assert run(restarted.append_turns("t1", "c2", first, request_id="idem-1")) == [0, 1]


def test_a_request_id_reused_for_other_turns_is_a_conflict(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    run(store.append_turns("t1", "c1", [{"role": "user", "content": "a"}], request_id="r"))
    for other in (
        [{"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
    ):
        with pytest.raises(Conflict, match="request id 'r' already appended other turns"):
            run(store.append_turns("t1", "c1", other, request_id="r"))
    assert len(run(ContextStore(log=make_log()).conversation("t1", "c1"))) == 1
    with pytest.raises(InvalidRequest, match="request_id must be a string"):
        run(store.append_turns("t1", "c1", [{"role": "user", "content": "a"}], request_id=""))


def test_concurrent_retries_of_one_request_store_it_once(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    async def both() -> list[list[int]]:
        return list(
            await asyncio.gather(
                *[store.append_turns("t1", "c1", turns, request_id="same") for _ in range(3)]
            )
        )

    assert run(both()) == [[0, 1]] * 3
    assert len(run(ContextStore(log=make_log()).conversation("t1", "c1"))) == 2


def test_a_failed_commit_leaves_the_request_id_free(tmp_path: Path) -> None:
    class Failing(MemoryRecordLog):
        fail = True

        def append(self, records: list[Any]) -> None:
            if self.fail:
                raise OSError("disk full")
            super().append(records)

    log = Failing()
    store = ContextStore(log=log)
    turns = [{"role": "user", "content": "hi"}]
    with pytest.raises(RuntimeError, match="could not commit"):
        run(store.append_turns("t1", "c1", turns, request_id="r"))
    log.fail = False
    assert run(store.append_turns("t1", "c1", turns, request_id="r")) == [0]
    assert len(run(store.conversation("t1", "c1"))) == 1


def test_concurrent_writes_are_grouped_and_all_durable(make_log: Any) -> None:
    store = ContextStore(log=make_log())

    async def burst() -> None:
        await asyncio.gather(
            *[
                store.append_turns(
                    "t1", f"c{i % 8}", [{"role": "user", "content": f"m{i}", "seq": i}]
                )
                for i in range(200)
            ]
        )

    run(burst())
    assert store.commits < 200  # grouped
    restarted = ContextStore(log=make_log())
    got = sorted(t["content"] for i in range(8) for t in run(restarted.conversation("t1", f"c{i}")))
    assert got == sorted(f"m{i}" for i in range(200))


def test_tenants_cannot_see_each_other(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    run(store.append_turns("t1", "c1", [{"role": "user", "content": "secret"}]))
    with pytest.raises(NotFound, match="'c1' not found"):
        run(store.conversation("t2", "c1"))
    # The same conversation id under another tenant is another conversation.
    run(store.append_turns("t2", "c1", [{"role": "user", "content": "mine"}]))
    assert [t["content"] for t in run(store.conversation("t2", "c1"))] == ["mine"]
    run(store.run_event("t1", "r1", 0, {"status": "started"}))
    with pytest.raises(NotFound):
        run(store.run("t2", "r1"))
    with pytest.raises(NotFound):
        run(store.checkpoint("t2", "r1", 0, "a", {"x": 1}))


def test_run_events_and_checkpoints(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    run(store.run_event("t1", "r1", 0, {"status": "started", "graph": "g"}))
    run(store.checkpoint("t1", "r1", 0, "a", {"output": {"x": 1}}))
    run(store.checkpoint("t1", "r1", 0, "a", {"output": {"x": 1}}))  # a retry
    run(store.checkpoint("t1", "r1", 1, "b", {"output": {"y": 2}}))
    got = run(ContextStore(log=make_log()).run("t1", "r1"))
    assert got["events"] == [{"status": "started", "graph": "g"}]
    assert [(c["step"], c["node"], c["output"]) for c in got["checkpoints"]] == [
        (0, "a", {"x": 1}),
        (1, "b", {"y": 2}),
    ]


def test_a_claim_fences_the_earlier_execution_and_survives_a_restart(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    run(store.run_event("t1", "r1", 0, {"status": "started"}, token=0))
    run(store.checkpoint("t1", "r1", 0, "a", {"output": {"x": 1}}, token=0))
    assert run(store.claim_run("t1", "r1", "executor-2")) == 1
    with pytest.raises(Fenced, match="claimed by another execution"):
        run(store.checkpoint("t1", "r1", 1, "b", {"output": {"y": 2}}, token=0))
    with pytest.raises(Fenced):
        run(store.run_event("t1", "r1", 1, {"status": "finished"}, token=0))
    run(store.checkpoint("t1", "r1", 1, "b", {"output": {"y": 3}}, token=1))
    restarted = ContextStore(log=make_log())
    got = run(restarted.run("t1", "r1"))
    assert got["token"] == 1 and got["next_event_seq"] == 1
    assert [c["output"] for c in got["checkpoints"]] == [{"x": 1}, {"y": 3}]
    with pytest.raises(Fenced):  # the token is rebuilt from the log
        run(restarted.run_event("t1", "r1", 1, {"status": "finished"}, token=0))
    assert run(restarted.claim_run("t1", "r1", "executor-3")) == 2


def test_concurrent_claims_get_different_tokens_and_only_the_newest_writes(
    make_log: Any,
) -> None:
    store = ContextStore(log=make_log())
    run(store.run_event("t1", "r1", 0, {"status": "started"}))

    async def race() -> list[int]:
        return list(await asyncio.gather(*[store.claim_run("t1", "r1", f"e{i}") for i in range(8)]))

    tokens = run(race())
    assert sorted(tokens) == list(range(1, 9))
    for stale in range(1, 8):
        with pytest.raises(Fenced):
            run(store.run_event("t1", "r1", 1, {"status": "resumed"}, token=stale))
    run(store.run_event("t1", "r1", 1, {"status": "resumed"}, token=8))


def test_a_write_during_a_claim_commit_is_fenced() -> None:
    store = ContextStore(log=MemoryRecordLog())
    run(store.run_event("t1", "r1", 0, {"status": "started"}))

    async def claim_then_stale_write() -> None:
        claim = asyncio.ensure_future(store.claim_run("t1", "r1", "e1"))
        await asyncio.sleep(0)  # the claim is queued, not yet committed
        with pytest.raises(Fenced):
            await store.checkpoint("t1", "r1", 0, "a", {"output": {}}, token=0)
        assert await claim == 1

    run(claim_then_stale_write())


def test_claims_are_checked(make_log: Any) -> None:
    store = ContextStore(log=make_log())
    run(store.run_event("t1", "r1", 0, {"status": "started"}))
    with pytest.raises(NotFound, match="'r1' not found"):
        run(store.claim_run("t2", "r1", "e1"))
    with pytest.raises(NotFound, match="'r9' not found"):
        run(store.claim_run("t1", "r9", "e1"))
    with pytest.raises(InvalidRequest, match="owner must be a string"):
        run(store.claim_run("t1", "r1", ""))
    with pytest.raises(InvalidRequest, match="never issued"):
        run(store.run_event("t1", "r1", 1, {"status": "x"}, token=5))


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "1 to 256 turns"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user"}], "role and content"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user", "content": "x", "seq": -1}], "non-negative integer"),
        ([{"role": "user", "content": "x", "seq": 1}] * 2, "twice"),
        ([{"role": "assistant", "content": "x", "finish_reason": 3}], "finish_reason must be"),
    ],
)
def test_bad_turns_are_refused_and_nothing_is_written(
    make_log: Any, turns: list[Any], message: str
) -> None:
    store = ContextStore(log=make_log())
    with pytest.raises(InvalidRequest, match=message):
        run(store.append_turns("t1", "c1", turns))
    with pytest.raises(NotFound):
        run(store.conversation("t1", "c1"))
    with pytest.raises(InvalidRequest, match="conversation_id"):
        run(store.append_turns("t1", "", [{"role": "user", "content": "x"}]))
