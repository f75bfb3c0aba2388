"""Quality signals: refusal heuristic, cosine and grounding, and the per-version book."""

from __future__ import annotations

import math

import pytest

from airi_ray.core.quality import (
    REFUSAL_PATTERNS,
    QualityBook,
    Response,
    cosine,
    grounding,
    is_refusal,
)


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I cannot help with that request.",
        "I cannot assist with this.",
        "I cannot provide instructions for that.",
        "I cannot comply.",
        "I'm sorry, but I can't share that.",
        "I am sorry but that is not something I can do.",
        "I won't be able to do that.",
        "As an AI language model, I do not have opinions.",
        "As an AI, I cannot browse the web.",
        "I'm not able to answer that.",
        "I'm unable to help with that.",
        "I am unable to continue.",
        "Sorry, I can't do that",
        "Sorry, but I cannot help.",
        "Unfortunately, I can't provide that.",
        "I must decline.",
        "I apologise, but no.",
        "   \n\ti can't help with that",  # leading whitespace and case ignored
        "I can\u2019t help with that.",  # curly apostrophe
        "i'M SORRY, BUT no.",
    ],
)
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Sure! Here is the summary you asked for.",
        # Eager, not refusing: "cannot" must be followed by help/assist/provide/comply...
        "I cannot wait to help you with this!",
        # A refusal phrase that is not the opening of the answer.
        "Here is the plan. I can't promise it works, but try it.",
        "The error says: I'm sorry, but the file is missing.",
        "Paris is the capital of France. As an AI language model I may be wrong.",
        # Word boundaries: these only share a prefix with a pattern.
        "As an AIrline pilot would tell you, check the weather.",
        "I can't helpfully summarise in fewer words than this: ...",
        "I'm able to help with that.",
    ],
)
def test_non_refusals_are_not_detected(text: str) -> None:
    assert not is_refusal(text)


def test_refusal_only_looks_at_the_start() -> None:
    assert not is_refusal("x" * 500 + " I can't help with that.")
    assert is_refusal("I can't help with that. " + "x" * 10_000)


def test_refusal_patterns_are_a_documented_tuple() -> None:
    assert isinstance(REFUSAL_PATTERNS, tuple) and len(REFUSAL_PATTERNS) >= 8


