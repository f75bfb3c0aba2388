"""Quick checks of the demo knowledge base (no model, no torch)."""

from __future__ import annotations

import re

from airi_ray.demo.kb import kb_dir, load_documents


def test_documents_are_loaded_sorted_with_file_stems_as_ids() -> None:
    docs = load_documents()
    ids = [doc_id for doc_id, _ in docs]
    assert 36 <= len(docs) <= 40
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {p.stem for p in kb_dir().glob("*.md")} == set(ids)
    assert "returns-policy" in ids


def test_every_document_has_a_title_and_a_short_body() -> None:
    for doc_id, text in load_documents():
        first_line = text.splitlines()[0]
        assert re.fullmatch(r"# \S.*", first_line), doc_id
        words = len(text.split())
        assert 120 <= words <= 300, (doc_id, words)


def test_documents_carry_concrete_facts() -> None:
    docs = dict(load_documents())
    assert "30 days" in docs["returns-policy"]
    assert "$49" in docs["nimbus-plus-membership"]
    assert all(re.search(r"\d", text) for text in docs.values())
