"""Packing chunks and turns into a token budget."""

from dataclasses import dataclass

import pytest

from airi_ray.core.context import CONTEXT_HEADER, Chunk, build_context
from airi_ray.core.errors import ContextWindowExceeded, InvalidRequest


@dataclass(frozen=True)
class C:
    id: str
    text: str
    score: float


def count(text: str) -> int:
    return len(text.split())


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def words(n: int, w: str = "x") -> str:
    return " ".join([w] * n)


def test_everything_fits() -> None:
    chunks = [C("doc-1#0", "low", 0.2), C("doc-3#2", "high", 0.9)]
    turns = [user("hi"), assistant("hello"), user("what is it")]
    cw = build_context("Be brief.", chunks, turns, 1000, count)
    system = cw.messages[0]
    assert system["role"] == "system"
    assert system["content"] == f"Be brief.\n\n{CONTEXT_HEADER}\n\n[doc-3#2] high\n\n[doc-1#0] low"
    assert list(cw.messages[1:]) == turns
    assert cw.cited_ids == ("doc-3#2", "doc-1#0")  # best score first
    assert cw.dropped_chunk_ids == () and cw.dropped_turns == 0
    assert cw.tokens_used == sum(count(m["content"]) for m in cw.messages)


def test_a_chunk_too_big_is_skipped_and_a_smaller_later_one_fits() -> None:
    chunks = [C("a#0", words(5), 0.9), C("b#0", words(50), 0.8), C("c#0", words(5), 0.7)]
    base = count(f"S\n\n{CONTEXT_HEADER}")
    budget = base + 2 * 6 + 2  # room for two small chunks ("[id]" + 5 words each) + question
    cw = build_context("S", chunks, [user("q q")], budget, count)
    assert cw.cited_ids == ("a#0", "c#0")
    assert cw.dropped_chunk_ids == ("b#0",)
    assert cw.tokens_used <= budget


def test_oldest_turns_are_dropped_first_and_the_kept_ones_are_contiguous() -> None:
    turns = [user(words(10)), assistant(words(2)), user(words(10)), assistant(words(2)), user("q")]
    cw = build_context("S", [], turns, 1 + 1 + 2 + 10, count)
    assert list(cw.messages[1:]) == turns[2:]
    assert cw.dropped_turns == 2
    # a short old turn behind a long one that does not fit stays out (no hole)
    cw = build_context("S", [], turns, 1 + 1 + 2 + 5, count)
    assert list(cw.messages[1:]) == turns[3:]
    assert cw.dropped_turns == 3


def test_chunks_come_before_old_turns() -> None:
    turns = [user(words(5)), assistant(words(5)), user("q")]
    chunk = C("d#0", words(8), 1.0)
    header = count(f"S\n\n{CONTEXT_HEADER}\n\n[d#0] {words(8)}")
    cw = build_context("S", [chunk], turns, header + 1 + 5, count)
    assert cw.cited_ids == ("d#0",)
    assert list(cw.messages[1:]) == turns[1:]
    assert cw.dropped_turns == 1


def test_reserve_output_shrinks_the_budget() -> None:
    chunks = [C("d#0", words(10), 1.0)]
    free = build_context("S", chunks, [user("q")], 30, count)
    reserved = build_context("S", chunks, [user("q")], 30, count, reserve_output=20)
    assert free.cited_ids == ("d#0",)
    assert reserved.cited_ids == () and reserved.dropped_chunk_ids == ("d#0",)


def test_last_user_turn_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(ContextWindowExceeded, match="last user message") as e:
        build_context("S", [], [user(words(50))], 20, count, reserve_output=5)
    assert "15 allowed" in str(e.value)


def test_turns_after_the_last_user_turn_are_kept_with_it() -> None:
    turns = [user(words(20)), user("q"), {"role": "tool", "content": "result"}]
    cw = build_context("", [], turns, 5, count)
    assert list(cw.messages) == turns[1:]  # no system message when there is nothing in it
    assert cw.dropped_turns == 1


def test_no_system_prompt_but_chunks() -> None:
    cw = build_context("", [C("d#0", "text", 1.0)], [user("q")], 100, count)
    assert cw.messages[0]["content"] == f"{CONTEXT_HEADER}\n\n[d#0] text"


def test_exact_count_of_the_whole_system_message() -> None:
    # A counter that is not additive: it counts characters of the whole string.
    cw = build_context("S", [C("d#0", "abc", 1.0)], [user("q")], 1000, len)
    assert cw.tokens_used == len(cw.messages[0]["content"]) + 1


@pytest.mark.parametrize(
    "turns",
    [[], [assistant("hi")], [{"role": "user"}], [{"role": "wizard", "content": "x"}]],
)
def test_malformed_conversations_are_refused(turns: list[dict[str, str]]) -> None:
    with pytest.raises(InvalidRequest):
        build_context("S", [], turns, 100, count)


def test_negative_reserve_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="reserve_output"):
        build_context("S", [], [user("q")], 100, count, reserve_output=-1)


def test_a_hit_as_a_graph_state_holds_it_is_a_chunk() -> None:
    hit = {"id": "kb#1", "text": "Boots can be returned for 30 days.", "score": 0.8}
    window = build_context("", [Chunk.of(hit)], [{"role": "user", "content": "q"}], 100, len)
    assert window.cited_ids == ("kb#1",)
    assert "[kb#1] Boots can be returned" in window.messages[0]["content"]
    chunk = Chunk("kb#2", "text", 0.1)
    assert Chunk.of(chunk) is chunk
    with pytest.raises(InvalidRequest, match="'id', a 'text' and a numeric 'score'"):
        Chunk.of({"text": "no id"})
    with pytest.raises(InvalidRequest, match="numeric 'score'"):
        Chunk.of({"id": "x", "text": "t", "score": "high"})
