"""The LangGraph checkpoint decisions of ``airi_ray.core.checkpoints``: generations and
tombstones in any order, first write wins, listing newest first with filters."""

from __future__ import annotations

import itertools

from airi_ray.core.checkpoints import (
    Blob,
    CheckpointIndex,
    Saved,
    Write,
    matches,
    next_checkpoint,
    plan_writes,
)


def saved(cid: str, thread: str = "t", ns: str = "", gen: int = 0, **meta: object) -> Saved:
    return Saved(thread, ns, cid, None, f"cp-{cid}", "md", meta, {"x": "1"}, gen)


def write(task: str, idx: int, value: str, cid: str = "c1", gen: int = 0, rev: int = 0) -> Write:
    return Write("t", "", cid, task, idx, "ch", value, "", gen, rev)


def test_a_tombstone_kills_older_generations_in_whatever_order_records_come() -> None:
    old = saved("c1", gen=0)
    new = saved("c2", gen=1)
    for order in itertools.permutations(["old", "tomb", "new"]):
        index = CheckpointIndex()
        for what in order:
            if what == "tomb":
                index.tombstone("a", "t", 0)
            else:
                index.add("a", old if what == "old" else new)
        ids = [f.saved.checkpoint_id for f in index.listing("a", thread_id="t")]
        assert ids == ["c2"], order
        assert index.generation("a", "t") == 1


def test_threads_are_scoped_to_their_tenant() -> None:
    index = CheckpointIndex()
    index.add("a", saved("c1"))
    assert index.get("b", "t", "") is None
    assert index.listing("b") == [] and len(index.listing("a")) == 1
    index.tombstone("b", "t", 0)
    assert index.get("a", "t", "") is not None


def test_listing_is_newest_first_with_filter_before_and_limit() -> None:
    index = CheckpointIndex()
    for i, source in enumerate(["input", "loop", "loop", "update"]):
        index.add("a", saved(f"c{i}", source=source, step=i))
    index.add("a", saved("c9", thread="other", source="loop", step=9))
    ids = lambda **kw: [f.saved.checkpoint_id for f in index.listing("a", **kw)]  # noqa: E731
    assert ids(thread_id="t") == ["c3", "c2", "c1", "c0"]
    assert ids() == ["c9", "c3", "c2", "c1", "c0"]
    assert ids(thread_id="t", filter={"source": "loop"}) == ["c2", "c1"]
    assert ids(filter={"source": "loop", "step": 9}) == ["c9"]
    assert ids(filter={"missing": None}) == []
    assert ids(thread_id="t", before="c2") == ["c1", "c0"]
    assert ids(thread_id="t", before="c3", limit=1) == ["c2"]
    assert ids(thread_id="t", limit=0) == []
    assert ids(thread_id="t", ns="child") == []


def test_get_is_the_newest_of_a_namespace_or_the_one_asked_for() -> None:
    index = CheckpointIndex()
    index.add("a", saved("c1"))
    index.add("a", saved("c2"))
    index.add("a", saved("c3", ns="child"))
    assert index.get("a", "t", "").saved.checkpoint_id == "c2"
    assert index.get("a", "t", "", "c1").saved.checkpoint_id == "c1"
    assert index.get("a", "t", "child").saved.checkpoint_id == "c3"
    assert index.get("a", "t", "", "c3") is None


def test_a_checkpoint_reads_the_blobs_of_its_versions_and_skips_empty_ones() -> None:
    index = CheckpointIndex()
    index.add("a", Blob("t", "", "x", "1", "v1"))
    index.add("a", Blob("t", "", "x", "2", "v2"))
    index.add("a", Blob("t", "", "y", "1", None))
    index.add("a", Saved("t", "", "c1", None, "cp", "md", {}, {"x": "1", "y": "1"}))
    index.add("a", Saved("t", "", "c2", "c1", "cp", "md", {}, {"x": "2"}))
    assert index.get("a", "t", "", "c1").values == {"x": "v1"}
    assert index.get("a", "t", "", "c2").values == {"x": "v2"}
    assert not index.add("a", Blob("t", "", "x", "1", "changed"))  # the first one stays
    assert index.get("a", "t", "", "c1").values == {"x": "v1"}