def test_cosine_values() -> None:
    assert cosine([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert cosine([1.0, 1.0], [-1.0, -1.0]) == pytest.approx(-1.0)
    assert cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([0.0, 0.0], [1.0, 2.0]) == 0.0  # a zero vector has no direction
    assert cosine([], []) == 0.0
    v = [0.1, 0.7, -0.3, 1e-3]
    assert -1.0 <= cosine(v, v) <= 1.0 and cosine(v, v) == pytest.approx(1.0)


def test_cosine_rejects_bad_vectors() -> None:
    with pytest.raises(ValueError, match="same dimension, got 2 and 3"):
        cosine([1.0, 0.0], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        cosine([1.0, float("nan")], [1.0, 0.0])
    with pytest.raises(ValueError, match="flat"):
        cosine([[1.0, 0.0]], [[1.0, 0.0]])  # type: ignore[list-item]


def test_grounding_is_the_best_cited_match() -> None:
    answer = [1.0, 0.0, 0.0]
    cited = [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]
    assert grounding(answer, cited) == pytest.approx(1 / math.sqrt(2))
    assert grounding(answer, [answer]) == pytest.approx(1.0)
    assert grounding(answer, []) is None
    with pytest.raises(ValueError, match="same dimension"):
        grounding(answer, [[1.0, 0.0]])


def _r(
    *,
    model: str = "qwen",
    version: str = "2",
    tokens: int | None = 10,
    finish: str | None = "stop",
    error: str | None = None,
    refused: bool = False,
    filtered: bool = False,
) -> Response:
    return Response(model, version, tokens, finish, error, refused, filtered)


def test_response_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError, match="output_tokens must be a count >= 0"):
        _r(tokens=-1)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        QualityBook(window=0)


def test_rates_and_means_over_responses() -> None:
    book = QualityBook()
    book.observe(_r(tokens=10, finish="stop"))
    book.observe(_r(tokens=30, finish="length", refused=True))
    book.observe(_r(tokens=None, finish=None, error="timeout"))
    book.observe(_r(tokens=20, finish="stop", filtered=True))
    v = book.version("qwen", "2")
    assert v is not None
    assert v["responses"] == 4
    assert v["error_rate"] == pytest.approx(0.25)
    assert v["refusal_rate"] == pytest.approx(0.25)
    assert v["filtered_rate"] == pytest.approx(0.25)
    assert v["mean_output_tokens"] == pytest.approx(20.0)  # the failed call has no length
    assert v["finish_reasons"] == {"length": 1, "stop": 2}


def test_window_eviction_keeps_rates_right() -> None:
    book = QualityBook(window=4)
    for _ in range(4):
        book.observe(_r(error="boom", tokens=None, finish=None, refused=True))
    v = book.version("qwen", "2")
    assert v is not None and v["error_rate"] == 1.0 and v["mean_output_tokens"] is None
    for i in range(3):
        book.observe(_r(tokens=100 + i, finish="length"))
    v = book.version("qwen", "2")
    assert v is not None
    assert v["responses"] == 7  # lifetime
    assert v["error_rate"] == pytest.approx(0.25)
    assert v["refusal_rate"] == pytest.approx(0.25)
    assert v["mean_output_tokens"] == pytest.approx(101.0)
    assert v["finish_reasons"] == {"length": 3}  # evicted reasons drop out
    for _ in range(4):
        book.observe(_r(tokens=5, finish="stop"))
    v = book.version("qwen", "2")
    assert v is not None
    assert v["error_rate"] == 0.0 and v["refusal_rate"] == 0.0
    assert v["mean_output_tokens"] == 5.0
    assert v["finish_reasons"] == {"stop": 4}


def test_long_run_matches_a_recount() -> None:
    """Running sums stay equal to a recount of the window over many evictions."""
    window = 7
    book = QualityBook(window=window)
    scores = [((i * 37) % 201 - 100) / 100 for i in range(1000)]
    responses = [
        _r(
            tokens=None if i % 5 == 0 else i % 13,
            finish=("stop", "length", None)[i % 3],
            error="x" if i % 5 == 0 else None,
            refused=i % 4 == 0,
            filtered=i % 6 == 0,
        )
        for i in range(1000)
    ]
    for s, r in zip(scores, responses, strict=True):
        book.observe(r)
        book.observe_feedback("qwen", "2", s)
        book.observe_grounding("qwen", "2", s)
    v = book.version("qwen", "2")
    assert v is not None
    last = responses[-window:]
    assert v["error_rate"] == pytest.approx(sum(r.error is not None for r in last) / window)
    assert v["refusal_rate"] == pytest.approx(sum(r.refused for r in last) / window)
    assert v["filtered_rate"] == pytest.approx(sum(r.filtered for r in last) / window)
    lengths = [r.output_tokens for r in last if r.output_tokens is not None]
    assert v["mean_output_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    expected: dict[str, int] = {}
    for r in last:
        if r.finish_reason is not None:
            expected[r.finish_reason] = expected.get(r.finish_reason, 0) + 1
    assert v["finish_reasons"] == expected
    tail = scores[-window:]
    assert v["feedback_mean"] == pytest.approx(sum(tail) / window, abs=1e-12)
    assert v["grounding_mean"] == pytest.approx(sum(tail) / window, abs=1e-12)
    assert v["feedback_negative_rate"] == pytest.approx(sum(s < 0 for s in tail) / window)
    assert v["feedback_count"] == 1000 and v["grounding_count"] == window


def test_feedback_and_scores() -> None:
    book = QualityBook(window=3)
    for s in (1.0, -1.0, 1.0, -1.0):
        book.observe_feedback("qwen", "2", s)
    v = book.version("qwen", "2")
    assert v is not None
    assert v["feedback_count"] == 4  # lifetime
    assert v["feedback_mean"] == pytest.approx(-1 / 3)  # window: -1, 1, -1
    assert v["feedback_negative_rate"] == pytest.approx(2 / 3)
    assert v["responses"] == 0 and v["error_rate"] == 0.0  # no responses yet
    book.observe_relevance("minilm", "1", 0.8)
    book.observe_relevance("minilm", "1", 0.4)
    book.observe_grounding("qwen", "2", 0.9)
    emb = book.version("minilm", "1")
    assert emb is not None
    assert emb["relevance_mean"] == pytest.approx(0.6) and emb["relevance_count"] == 2
    assert emb["grounding_mean"] is None and emb["feedback_mean"] is None
    assert emb["feedback_negative_rate"] is None
    v = book.version("qwen", "2")
    assert v is not None and v["grounding_mean"] == pytest.approx(0.9)
    assert v["relevance_mean"] is None and v["relevance_count"] == 0


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), float("inf"), -float("inf")])
def test_scores_are_validated(bad: float) -> None:
    book = QualityBook()
    with pytest.raises(
        ValueError, match=r"feedback score must be a finite number within \[-1, 1\]"
    ):
        book.observe_feedback("qwen", "2", bad)
    with pytest.raises(ValueError, match=r"best_similarity must be a finite number"):
        book.observe_relevance("minilm", "1", bad)
    with pytest.raises(ValueError, match=r"grounding score must be a finite number"):
        book.observe_grounding("qwen", "2", bad)
    assert book.summary() == {}  # a rejected value records nothing, not even the version


def test_rounding_overshoot_is_clamped() -> None:
    book = QualityBook()
    book.observe_relevance("minilm", "1", 1.0000000002)
    book.observe_feedback("qwen", "2", -1.0000000002)
    emb, gen = book.version("minilm", "1"), book.version("qwen", "2")
    assert emb is not None and emb["relevance_mean"] == 1.0
    assert gen is not None and gen["feedback_mean"] == -1.0


def test_summary_shape_and_order() -> None:
    book = QualityBook()
    book.observe(_r(model="qwen", version="2"))
    book.observe(_r(model="qwen", version="1"))
    book.observe(_r(model="llama", version="3"))
    book.observe_relevance("minilm", "1", 0.5)
    s = book.summary()
    assert list(s) == ["llama", "minilm", "qwen"]
    assert list(s["qwen"]) == ["1", "2"]
    assert set(s["qwen"]["2"]) == {
        "responses",
        "error_rate",
        "refusal_rate",
        "filtered_rate",
        "mean_output_tokens",
        "finish_reasons",
        "relevance_mean",
        "relevance_count",
        "grounding_mean",
        "grounding_count",
        "feedback_count",
        "feedback_mean",
        "feedback_negative_rate",
    }
    assert s["qwen"]["2"] == book.version("qwen", "2")
    assert book.version("qwen", "9") is None


def test_forget() -> None:
    book = QualityBook()
    book.observe(_r(version="1"))
    book.observe(_r(version="2"))
    book.forget("qwen", "1")
    assert book.version("qwen", "1") is None
    assert list(book.summary()["qwen"]) == ["2"]
    book.forget("qwen", "1")  # unknown: nothing happens
    book.forget("qwen", "2")
    assert book.summary() == {}
    book.observe(_r(version="2"))
    v = book.version("qwen", "2")
    assert v is not None and v["responses"] == 1  # starts afresh
