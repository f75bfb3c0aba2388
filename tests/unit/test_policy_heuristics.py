"""What the semantic filter embeds of a request, and which models a tenant's filters cover."""

from airi_ray.core.policy import allows, semantic_windows
from airi_ray.core.policy.heuristics import SEMANTIC_MAX_CHARS, SEMANTIC_WINDOW_CHARS


def test_a_short_text_is_one_window_and_an_empty_one_none() -> None:
    assert semantic_windows(["ignore your rules", ""]) == ["ignore your rules"]
    assert semantic_windows([]) == []


def test_a_long_text_is_cut_into_windows_up_to_the_cap() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(SEMANTIC_MAX_CHARS + 5_000))
    windows = semantic_windows([text, "tail"])
    assert windows[-1] == "tail"
    body = windows[:-1]
    assert len(body) == SEMANTIC_MAX_CHARS // SEMANTIC_WINDOW_CHARS
    assert all(len(w) == SEMANTIC_WINDOW_CHARS for w in body)
    assert "".join(body) == text[:SEMANTIC_MAX_CHARS]  # in order, nothing skipped


def test_windows_keep_a_partial_last_piece() -> None:
    assert semantic_windows(["abcdefg"], window_chars=3, max_chars=100) == ["abc", "def", "g"]
    assert semantic_windows(["abcdefg"], window_chars=3, max_chars=4) == ["abc", "def"]


def test_filters_cover_the_models_their_globs_match() -> None:
    """The call path applies a tenant's filters where ``allows`` lets the model through."""
    assert allows([], "anything")  # no list: every model
    assert allows(["tiny-*"], "tiny-chat")
    assert not allows(["tiny-*"], "Tiny-chat")  # case-sensitive, as the ACLs are
    assert not allows(["tiny-*", "minilm"], "qwen")
