"""Quality signals of model responses, aggregated per (model, version).

Drift (``drift.py``) says that traffic changed; these signals say how well a deployed
version answers it, so two versions of a model can be compared side by side:

- per response: whether the call failed, whether the model refused (``is_refusal``),
  whether a policy filter blocked or redacted something, the output length and the
  finish reason;
- retrieval relevance: the best similarity between a query and the chunks retrieved for
  it, credited to the *embedding* model version that embedded the query;
- grounding (``grounding``): how close an answer's embedding stays to the chunks it cites,
  credited to the *generator* version that wrote the answer;
- user feedback in [-1, 1] (thumbs down -1, thumbs up +1).

``QualityBook`` keeps, per (model, version) and per signal, the last ``window``
observations in a ring buffer with running sums, so an observation costs O(1) and the
summary reflects recent behaviour; response and feedback counts are also kept for the
lifetime of the book. It is plain data: no clock, no I/O, not thread-safe.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Refusal openings. A heuristic: a refusal almost always says so in its first sentence,
# so each pattern must match at the very start of the answer (leading whitespace
# ignored), case-insensitively. "I cannot wait to help" and an answer that says "I can't"
# further on are not refusals; an opening such as "I'm sorry, but your order has shipped"
# is a false positive the heuristic accepts. Curly apostrophes are read as straight ones.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"I can(?:'t|not|\s+not) (?:help|assist|provide|comply|do that|fulfil|fulfill|support|"
    r"answer|share|create|generate|give|engage|participate)\b",
    r"I'm sorry,? but\b",
    r"I am sorry,? but\b",
    r"I apologi[sz]e,? but\b",
    r"Sorry,? (?:but )?I (?:can't|cannot|can not|won't|will not|am unable|'m unable|"
    r"am not able|'m not able)\b",
    r"Unfortunately,? I (?:can't|cannot|can not|won't|will not|am unable|'m unable|"
    r"am not able|'m not able)\b",
    r"I won't be able to\b",
    r"I will not be able to\b",
    r"I (?:won't|will not) (?:help|assist|provide|comply)\b",
    r"I'm (?:not able|unable) to\b",
    r"I am (?:not able|unable) to\b",
    r"I must (?:decline|refuse)\b",
    r"As an AI(?: language model)?\b",
)

# How much of the answer's start the patterns look at: every pattern is anchored at the
# start, so this only bounds the work on long answers.
REFUSAL_PREFIX_CHARS = 200

_REFUSAL_RE = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """Whether ``text`` opens with a refusal (one of ``REFUSAL_PATTERNS``).

    Only the first ``REFUSAL_PREFIX_CHARS`` characters after any leading whitespace are
    examined, and a pattern must match at their start: "Sorry, I can't do that" is a
    refusal, "Here is the plan. I can't promise it works" is not, nor is "I cannot wait to
    help". A heuristic, good for a rate over many answers, not for judging one.
    """
    head = text.lstrip()[:REFUSAL_PREFIX_CHARS].replace("\u2019", "'")
    return _REFUSAL_RE.match(head) is not None


def _as_vector(v: Sequence[float], name: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    x = np.asarray(v, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must hold finite numbers only (no NaN or infinity)")
    return x


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors, in [-1, 1]; 0.0 if either is all zeros (or empty).

    Raises:
        ValueError: the vectors differ in length, are not flat, or hold NaN or infinity.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"vectors must have the same dimension, got {x.shape[0]} and {y.shape[0]}")
    norm = float(np.linalg.norm(x)) * float(np.linalg.norm(y))
    if norm == 0.0:
        return 0.0
    # Rounding can take the ratio a hair past 1 for parallel vectors.
    return min(1.0, max(-1.0, float(np.dot(x, y)) / norm))


def grounding(answer_vec: Sequence[float], cited_vecs: Sequence[Sequence[float]]) -> float | None:
    """How close an answer stays to its sources: the best cosine similarity between the
    answer's embedding and the embeddings of the chunks it cites.

    Higher means the answer stays close to (at least one of) its sources; a low score
    suggests it says things its citations do not. The best match, not the mean, because
    an answer usually draws on one or two of the chunks it cites.

    Returns:
        The score in [-1, 1], or None when nothing is cited.

    Raises:
        ValueError: a vector's dimension differs from the answer's, or holds NaN/infinity.
    """
    if len(cited_vecs) == 0:
        return None
    return max(cosine(answer_vec, v) for v in cited_vecs)


@dataclass(frozen=True)
class Response:
    """One model call's outcome.

    Attributes:
        model, version: the deployment that answered.
        output_tokens: tokens generated; None when the call failed.
        finish_reason: why generation stopped (``"stop"``, ``"length"``, ``"abort"``...),
            None when unknown or the call failed.
        error: an error code or name when the call failed, else None.
        refused: the model's answer is a refusal (see ``is_refusal``).
        filtered: a policy filter blocked or redacted something in the call.

    Raises:
        ValueError: ``output_tokens`` is negative.
    """

    model: str
    version: str
    output_tokens: int | None
    finish_reason: str | None
    error: str | None
    refused: bool = False
    filtered: bool = False

    def __post_init__(self) -> None:
        if self.output_tokens is not None and self.output_tokens < 0:
            raise ValueError(
                f"output_tokens must be a count >= 0 or None, got {self.output_tokens}"
            )


class _Window:
    """The last ``size`` numbers, with their running sum and count of negatives.

    The float sum is recomputed exactly once per ``size`` evictions, so rounding errors
    from adding and subtracting do not build up; that keeps the cost O(1) amortised.
    """

    __slots__ = ("values", "total", "negatives", "_evictions")

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.total = 0.0
        self.negatives = 0
        self._evictions = 0

    def push(self, x: float) -> None:
        values = self.values
        if len(values) == values.maxlen:
            old = values[0]
            self.total -= old
            self.negatives -= old < 0
            self._evictions += 1
        values.append(x)
        self.total += x
        self.negatives += x < 0
        if self._evictions >= len(values):
            self.total = math.fsum(values)
            self._evictions = 0

    def __len__(self) -> int:
        return len(self.values)

    def mean(self) -> float | None:
        return self.total / len(self.values) if self.values else None


# One response as kept in the window: error, refused, filtered, output tokens, finish reason.
_Obs = tuple[bool, bool, bool, int | None, str | None]


class _Stats:
    """The signals of one (model, version)."""

    __slots__ = (
        "responses",
        "window",
        "errors",
        "refusals",
        "filtered",
        "tokens_sum",
        "tokens_count",
        "finish",
        "relevance",
        "grounding",
        "feedback",
        "feedback_total",
    )

    def __init__(self, size: int) -> None:
        self.responses = 0  # lifetime
        self.window: deque[_Obs] = deque(maxlen=size)
        self.errors = 0
        self.refusals = 0
        self.filtered = 0
        self.tokens_sum = 0
        self.tokens_count = 0
        self.finish: dict[str, int] = {}
        self.relevance = _Window(size)
        self.grounding = _Window(size)
        self.feedback = _Window(size)
        self.feedback_total = 0  # lifetime

    def _count(self, obs: _Obs, sign: int) -> None:
        error, refused, filtered, tokens, reason = obs
        self.errors += sign * error
        self.refusals += sign * refused
        self.filtered += sign * filtered
        if tokens is not None:
            self.tokens_sum += sign * tokens
            self.tokens_count += sign
        if reason is not None:
            n = self.finish.get(reason, 0) + sign
            if n:
                self.finish[reason] = n
            else:
                del self.finish[reason]

    def add(self, obs: _Obs) -> None:
        if len(self.window) == self.window.maxlen:
            self._count(self.window[0], -1)
        self.window.append(obs)
        self._count(obs, +1)
        self.responses += 1

    def summary(self) -> dict[str, Any]:
        n = len(self.window)
        feedback = self.feedback
        return {
            "responses": self.responses,
            "error_rate": self.errors / n if n else 0.0,
            "refusal_rate": self.refusals / n if n else 0.0,
            "filtered_rate": self.filtered / n if n else 0.0,
            "mean_output_tokens": (
                self.tokens_sum / self.tokens_count if self.tokens_count else None
            ),
            "finish_reasons": dict(sorted(self.finish.items())),
            "relevance_mean": self.relevance.mean(),
            "relevance_count": len(self.relevance),
            "grounding_mean": self.grounding.mean(),
            "grounding_count": len(self.grounding),
            "feedback_count": self.feedback_total,
            "feedback_mean": feedback.mean(),
            "feedback_negative_rate": feedback.negatives / len(feedback) if feedback else None,
        }


# A similarity computed elsewhere (a dot product of unit vectors) may overshoot [-1, 1] by
# a rounding error; such a value is clamped rather than refused.
_SCORE_SLACK = 1e-6


def _check_score(value: float, what: str) -> float:
    x = float(value)
    if not math.isfinite(x) or not -1.0 - _SCORE_SLACK <= x <= 1.0 + _SCORE_SLACK:
        raise ValueError(f"{what} must be a finite number within [-1, 1], got {value!r}")
    return min(1.0, max(-1.0, x))


class QualityBook:
    """Quality signals per (model, version) over a sliding count window of the last
    ``window`` observations per signal, plus lifetime counts.

    Each signal has its own window: the last ``window`` responses give the error, refusal
    and filtered rates, the mean output length and the finish reasons; the last ``window``
    relevance, grounding and feedback scores give their means. Rates are shares of all the
    responses in the window, failed calls included (so a burst of errors lowers the
    refusal rate: read the two together).

    Raises:
        ValueError: ``window`` is less than 1.
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._stats: dict[tuple[str, str], _Stats] = {}

    def _get(self, model: str, version: str) -> _Stats:
        key = (model, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = _Stats(self.window)
        return stats

    def observe(self, r: Response) -> None:
        """Record one model call's outcome under its (model, version)."""
        obs: _Obs = (r.error is not None, r.refused, r.filtered, r.output_tokens, r.finish_reason)
        self._get(r.model, r.version).add(obs)

    def observe_relevance(self, model: str, version: str, best_similarity: float) -> None:
        """Record a retrieval's relevance: the best similarity between the query and the
        chunks retrieved for it, credited to the embedding model version that embedded
        the query.

        Raises:
            ValueError: ``best_similarity`` is not a finite number within [-1, 1] (a rounding
                error of up to 1e-6 beyond it is clamped).
        """
        x = _check_score(best_similarity, "best_similarity")
        self._get(model, version).relevance.push(x)

    def observe_grounding(self, model: str, version: str, score: float) -> None:
        """Record an answer's grounding score (see ``grounding``), credited to the
        generator version that wrote the answer.

        Raises:
            ValueError: ``score`` is not a finite number within [-1, 1] (a rounding
                error of up to 1e-6 beyond it is clamped).
        """
        x = _check_score(score, "grounding score")
        self._get(model, version).grounding.push(x)

    def observe_feedback(self, model: str, version: str, score: float) -> None:
        """Record user feedback on an answer: -1 thumbs down, +1 thumbs up, or any value
        between (a rating rescaled to [-1, 1]). Below 0 counts as negative.

        Raises:
            ValueError: ``score`` is not a finite number within [-1, 1] (a rounding
                error of up to 1e-6 beyond it is clamped).
        """
        x = _check_score(score, "feedback score")
        stats = self._get(model, version)
        stats.feedback.push(x)
        stats.feedback_total += 1

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every (model, version) seen, as ``{model: {version: entry}}``, sorted by name.

        An entry holds:

        - ``responses``: responses observed since the start (or the last ``forget``);
        - ``error_rate``, ``refusal_rate``, ``filtered_rate``: shares of the responses in
          the window, 0.0 when there are none;
        - ``mean_output_tokens``: over the window's responses that reported a length,
          None if none did;
        - ``finish_reasons``: ``{reason: count}`` over the window (responses without a
          finish reason are not counted);
        - ``relevance_mean``, ``grounding_mean``, ``feedback_mean``: means over their
          windows, None when empty; ``relevance_count``, ``grounding_count``: the number
          of values in those windows;
        - ``feedback_count``: feedback observed since the start;
        - ``feedback_negative_rate``: share of the feedback window below 0, None if empty.
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for model, version in sorted(self._stats):
            out.setdefault(model, {})[version] = self._stats[(model, version)].summary()
        return out

    def version(self, model: str, version: str) -> dict[str, Any] | None:
        """One entry of ``summary``, None if this (model, version) was never observed."""
        stats = self._stats.get((model, version))
        return stats.summary() if stats is not None else None

    def forget(self, model: str, version: str) -> None:
        """Drop everything about a (model, version), e.g. once it is undeployed; nothing
        happens if it was never observed."""
        self._stats.pop((model, version), None)
