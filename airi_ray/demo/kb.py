"""The Nimbus Gear demo knowledge base.

A few dozen short Markdown documents about a fictional outdoor-equipment retailer, shipped
as package data in ``airi_ray/demo/kb/``. Each document starts with a ``# Title`` line. Demos
index them for retrieval, and the tiny demo model is trained on them.
"""

from __future__ import annotations

from pathlib import Path


def kb_dir() -> Path:
    """Directory holding the knowledge-base Markdown files."""
    # The files are plain package data next to this module; a path is enough (no zip installs).
    return Path(__file__).resolve().parent / "kb"


def load_documents() -> list[tuple[str, str]]:
    """All documents as ``(doc_id, text)`` pairs, sorted by id; the id is the file stem."""
    # Sorting fixes the order across file systems, so anything built from the corpus
    # (indexes, the tiny model) is reproducible.
    paths = sorted(kb_dir().glob("*.md"), key=lambda p: p.stem)
    return [(p.stem, p.read_text(encoding="utf-8")) for p in paths]
