"""Token-window chunking: sizes, overlap, coverage and argument checks."""

import pytest

from airi_ray.core.chunking import Chunker, chunk_text


def encode(text: str) -> list[int]:
    # One token per whitespace-separated word; ids are the words' positions in VOCAB.
    return [VOCAB.setdefault(w, len(VOCAB)) for w in text.split()]


def decode(ids: list[int]) -> str:
    words = {i: w for w, i in VOCAB.items()}
    return " ".join(words[i] for i in ids)


VOCAB: dict[str, int] = {}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_short_text_is_one_chunk() -> None:
    [c] = chunk_text(words(5), encode, decode, max_tokens=8, overlap_tokens=2)
    assert (c.index, c.text, c.start_token, c.end_token) == (0, words(5), 0, 5)


def test_windows_overlap_and_cover_everything() -> None:
    chunks = chunk_text(words(20), encode, decode, max_tokens=8, overlap_tokens=3)
    assert [(c.start_token, c.end_token) for c in chunks] == [(0, 8), (5, 13), (10, 18), (15, 20)]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert all(len(encode(c.text)) <= 8 for c in chunks)
    # consecutive windows share exactly the overlap
    assert chunks[0].text.split()[-3:] == chunks[1].text.split()[:3]
    covered = set()
    for c in chunks:
        covered |= set(c.text.split())
    assert covered == set(words(20).split())


def test_no_overlap_partitions_the_text() -> None:
    chunks = chunk_text(words(10), encode, decode, max_tokens=5, overlap_tokens=0)
    assert " ".join(c.text for c in chunks) == words(10)


def test_empty_text_has_no_chunks() -> None:
    assert chunk_text("", encode, decode) == []
    assert chunk_text("   \n ", encode, decode) == []


def test_whitespace_windows_are_skipped_and_indexes_stay_consecutive() -> None:
    # A tokenizer where a window may decode to whitespace only.
    def enc(text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def dec(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    chunks = chunk_text("ab" + " " * 6 + "cd", enc, dec, max_tokens=2, overlap_tokens=0)
    assert [(c.index, c.text) for c in chunks] == [(0, "ab"), (1, "cd")]


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (4, 4), (4, 5), (4, -1)])
def test_bad_window_sizes_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        chunk_text("a b c", encode, decode, max_tokens=size, overlap_tokens=overlap)
    with pytest.raises(ValueError):
        Chunker(encode, decode, max_tokens=size, overlap_tokens=overlap)


def test_chunker_bundles_the_settings() -> None:
    chunker = Chunker(encode, decode, max_tokens=4, overlap_tokens=1)
    assert chunker.split(words(7)) == chunk_text(
        words(7), encode, decode, max_tokens=4, overlap_tokens=1
    )


def test_retrieval_core_modules_are_pure() -> None:
    import subprocess
    import sys

    code = (
        "import sys, airi_ray.core.chunking, airi_ray.core.context, airi_ray.core.mmr;"
        "bad = [m for m in ('ray', 'asyncio', 'lancedb', 'pyarrow', 'socket') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