def test_first_write_wins_for_regular_writes_and_the_last_for_special_ones() -> None:
    stored = {w.slot: w for w in [write("t1", 0, "first"), write("t1", -1, "err")]}
    planned = plan_writes(
        stored,
        [write("t1", 0, "again"), write("t1", 1, "new"), write("t1", -1, "err2")],
    )
    assert [(w.idx, w.value, w.rev) for w in planned] == [(1, "new", 0), (-1, "err2", 1)]
    assert plan_writes(stored, [write("t1", -1, "err")]) == []  # a retry of the same

    index = CheckpointIndex()
    for w in [write("t1", 0, "first"), write("t1", 0, "second"), write("t1", -1, "e", rev=0)]:
        index.add("a", w)
    index.add("a", write("t1", -1, "e2", rev=1))
    index.add("a", write("t1", -1, "stale", rev=0))  # an older revision read later
    index.add("a", saved("c1"))
    writes = [(w.idx, w.value) for w in index.get("a", "t", "").writes]
    assert sorted(writes) == [(-1, "e2"), (0, "first")]


def test_writes_come_in_task_path_task_id_idx_order() -> None:
    index = CheckpointIndex()
    index.add("a", saved("c1"))
    for path, task, idx in [("b", "t1", 0), ("a", "t2", 1), ("a", "t2", 0), ("", "t9", 0)]:
        index.add("a", Write("t", "", "c1", task, idx, "ch", "v", path))
    got = [(w.task_path, w.task_id, w.idx) for w in index.get("a", "t", "").writes]
    assert got == [("", "t9", 0), ("a", "t2", 0), ("a", "t2", 1), ("b", "t1", 0)]


def test_a_checkpoint_sent_again_is_a_retry_and_a_changed_one_a_new_revision() -> None:
    first = saved("c1")
    assert next_checkpoint(None, first) == first
    assert next_checkpoint(first, saved("c1")) is None
    changed = next_checkpoint(first, saved("c1", step=2))
    assert changed is not None and changed.rev == 1


def test_latest_items_keep_each_namespace_newest_with_its_writes_and_blobs() -> None:
    index = CheckpointIndex()
    index.add("a", Blob("t", "", "x", "1", "v"))
    for cid in ("c1", "c2"):
        index.add("a", saved(cid))
        index.add("a", write("task", 0, f"w-{cid}", cid=cid))
    index.add("a", saved("c0", ns="child"))
    kept = index.latest_items("a", "t")
    assert {type(i).__name__ for i in kept} == {"Saved", "Write", "Blob"}
    assert sorted(i.checkpoint_id for i in kept if isinstance(i, Saved)) == ["c0", "c2"]
    assert [i.value for i in kept if isinstance(i, Write)] == ["w-c2"]


def test_deleting_runs_keeps_the_other_checkpoints_and_each_blob_once() -> None:
    index = CheckpointIndex()
    index.add("a", Blob("t", "", "x", "1", "v"))
    index.add("a", saved("c1", run_id="r1"))
    index.add("a", saved("c2", run_id="r2"))
    index.add("a", saved("c3", run_id="r3"))  # c2 and c3 read the same blob
    index.add("a", write("task", 0, "w1", cid="c1"))
    index.add("a", saved("c9", thread="other"))
    assert index.threads_of_runs("a", {"r1"}) == ["t"]
    assert index.threads_of_runs("b", {"r1"}) == []
    kept = index.items_without_runs("a", "t", {"r1"})
    assert sorted(i.checkpoint_id for i in kept if isinstance(i, Saved)) == ["c2", "c3"]
    assert [i for i in kept if isinstance(i, Write)] == []
    assert len([i for i in kept if isinstance(i, Blob)]) == 1


def test_matches_needs_every_key_equal() -> None:
    assert matches({"a": 1, "b": 2}, {"a": 1})
    assert matches({"a": 1}, None) and matches({"a": 1}, {})
    assert not matches({"a": 1}, {"a": 2})
    assert not matches({}, {"a": None})
