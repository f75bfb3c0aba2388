"""Collections on a real LanceDB in a temp dir, with a deterministic fake embedder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airi_ray.core.chunking import Chunker
from airi_ray.core.errors import InvalidRequest, PayloadTooLarge
from airi_ray.data.collections import (
    MAX_SMALL_FILES,
    CollectionNotFound,
    CollectionStore,
    Document,
    EmbedderNotReady,
    IndexSpec,
)

DIM = 16
V1 = ("fake", "1")
V2 = ("fake", "2")
VOCAB: dict[str, int] = {}
WORDS: dict[int, str] = {}


def encode(text: str) -> list[int]:
    # One token per word, ids assigned on first sight.
    ids = [VOCAB.setdefault(w, len(VOCAB)) for w in text.split()]
    WORDS.update({i: w for w, i in VOCAB.items()})
    return ids


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


CHUNKER = Chunker(encode, decode, max_tokens=4, overlap_tokens=1)


class FakeEmbed:
    """Bag of words: each word hashes to a fixed random direction; counts calls and texts."""

    def __init__(self, dim: int = DIM, seed: str = "") -> None:
        self.dim, self.seed, self.texts = dim, seed, 0

    def word(self, w: str) -> np.ndarray:
        digest = hashlib.sha256((self.seed + w).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "big")).standard_normal(self.dim)

    def vector(self, text: str) -> list[float]:
        v = sum((self.word(w) for w in text.split()), np.zeros(self.dim))
        return list(v / (np.linalg.norm(v) or 1.0))

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.texts += len(texts)
        return [self.vector(t) for t in texts]


@pytest.fixture
def store(tmp_path: Path) -> CollectionStore:
    return CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=10_000)


def test_ingest_and_search_cites_chunks(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    res = col.upsert(
        [
            {"id": "doc-1", "text": "apple banana cherry date elder fig", "metadata": {"k": 1}},
            Document("doc-2", "zebra yak xenon", {"k": 2}),
        ],
        tenant="t1",
        embed=embed,
        chunker=CHUNKER,
    )
    assert (res.documents, res.chunks) == (2, 3)  # 6 words in windows of 4 step 3 -> 2 chunks
    hits = col.search(embed.vector("zebra yak xenon"), 2, tenant="t1", embedder=V1)
    assert hits[0].id == "doc-2#0" and hits[0].doc_id == "doc-2"
    assert hits[0].text == "zebra yak xenon" and hits[0].metadata == {"k": 2}
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score
    assert {h.id for h in col.search(embed.vector("apple"), 5, tenant="t1", embedder=V1)} == {
        "doc-1#0",
        "doc-1#1",
        "doc-2#0",
    }


def test_reingest_replaces_all_chunks_of_the_document(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    col.upsert([Document("d", "a b c d e f g h i j")], tenant="t", embed=embed, chunker=CHUNKER)
    assert col.table_for(*V1).count_rows() == 3
    col.upsert([Document("d", "short")], tenant="t", embed=embed, chunker=CHUNKER)
    hits = col.search(embed.vector("short"), 10, tenant="t", embedder=V1)
    assert [(h.id, h.text) for h in hits] == [("d#0", "short")]
    col.upsert([Document("d", "   ")], tenant="t", embed=embed, chunker=CHUNKER)
    assert col.table_for(*V1).count_rows() == 0


def test_delete_by_document_id(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    docs = [Document("a", "one two"), Document("b", "three four")]
    col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER)
    col.upsert(docs, tenant="other", embed=embed, chunker=CHUNKER)
    col.delete(["a"], tenant="t")
    assert [h.doc_id for h in col.search(embed.vector("one"), 5, tenant="t", embedder=V1)] == ["b"]
    assert len(col.search(embed.vector("one"), 5, tenant="other", embedder=V1)) == 2


def test_nothing_is_written_when_embedding_fails_half_way(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    good = FakeEmbed()
    col.upsert([Document("d", "old text")], tenant="t", embed=good, chunker=CHUNKER)
    calls = []

    def flaky(texts: list[str]) -> list[list[float]]:
        calls.append(texts)
        if len(calls) == 2:
            raise RuntimeError("embedder died")
        return good(texts)

    small = CollectionStore(store.uri, progress=False, embed_batch=1)
    with pytest.raises(RuntimeError):
        small.open("kb").upsert(
            [Document("d", "new words here now and more"), Document("e", "x")],
            tenant="t",
            embed=flaky,
            chunker=CHUNKER,
        )
    hits = col.search(good.vector("old text"), 5, tenant="t", embedder=V1)
    assert [h.text for h in hits] == ["old text"]


def test_limits_have_clear_errors(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    with pytest.raises(InvalidRequest, match="non-empty"):
        col.upsert([{"id": "", "text": "x"}], tenant="t", embed=embed, chunker=CHUNKER)
    with pytest.raises(InvalidRequest, match="twice"):
        col.upsert(
            [Document("a", "x"), Document("a", "y")], tenant="t", embed=embed, chunker=CHUNKER
        )
    tiny = CollectionStore(store.uri, progress=False, max_document_chars=10)
    with pytest.raises(PayloadTooLarge, match="11 characters; at most 10"):
        tiny.open("kb").upsert([Document("a", "x" * 11)], tenant="t", embed=embed, chunker=CHUNKER)
    with pytest.raises(InvalidRequest, match="expected 16, got 8"):
        col.upsert([Document("a", "x")], tenant="t", embed=FakeEmbed(8), chunker=CHUNKER)
    with pytest.raises(InvalidRequest, match="expected 16, got 3"):
        col.search([1.0, 0.0, 0.0], 3, tenant="t", embedder=V1)
    with pytest.raises(InvalidRequest, match="tenant"):
        col.search(embed.vector("x"), 3, tenant="", embedder=V1)
    with pytest.raises(InvalidRequest, match="k must be"):
        col.search(embed.vector("x"), 0, tenant="t", embedder=V1)
    with pytest.raises(InvalidRequest, match="filter"):
        col.search(embed.vector("x"), 3, tenant="t", embedder=V1, filter={"k": [1, 2]})
    assert col.table_for(*V1).count_rows() == 0


def test_unknown_collection_lists_the_known_ones(store: CollectionStore) -> None:
    store.create("alpha", model="fake", version="1", dim=DIM)
    store.create("beta", model="fake", version="1", dim=DIM)
    with pytest.raises(CollectionNotFound, match="known collections: alpha, beta") as e:
        store.open("gamma")
    assert isinstance(e.value, LookupError) and e.value.status == 404
    with pytest.raises(InvalidRequest, match="already exists"):
        store.create("alpha", model="fake", version="1", dim=DIM)
    with pytest.raises(InvalidRequest, match="collection name"):
        store.create("../etc", model="fake", version="1", dim=DIM)
    store.drop("alpha")
    assert store.names() == ["beta"]


def test_tenants_never_see_each_other_even_with_quotes(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    tenants = ["acme", "o'brien", "x' OR '1'='1", "x\\' OR 1=1 --", "a\\"]
    for t in tenants:
        col.upsert([Document(f"doc-{t}", f"secret of {t}")], tenant=t, embed=embed, chunker=CHUNKER)
    for t in tenants:
        hits = col.search(embed.vector("secret"), 10, tenant=t, embedder=V1)
        assert {h.doc_id for h in hits} == {f"doc-{t}"}
    assert col.search(embed.vector("secret"), 10, tenant="x", embedder=V1) == []
    # Deleting with a hostile tenant touches only that tenant.
    col.delete(["doc-acme", "doc-o'brien"], tenant="x' OR '1'='1")
    assert len(col.search(embed.vector("secret"), 10, tenant="acme", embedder=V1)) == 1
    assert len(col.search(embed.vector("secret"), 10, tenant="o'brien", embedder=V1)) == 1


def test_metadata_filters_are_exact_and_quoted(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    docs = [
        Document("a", "alpha", {"lang": "en", "n": 1, "ok": True}),
        Document("b", "beta", {"lang": "de", "n": 2, "ok": False}),
        Document("c", "gamma", {"lang": "it's", "n": 1.0, "nested": {"lang": "en"}}),
        Document("d", "delta", {"lang": "en", "n": "1"}),
    ]
    col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER)

    def ids(f: dict[str, object]) -> set[str]:
        return {
            h.doc_id for h in col.search(embed.vector("x"), 10, tenant="t", embedder=V1, filter=f)
        }

    assert ids({"lang": "en"}) == {"a", "d"}
    assert ids({"lang": "en", "n": 1}) == {"a"}  # the string "1" is not the number 1
    assert ids({"n": 1}) == {"a", "c"}  # 1.0 == 1
    assert ids({"ok": False}) == {"b"}
    assert ids({"lang": "it's"}) == {"c"}
    assert ids({"lang": "en' OR '1'='1"}) == set()
    assert ids({"missing": None}) == set()
    assert ids({}) == {"a", "b", "c", "d"}


def test_mmr_prefers_diverse_chunks(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    docs = [
        Document("dup1", "red apple pie"),
        Document("dup2", "red apple pie"),
        Document("other", "red zebra"),
    ]
    col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER)
    q = embed.vector("red apple pie")
    plain = col.search(q, 2, tenant="t", embedder=V1)
    assert {h.doc_id for h in plain} == {"dup1", "dup2"}
    diverse = col.search(q, 2, tenant="t", embedder=V1, mmr_lambda=0.3)
    assert {h.doc_id for h in diverse} == {"other"} | {diverse[0].doc_id}
    assert diverse[0].doc_id in {"dup1", "dup2"}
    with pytest.raises(InvalidRequest, match="mmr_lambda"):
        col.search(q, 2, tenant="t", embedder=V1, mmr_lambda=2.0)


def test_ingest_folder(store: CollectionStore, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "faq").mkdir(parents=True)
    (folder / "intro.md").write_text("welcome hello")
    (folder / "faq" / "returns.txt").write_text("return within days")
    (folder / "image.png").write_bytes(b"\x89PNG")
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    res = col.ingest_folder(folder, tenant="t", embed=embed, chunker=CHUNKER)
    assert (res.documents, res.chunks) == (2, 2)
    [hit] = col.search(embed.vector("return within days"), 1, tenant="t", embedder=V1)
    assert (hit.id, hit.metadata) == ("faq/returns#0", {"source": "faq/returns.txt"})
    with pytest.raises(InvalidRequest, match="not a directory"):
        col.ingest_folder(folder / "nope", tenant="t", embed=embed, chunker=CHUNKER)


def test_reembed_builds_a_separate_complete_version(store: CollectionStore) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    old, new = FakeEmbed(), FakeEmbed(dim=8, seed="v2")
    docs = [Document(f"d{i}", f"word{i} common text") for i in range(5)]
    col.upsert(docs, tenant="t", embed=old, chunker=CHUNKER)
    assert col.reembed("fake", "2", new, dim=8) == 5
    states = {(s.model, s.version): s for s in col.embedders()}
    assert states[V2].complete and not states[V2].active and states[V1].active
    assert col.table_for(*V2).count_rows() == 5
    # each version answers only queries of its own model; never mixed
    [h] = col.search(new.vector("word3 common text"), 1, tenant="t", embedder=V2)
    assert h.id == "d3#0" and h.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidRequest, match="expected 8, got 16"):
        col.search(old.vector("word3"), 1, tenant="t", embedder=V2)
    # a second run embeds only what changed; deletions reach every version
    col.upsert([Document("d0", "changed words")], tenant="t", embed=old, chunker=CHUNKER)
    col.delete(["d1"], tenant="t")
    assert col.table_for(*V2).count_rows() == 4
    assert col.reembed("fake", "2", new, dim=8) == 1
    col.activate("fake", "2")
    assert (col.active().model, col.active().version) == V2
    col.upsert([Document("d9", "fresh")], tenant="t", embed=new, chunker=CHUNKER)
    assert col.table_for(*V2).count_rows() == 5 and col.table_for(*V1).count_rows() == 4
    col.drop_version("fake", "1")
    with pytest.raises(EmbedderNotReady, match="no table"):
        col.search(old.vector("x"), 1, tenant="t", embedder=V1)


def test_interrupted_reembed_is_refused_then_resumes_without_duplicates(
    store: CollectionStore,
) -> None:
    col = store.create("kb", model="fake", version="1", dim=DIM)
    docs = [Document(f"d{i}", f"w{i}") for i in range(40)]
    col.upsert(docs, tenant="t", embed=FakeEmbed(), chunker=CHUNKER)
    small = CollectionStore(store.uri, progress=False, embed_batch=1)  # 16 rows per merge
    new = FakeEmbed(seed="v2")

    def dies_after_20(texts: list[str]) -> list[list[float]]:
        if new.texts >= 20:
            raise RuntimeError("worker lost")
        return new(texts)

    with pytest.raises(RuntimeError):
        small.open("kb").reembed("fake", "2", dies_after_20, dim=DIM)
    assert col.table_for(*V2).count_rows() == 16  # one merge of 16 landed
    with pytest.raises(EmbedderNotReady, match="still being built"):
        col.search(new.vector("w1"), 1, tenant="t", embedder=V2)
    with pytest.raises(EmbedderNotReady, match="still being built"):
        col.activate("fake", "2")
    new.texts = 0
    assert small.open("kb").reembed("fake", "2", new, dim=DIM) == 24
    assert new.texts == 24
    table = col.table_for(*V2)
    assert table.count_rows() == 40
    assert len(set(table.to_arrow().column("id").to_pylist())) == 40
    assert col.search(new.vector("w7"), 1, tenant="t", embedder=V2)[0].id == "d7#0"
    with pytest.raises(InvalidRequest, match="dimension 16, got 8"):
        col.reembed("fake", "2", new, dim=8)
    with pytest.raises(InvalidRequest, match="already the active"):
        col.reembed("fake", "1", new, dim=DIM)


def test_ann_index_is_built_at_the_threshold(tmp_path: Path) -> None:
    spec = IndexSpec(kind="IVF_PQ", rows_per_partition=64, num_sub_vectors=4, nprobes=4)
    store = CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=300, index=spec)
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    col.upsert(
        [Document(f"d{i}", f"w{i}") for i in range(200)], tenant="t", embed=embed, chunker=CHUNKER
    )
    table = col.table_for(*V1)
    assert list(table.list_indices()) == []  # exact search below the threshold
    col.upsert(
        [Document(f"e{i}", f"v{i} u{i}") for i in range(200)],
        tenant="t",
        embed=embed,
        chunker=CHUNKER,
    )
    assert {tuple(i.columns) for i in table.list_indices()} >= {("vector",), ("tenant",)}
    [hit] = col.search(embed.vector("v17 u17"), 1, tenant="t", embedder=V1)
    assert hit.id == "e17#0"
    assert col.search(embed.vector("v17 u17"), 1, tenant="other", embedder=V1) == []


def test_ivf_sq_index_is_built_and_searched_with_exact_scores(tmp_path: Path) -> None:
    spec = IndexSpec(kind="IVF_SQ", rows_per_partition=100, nprobes=3, refine_factor=1)
    store = CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=300, index=spec)
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    docs = [Document(f"d{i}", f"w{i} x{i}") for i in range(300)]
    col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER)
    [index] = [i for i in col.table_for(*V1).list_indices() if i.columns == ["vector"]]
    assert index.index_type == "IvfSq"
    [hit] = col.search(embed.vector("w42 x42"), 1, tenant="t", embedder=V1)
    assert hit.id == "d42#0" and hit.score == pytest.approx(1.0, abs=1e-5)
    # scores are cosine similarities, not the index's own (quantised, L2) distances
    query = embed.vector("w42 y")
    for h in col.search(query, 5, tenant="t", embedder=V1):
        assert h.score == pytest.approx(float(np.dot(query, embed.vector(h.text))), abs=1e-5)
    assert col.search(embed.vector("w42 x42"), 1, tenant="other", embedder=V1) == []


def test_small_files_of_many_upserts_are_compacted(tmp_path: Path) -> None:
    spec = IndexSpec(kind="IVF_SQ", rows_per_partition=100, nprobes=3)
    store = CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=300, index=spec)
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()
    for batch in range(3):  # three upserts: three files, compacted into one with the index
        docs = [Document(f"d{batch}-{i}", f"w{batch}x{i}") for i in range(100)]
        col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER)
    table = col.table_for(*V1)
    assert table.stats()["fragment_stats"]["num_fragments"] == 1
    for i in range(MAX_SMALL_FILES + 1):  # one document per call, as a chat app adds notes
        col.upsert([Document(f"n{i}", f"note{i}")], tenant="t", embed=embed, chunker=CHUNKER)
    assert table.stats()["fragment_stats"]["num_small_fragments"] <= MAX_SMALL_FILES
    assert table.count_rows() == 300 + MAX_SMALL_FILES + 1
    [hit] = col.search(embed.vector("note7"), 1, tenant="t", embedder=V1)
    assert hit.id == "n7#0" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_a_failed_upkeep_does_not_fail_the_write(tmp_path: Path, monkeypatch, caplog) -> None:
    spec = IndexSpec(kind="IVF_SQ", rows_per_partition=100, nprobes=3)
    store = CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=300, index=spec)
    col = store.create("kb", model="fake", version="1", dim=DIM)
    embed = FakeEmbed()

    def lost_a_race(self: Any, table: Any, dim: int) -> bool:
        raise RuntimeError("commit conflict")

    monkeypatch.setattr(type(col), "_maybe_index", lost_a_race)
    docs = [Document(f"d{i}", f"w{i}") for i in range(300)]
    assert col.upsert(docs, tenant="t", embed=embed, chunker=CHUNKER).chunks == 300
    assert "upkeep of table" in caplog.text and "commit conflict" in caplog.text
    [hit] = col.search(embed.vector("w7"), 1, tenant="t", embedder=V1)  # exact, unindexed
    assert hit.id == "d7#0"
    monkeypatch.undo()
    assert col.optimize(*V1)  # the next upkeep builds the index
    assert {tuple(i.columns) for i in col.table_for(*V1).list_indices()} >= {("vector",)}


def test_index_spec_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="one of IVF_PQ, IVF_SQ, IVF_HNSW_SQ; got 'IVF_XX'"):
        IndexSpec(kind="IVF_XX")
    with pytest.raises(ValueError, match="refine_factor must be at least 1"):
        IndexSpec(kind="IVF_SQ", refine_factor=0)


def test_cached_tables_and_manifest_see_every_write(tmp_path: Path) -> None:
    # Two stores on one URI stand for two processes; each keeps its tables open and its
    # manifest rows cached between calls.
    a = CollectionStore(str(tmp_path / "db"), progress=False, index_min_rows=10_000)
    b = CollectionStore(a.uri, progress=False, index_min_rows=10_000)
    embed, new = FakeEmbed(), FakeEmbed(dim=8, seed="v2")
    col_a = a.create("kb", model="fake", version="1", dim=DIM)
    col_a.upsert([Document("d1", "alpha beta")], tenant="t", embed=embed, chunker=CHUNKER)
    col_b = b.open("kb")

    def found(col: Any, text: str, embedder: tuple[str, str] = V1, e: Any = embed) -> list[str]:
        return [h.doc_id for h in col.search(e.vector(text), 5, tenant="t", embedder=embedder)]

    assert found(col_b, "alpha beta") == ["d1"]
    col_a.upsert([Document("d2", "gamma delta")], tenant="t", embed=embed, chunker=CHUNKER)
    assert found(col_b, "gamma delta") == ["d2", "d1"]
    col_a.delete(["d2"], tenant="t")
    assert found(col_b, "gamma delta") == ["d1"]
    assert b.names() == ["kb"]
    a.create("other", model="fake", version="1", dim=DIM)
    assert b.names() == ["kb", "other"]
    a.drop("other")
    assert a.names() == b.names() == ["kb"]
    # a re-embedding activated by one store is the active version for the other
    assert col_a.reembed("fake", "2", new, dim=8) == 1
    assert (col_b.active().model, col_b.active().version) == V1
    col_a.activate("fake", "2")
    assert (col_b.active().model, col_b.active().version) == V2
    col_b.upsert([Document("d3", "epsilon")], tenant="t", embed=new, chunker=CHUNKER)
    assert found(col_a, "epsilon", V2, new) == ["d3", "d1"]
    assert found(col_a, "epsilon") == ["d1"]  # the old version's table is not written to
