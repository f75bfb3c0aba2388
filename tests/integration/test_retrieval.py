"""Retrieval over the demo knowledge base: ingested through AIRI's embedding path, scoped to
the tenant, and usable as a graph node."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

import airi_ray
from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.data.collections import CollectionStore, collections_uri
from airi_ray.graphs import END, START, Field, StateGraph, retrieve
from tests.conftest import OTHER_KEY, wait_for

KB = Path(airi_ray.__file__).parent / "demo" / "kb"

# Questions written for the corpus, each with the document that answers it.
QUESTIONS = {
    "How should I clean my hiking boots after a trip?": "boot-care",
    "Am I charged for an out-of-stock item before it ships?": "backorders",
    "Do you sell my personal data to anyone?": "data-privacy",
    "Does your website work with a screen reader?": "accessibility",
    "How do I set up two-factor authentication on my account?": "two-factor-authentication",
    "Can I rent a tent instead of buying one?": "rentals",
}


@pytest.fixture(scope="module")
def kb(client) -> str:
    name = "kb"
    if name not in client.collections():
        client.create_collection(name, model="minilm")
    result = client.ingest(name, folder=KB)
    assert result["documents"] == len(list(KB.glob("*.md")))
    return name


def test_the_right_document_ranks_first(client, kb: str) -> None:
    misses = {}
    for question, doc in QUESTIONS.items():
        hits = client.retrieve(kb, question, k=3)
        assert hits and hits[0]["score"] > 0
        if hits[0]["doc_id"] != doc:
            misses[question] = [h["doc_id"] for h in hits]
    assert not misses, misses


def test_a_tenant_never_retrieves_another_tenants_chunks(kb: str) -> None:
    other = airi_ray.connect("auto", api_key=OTHER_KEY)
    try:
        assert other.retrieve(kb, "How should I clean my hiking boots?", k=5) == []
        other.ingest(kb, documents=[{"id": "b-only", "text": "Tenant b's secret boot tips."}])
        hits = other.retrieve(kb, "boot tips", k=5)
        assert [h["doc_id"] for h in hits] == ["b-only"]
    finally:
        other.close()


def test_retrieval_as_a_graph_node_keeps_citations(client, kb: str) -> None:
    g = StateGraph("rag", {"question": Field(), "chunks": Field()}, inputs=["question"])
    g.add_node(
        "search",
        retrieve(kb, lambda v: v["question"], output="chunks", k=2),
        reads=["question"],
        writes=["chunks"],
    )
    g.add_edge(START, "search").add_edge("search", END)
    client.register_graph(g.compile())
    result = client.run_graph("rag", {"question": "Can I rent a tent instead of buying one?"})
    assert result["status"] == "finished", result
    chunks: list[dict[str, Any]] = result["state"]["chunks"]
    assert chunks[0]["doc_id"] == "rentals" and chunks[0]["id"].startswith("rentals#")
    # embedding the question is a model call of the run: it counts against its budget
    assert result["usage"]["calls"] == 1 and result["usage"]["per_model"]["minilm"] > 0


def test_bad_retrieval_requests_are_refused(client, kb: str) -> None:
    with pytest.raises(NotFound, match="no collection 'nope'"):
        client.retrieve("nope", "boots")
    with pytest.raises(InvalidRequest, match="query must be a string"):
        client.retrieve(kb, "")
    with pytest.raises(InvalidRequest):
        client.ingest(kb, documents=[{"id": "", "text": "x"}])
    with pytest.raises(InvalidRequest, match="already exists"):
        client.create_collection(kb, model="minilm")


def test_the_cli_ingests_and_retrieves(kb: str, tmp_path: Path, capsys) -> None:
    from airi_ray import cli
    from tests.conftest import KEY

    note = tmp_path / "lantern-batteries.md"
    note.write_text("# Lantern batteries\n\nOur camp lanterns take four AA batteries.")
    assert cli.main(["ingest", kb, str(note), "--api-key", KEY]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert cli.main(["retrieve", kb, "what batteries does the lantern take", "--api-key", KEY]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "[lantern-batteries#0]" in first


@pytest.mark.rollout
def test_an_embedder_rollout_reembeds_its_collections_and_switches_with_them(
    airi_app, client, kb: str
) -> None:
    """minilm moves from version 1 to 2. Once version 2 is ready, a job re-embeds the
    collection into a version-2 table with version 2 alone; only then does version 2 take
    queries, each searching the table of the version that embedded it; at promotion the
    new table becomes the active one. Retrieval answers right at every moment."""
    spec = copy.deepcopy(airi_app.spec)
    spec["models"][1]["versions"] = {"2": {}}
    client.deploy(spec)  # declares version 2; nothing moves yet
    client.rollout("minilm", "2", strategy="blue-green")
    store = CollectionStore(collections_uri(spec["storage"]["uri"]), progress=False)
    question, answer = "How should I clean my hiking boots after a trip?", "boot-care"
    wrong: list[Any] = []
    deadline = time.monotonic() + 180
    while next(m for m in client.status()["models"] if m["name"] == "minilm")["version"] != "2":
        assert time.monotonic() < deadline, "minilm version 2 was not promoted in time"
        hits = client.retrieve(kb, question, k=1)
        if not hits or hits[0]["doc_id"] != answer:
            wrong.append(hits)
        time.sleep(0.2)
    assert not wrong, wrong[:2]
    wait_for(lambda: store.open(kb).active().version == "2", 60, "the version-2 table to be active")
    states = {s.version: s for s in store.open(kb).embedders()}
    assert states["2"].complete and states["1"].complete and not states["1"].active
    assert client.retrieve(kb, question, k=1)[0]["doc_id"] == answer
    # Later tests deploy the session spec: it serves version 2 now (no rollout back).
    airi_app.spec["models"][1] |= {"version": "2", "versions": {"1": {}}}
