"""The in-memory ANN index of a collection: its rules (pure) and the cache on a real LanceDB.

Each document is one chunk whose text is its row number; the "embedder" maps it to a fixed
random vector, so exact answers are computed with NumPy from the same vectors.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from airi_ray.core.ann import AnnView, candidates, code_count, rerank, should_rebuild, use_index
from airi_ray.core.chunking import Chunker
from airi_ray.data import ann as ann_module
from airi_ray.data import collections as collections_module
from airi_ray.data.ann import AnnSpec
from airi_ray.data.collections import CollectionStore, Document

DIM = 24
MODEL = ("fake", "1")
ROWS = 600
VECTORS = np.random.default_rng(7).standard_normal((ROWS, DIM)).astype(np.float32)
CHUNKER = Chunker(
    encode=lambda t: [int(t)], decode=lambda ids: str(ids[0]), max_tokens=1, overlap_tokens=0
)


def embed(texts: list[str]) -> list[np.ndarray]:
    return [VECTORS[int(t)] for t in texts]


# -- the rules ---------------------------------------------------------------------------


def test_the_index_serves_only_its_own_version_and_only_unfiltered_queries() -> None:
    view = AnnView(index_version=7)
    assert use_index(view, 7, filtered=False)
    assert not use_index(view, 8, filtered=False)  # a write since: never a stale answer
    assert not use_index(view, 7, filtered=True)
    assert not use_index(AnnView(), 7, filtered=False)


def test_one_rebuild_at_a_time_of_a_big_enough_table_and_retry_after_a_delay() -> None:
    def due(view: AnnView, version: int = 5, rows: int = 100, now: float = 100.0) -> bool:
        return should_rebuild(view, version, rows, min_rows=50, now=now, retry_s=30.0)

    assert due(AnnView())
    assert due(AnnView(index_version=4))
    assert not due(AnnView(index_version=5))  # up to date
    assert not due(AnnView(index_version=4, building_version=5))  # one is running
    assert not due(AnnView(index_version=4, building_version=4))
    assert not due(AnnView(), rows=49)  # LanceDB alone serves a small table
    assert not due(AnnView(failed_at=80.0))
    assert due(AnnView(failed_at=70.0))


def test_codes_split_the_vector_into_equal_slices_of_at_most_the_asked_width() -> None:
    assert code_count(384, 2) == 192
    assert code_count(384, 3) == 128
    assert code_count(24, 5) == 6  # 5 does not divide 24: slices of 4
    assert code_count(25, 2) == 25  # an odd dimension: one code per dimension
    assert code_count(7, 1) == 7
    with pytest.raises(ValueError, match="at least 1"):
        code_count(384, 0)


def test_candidates_grow_with_k_and_give_way_to_an_exact_scan() -> None:
    assert candidates(10, 100_000, per_hit=40, floor=200) == 400
    assert candidates(1, 100_000, per_hit=40, floor=200) == 200  # the floor
    assert candidates(40, 100_000, per_hit=40, floor=200) == 1_600  # an MMR pool
    # From a quarter of the rows on, scanning them all exactly is as cheap.
    assert candidates(10, 1_601, per_hit=40, floor=200) == 400
    assert candidates(10, 1_600, per_hit=40, floor=200) is None
    assert candidates(1_000, 100_000, per_hit=40, floor=200) is None


def test_rerank_orders_candidates_by_exact_cosine() -> None:
    vectors = np.array([[1, 0], [0, 1], [3, 3], [-1, 0], [0, 0]], dtype=np.float32)
    query = np.array([2, 1], dtype=np.float32)

    def ranked(rows: list[int], limit: int) -> tuple[list[int], list[float]]:
        r = np.array(rows, dtype=np.int64)
        got = rerank(r, vectors[r] @ query, np.linalg.norm(vectors[r], axis=1), np.sqrt(5.0), limit)
        return got[0].tolist(), got[1].tolist()

    rows, scores = ranked([3, 1, 4, 0, 2], 3)
    assert rows == [2, 0, 1]
    assert scores == pytest.approx([3 / np.sqrt(10), 2 / np.sqrt(5), 1 / np.sqrt(5)], abs=1e-6)
    # Fewer candidates than asked: all of them; a zero vector scores 0, not NaN.
    assert ranked([4, 3], 5) == ([4, 3], pytest.approx([0.0, -2 / np.sqrt(5)]))
    # Ties keep the candidates' order.
    same = np.ones(4, dtype=np.float32)
    assert rerank(np.array([2, 0, 3, 1]), same, same, 1.0, 2)[0].tolist() == [2, 0]


def test_ann_spec_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AnnSpec(candidates_per_hit=0)
    with pytest.raises(ValueError, match="at least 64"):
        AnnSpec(codes_min_rows=10)


# -- the cache on LanceDB ----------------------------------------------------------------


# Few candidates, so that the 450 rows of the big tenant are scanned through their codes
# (20 x k candidates: a quarter of them at most up to k = 5), the exact rerank then
# finding the same top-k as an exact scan.
SPEC = AnnSpec(codes_min_rows=100, candidates_per_hit=20, min_candidates=10)


def make_store(tmp_path: Path, **ann: Any) -> CollectionStore:
    spec = replace(SPEC, **ann)
    return CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=200, ann=spec)


def ingest(store: CollectionStore, rows: range, tenant: str) -> None:
    col = (
        store.open("c")
        if "c" in store.names()
        else store.create("c", model=MODEL[0], version=MODEL[1], dim=DIM)
    )
    docs = [Document(f"v{i}", str(i)) for i in rows]
    col.upsert(docs, tenant=tenant, embed=embed, chunker=CHUNKER, progress=False)


def exact(rows: range | list[int], query: np.ndarray, k: int) -> list[str]:
    rows = list(rows)
    v = VECTORS[rows]
    scores = v @ query / np.linalg.norm(v, axis=1)
    return [f"v{rows[i]}" for i in np.argsort(-scores, kind="stable")[:k]]


class LanceCalls:
    """Counts the queries that went to LanceDB (``search_table``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = collections_module.search_table

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(collections_module, "search_table", counted)


@pytest.fixture
def two_tenants(tmp_path: Path) -> CollectionStore:
    store = make_store(tmp_path)
    ingest(store, range(0, 450), "big")  # codes of its own
    ingest(store, range(450, 500), "small")  # scanned exactly
    col = store.open("c")
    assert col.wait_for_ann(*MODEL, timeout=60)
    return store


def test_answers_equal_exact_search_per_tenant(
    two_tenants: CollectionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lance = LanceCalls(monkeypatch)
    col = two_tenants.open("c")
    snapshot = two_tenants._anns[col.table_for(*MODEL).name].snapshot()
    assert snapshot is not None
    assert snapshot.tenants["big"].codes is not None  # scanned through its codes
    assert snapshot.tenants["small"].codes is None  # too few rows: scanned exactly
    assert candidates(5, 450, per_hit=20, floor=10) is not None
    queries = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    for q in queries:
        for tenant, rows in (("big", range(0, 450)), ("small", range(450, 500))):
            hits = col.search(q, 5, tenant=tenant, embedder=MODEL)
            assert [h.id.rpartition("#")[0] for h in hits] == exact(rows, q, 5)
            stored = VECTORS[[int(h.doc_id[1:]) for h in hits]]
            want = stored @ q / np.linalg.norm(stored, axis=1) / np.linalg.norm(q)
            assert [h.score for h in hits] == pytest.approx(want, abs=1e-5)
    assert lance.n == 0  # all of them from the in-memory index


def test_a_tenant_never_sees_another_tenants_rows(two_tenants: CollectionStore) -> None:
    col = two_tenants.open("c")
    for i in (10, 460):  # a stored vector of each tenant, asked for by the other
        other = "small" if i < 450 else "big"
        hits = col.search(VECTORS[i], 50, tenant=other, embedder=MODEL)
        mine = range(450, 500) if other == "small" else range(0, 450)
        assert hits and all(int(h.doc_id[1:]) in mine for h in hits)
    assert col.search(VECTORS[0], 5, tenant="nobody", embedder=MODEL) == []


def test_a_delete_is_honoured_at_once_and_after_the_rebuild(
    two_tenants: CollectionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    col = two_tenants.open("c")
    assert col.search(VECTORS[3], 1, tenant="big", embedder=MODEL)[0].doc_id == "v3"
    lance = LanceCalls(monkeypatch)
    col.delete(["v3"], tenant="big")
    # The index is behind the table now: LanceDB answers, without the deleted row.
    assert "v3" not in {h.doc_id for h in col.search(VECTORS[3], 10, tenant="big", embedder=MODEL)}
    assert col.wait_for_ann(*MODEL, timeout=60)
    served = lance.n
    hits = col.search(VECTORS[3], 10, tenant="big", embedder=MODEL)
    assert lance.n == served  # the rebuilt index answered
    assert "v3" not in {h.doc_id for h in hits}
    assert [h.doc_id for h in hits] == exact([i for i in range(450) if i != 3], VECTORS[3], 10)


def test_a_write_sends_queries_to_lancedb_until_the_index_catches_up(
    two_tenants: CollectionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    col = two_tenants.open("c")
    table = col.table_for(*MODEL)
    ann = two_tenants._anns[table.name]
    lance = LanceCalls(monkeypatch)
    before = table.version
    assert ann.view().index_version == before
    ingest(two_tenants, range(500, 600), "big")
    assert table.version > before
    # A new row is found the moment its write returns, whether or not the rebuild is done.
    assert col.search(VECTORS[550], 1, tenant="big", embedder=MODEL)[0].doc_id == "v550"
    assert col.wait_for_ann(*MODEL, timeout=60)
    assert ann.view().index_version == table.version
    served = lance.n
    hits = col.search(VECTORS[550], 3, tenant="big", embedder=MODEL)
    assert lance.n == served
    assert [h.doc_id for h in hits] == exact([*range(450), *range(500, 600)], VECTORS[550], 3)


def test_a_rebuild_does_not_block_a_concurrent_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    ingest(store, range(0, 300), "t")
    col = store.open("c")
    assert col.wait_for_ann(*MODEL, timeout=60)
    started, release = threading.Event(), threading.Event()
    builds = []
    real = ann_module.build_snapshot

    def held(*args: Any) -> Any:
        builds.append(args[1])
        started.set()
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(ann_module, "build_snapshot", held)
    ingest(store, range(300, 400), "t")  # starts a rebuild, which waits for `release`
    assert started.wait(60)
    try:
        for i in (5, 350):  # answered meanwhile (by LanceDB), new rows included
            assert col.search(VECTORS[i], 1, tenant="t", embedder=MODEL)[0].doc_id == f"v{i}"
        ingest(store, range(400, 420), "t")
        col.search(VECTORS[0], 1, tenant="t", embedder=MODEL)
        assert len(builds) == 1  # one rebuild at a time per table
    finally:
        release.set()
    col.wait_for_ann(*MODEL, timeout=60)
    # The first rebuild read the table before the last write; the next query starts another.
    col.search(VECTORS[0], 1, tenant="t", embedder=MODEL)
    assert col.wait_for_ann(*MODEL, timeout=60)
    assert len(builds) == 2
    assert col.search(VECTORS[410], 1, tenant="t", embedder=MODEL)[0].doc_id == "v410"


def test_filtered_queries_and_small_tables_go_to_lancedb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    ingest(store, range(0, 150), "t")  # below index_min_rows: no in-memory index
    col = store.open("c")
    lance = LanceCalls(monkeypatch)
    assert col.search(VECTORS[7], 1, tenant="t", embedder=MODEL)[0].doc_id == "v7"
    assert lance.n == 1 and not store._anns[col.table_for(*MODEL).name].view().index_version
    ingest(store, range(150, 300), "t")
    assert col.wait_for_ann(*MODEL, timeout=60)
    col.search(VECTORS[7], 1, tenant="t", embedder=MODEL, filter={"lang": "en"})
    assert lance.n == 2


def test_mmr_works_from_the_in_memory_index(two_tenants: CollectionStore) -> None:
    col = two_tenants.open("c")
    hits = col.search(VECTORS[3], 4, tenant="big", embedder=MODEL, mmr_lambda=0.5)
    assert len(hits) == 4 and hits[0].doc_id == "v3"


def test_a_dropped_collection_forgets_its_index(two_tenants: CollectionStore) -> None:
    name = two_tenants.open("c").table_for(*MODEL).name
    assert name in two_tenants._anns
    two_tenants.drop("c")
    assert name not in two_tenants._anns


class ArrowTable:
    """The one read ``build_snapshot`` makes of a LanceDB table, from an Arrow table."""

    def __init__(self, data: pa.Table) -> None:
        self._data = data

    def search(self) -> ArrowTable:
        return self

    def select(self, columns: list[str]) -> ArrowTable:
        return ArrowTable(self._data.select(columns))

    def limit(self, n: None) -> ArrowTable:
        return self

    def to_arrow(self) -> pa.Table:
        return self._data


def test_the_compressed_scan_and_rerank_find_the_exact_neighbours() -> None:
    # Uniform random vectors, the hardest case for the codes (no structure to exploit):
    # 3,000 rows, so that 400 candidates for k = 10 go through the codes.
    rng = np.random.default_rng(3)
    n, dim, k = 3_000, 64, 10
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    data = pa.table(
        {
            "tenant": ["t"] * n,
            "id": [f"r{i}#0" for i in range(n)],
            "text": [str(i) for i in range(n)],
            "metadata": ["{}"] * n,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
    )
    spec = AnnSpec()
    snapshot = ann_module.build_snapshot(ArrowTable(data), 1, dim, spec)
    assert snapshot.tenants["t"].codes is not None and candidates(k, n, per_hit=40, floor=200)
    queries = rng.standard_normal((50, dim)).astype(np.float32)
    recall = []
    for q in queries:
        found = snapshot.search("t", q, k, spec)
        want = set(exact_ids(vectors, q, k))
        recall.append(len(want & {int(i.split("#")[0][1:]) for i in found.ids}) / k)
        assert list(found.scores) == sorted(found.scores, reverse=True)
    assert np.mean(recall) >= 0.98


def exact_ids(vectors: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = vectors @ q / np.linalg.norm(vectors, axis=1)
    return [int(i) for i in np.argsort(-scores)[:k]]


class FakeTable:
    def __init__(self) -> None:
        self.asked, self._version = 0, 1

    @property
    def version(self) -> int:
        self.asked += 1
        return self._version


def test_the_version_watch_asks_lancedb_only_after_the_versions_dir_changed(
    tmp_path: Path,
) -> None:
    versions = tmp_path / "t.lance" / "_versions"
    versions.mkdir(parents=True)
    now = [versions.stat().st_mtime + 5.0]  # quiet for 5 s
    watch = ann_module.VersionWatch(str(tmp_path / "t.lance"), wall_clock=lambda: now[0])
    table = FakeTable()
    assert [watch.version(table) for _ in range(3)] == [1, 1, 1]
    assert table.asked == 1
    table._version = 2
    (versions / "2.manifest").write_text("")  # a commit: the directory's mtime moves
    now[0] = versions.stat().st_mtime + 0.1  # ... and it is not quiet yet
    assert [watch.version(table) for _ in range(2)] == [2, 2]
    assert table.asked == 3  # a busy directory is not trusted: asked every time
    now[0] += 5.0
    assert [watch.version(table) for _ in range(3)] == [2, 2, 2]
    assert table.asked == 4


def test_the_version_watch_always_asks_on_an_object_store() -> None:
    watch = ann_module.VersionWatch("s3://bucket/db/t.lance")
    table = FakeTable()
    assert [watch.version(table) for _ in range(3)] == [1, 1, 1]
    assert table.asked == 3
