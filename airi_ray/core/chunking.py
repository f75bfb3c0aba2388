"""Split a document into overlapping windows of tokens, for embedding and retrieval.

Chunk sizes are counted in the embedding model's own tokens, so a chunk never exceeds what
the model reads (an embedder truncates silently past its limit, and the tail of an
over-long chunk would be unsearchable). The tokenizer is injected as two callables,
``encode(text) -> list[int]`` and ``decode(ids) -> str``, so the caller can pass the real
model tokenizer (for a Hugging Face tokenizer, ``encode`` should not add special tokens).

Windows step by ``max_tokens - overlap_tokens``: a sentence cut at one window's end appears
whole at the start of the next, so a query matching it still finds one chunk holding it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class TextChunk:
    """One window of a document.

    Attributes:
        index: position among the document's chunks, from 0 (part of the citation id).
        text: the decoded window, stripped of surrounding whitespace.
        start_token, end_token: the window's token range ``[start, end)`` in the document.
    """

    index: int
    text: str
    start_token: int
    end_token: int


def _check_sizes(max_tokens: int, overlap_tokens: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be in [0, max_tokens={max_tokens}), got {overlap_tokens}"
        )


def chunk_text(
    text: str,
    encode: Encode,
    decode: Decode,
    *,
    max_tokens: int = 256,
    overlap_tokens: int = 32,
) -> list[TextChunk]:
    """Split ``text`` into windows of at most ``max_tokens`` tokens overlapping by ``overlap_tokens``.

    A text of at most ``max_tokens`` tokens is one chunk; an empty or all-whitespace text
    has none. Windows that decode to whitespace only are skipped, and the indexes stay
    consecutive.

    Raises:
        ValueError: ``max_tokens`` below 1, or ``overlap_tokens`` negative or not below
            ``max_tokens`` (the windows would not advance).
    """
    _check_sizes(max_tokens, overlap_tokens)
    ids = list(encode(text))
    step = max_tokens - overlap_tokens
    chunks: list[TextChunk] = []
    start = 0
    while start < len(ids):
        end = min(start + max_tokens, len(ids))
        piece = decode(ids[start:end]).strip()
        if piece:
            chunks.append(TextChunk(len(chunks), piece, start, end))
        if end == len(ids):
            break
        start += step
    return chunks


@dataclass(frozen=True)
class Chunker:
    """A tokenizer and window sizes bundled, so ingestion takes one argument.

    Raises:
        ValueError: the window sizes are out of range (see ``chunk_text``).
    """

    encode: Encode
    decode: Decode
    max_tokens: int = 256
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        # Fail at construction, not at the first document of a long ingest.
        _check_sizes(self.max_tokens, self.overlap_tokens)

    def split(self, text: str) -> list[TextChunk]:
        """``chunk_text`` with this chunker's tokenizer and sizes."""
        return chunk_text(
            text,
            self.encode,
            self.decode,
            max_tokens=self.max_tokens,
            overlap_tokens=self.overlap_tokens,
        )
