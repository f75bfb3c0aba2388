"""Prompt-injection heuristic and the pure part of the semantic filter.

``InjectionHeuristic`` scores lowercased text (user messages or retrieved documents) by
the distinct families of injection phrasing it contains: each family has a weight, the
score is the sum, and the caller blocks at a threshold (1.0 by default: "ignore all
previous instructions" alone, or "you are now" plus a role-play marker). One family never
counts twice, so a long document that quotes "system prompt" ten times scores 0.5.

Every pattern starts with a literal word, so the regex engine skips to candidates with a
fast substring search: about 3 us per pattern on 8,000 characters.

``SemanticFilter`` compares a text's embedding with the embeddings of configured examples
(cosine similarity); computing embeddings is the runtime's job, not the core's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airi_ray.core.policy.audit import Finding
from airi_ray.core.policy.errors import ContentBlocked

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

_DET = r"(?:all|any|each|every|of|the|your|my|these|those|its|such|prior|previous)"
_QUAL = (
    r"(?:previous|prior|above|earlier|preceding|foregoing|initial|original|system|developer|"
    r"safety|hidden|current|existing)"
)
_NOUN = (
    r"(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|policies|"
    r"restrictions|constraints|commands|context|messages)"
)
# "ignore the rules" is ordinary English; "ignore all previous rules" or "ignore your
# instructions" is not: generic nouns need a qualifier, "instructions"/"prompt" do not.
_OBJECT = (
    rf"\s+(?:{_DET}\s+){{0,3}}(?:(?:{_QUAL}\s+){{1,2}}{_NOUN}|"
    r"(?:instructions?|prompts?|guardrails|directives)\b)"
)

# (family, weight, patterns); every pattern starts with a literal, on lowercased text.
INJECTION_PATTERNS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    (
        "ignore_instructions",
        1.0,
        tuple(v + _OBJECT for v in ("ignore", "disregard", "forget", "override", "bypass")),
    ),
    (
        "role_override",
        0.6,
        (
            r"you\s+are\s+(?:now|no\s+longer)\b",
            r"from\s+now\s+on,?\s+you\b",
            r"new\s+instructions?\s*:",
        ),
    ),
    (
        "system_prompt",
        0.5,
        (
            r"system\s+prompt",
            r"reveal\s+(?:your|the)\s+(?:hidden\s+|secret\s+|initial\s+)?(?:prompt|instructions)",
        ),
    ),
    (
        "jailbreak",
        0.6,
        (
            r"jailbr(?:ea|o)k",
            r"without\s+any\s+(?:restrictions|filters|limitations|censorship)",
        ),
    ),
    (
        "mode_switch",
        0.6,
        (r"developer\s+mode", r"dan\s+mode", r"god\s+mode", r"unrestricted\s+mode"),
    ),
    ("do_anything_now", 0.8, (r"do\s+anything\s+now",)),
    (
        "role_play",
        0.4,
        (
            r"pretend\s+(?:you\s+are|you're|to\s+be)\b",
            r"act\s+as\s+(?:if\b|an?\b|my\b)",
            r"role[\s-]?play",
        ),
    ),
    (
        "prompt_markup",
        0.7,
        (
            r"<(?:\|(?:im_start|system|im_end)\||/?system>|<sys>>)",
            r"\[/?inst\]",
            r"###\s*(?:system|instruction)",
        ),
    ),
)

INJECTION_THRESHOLD = 1.0


@dataclass(frozen=True, slots=True)
class InjectionScore:
    """A heuristic's verdict: the score, the families that matched, and where (spans)."""

    score: float
    families: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


class InjectionHeuristic:
    """Scores text for prompt-injection phrasing (see the module docstring)."""

    def __init__(
        self,
        patterns: Sequence[tuple[str, float, Sequence[str]]] = INJECTION_PATTERNS,
    ) -> None:
        self._patterns = [
            (family, weight, re.compile(p)) for family, weight, ps in patterns for p in ps
        ]

    def score(self, low: str, *, spans: bool = False) -> InjectionScore:
        """Score lowercased text; with ``spans``, also list every match (for redaction)."""
        families: dict[str, float] = {}
        found: list[tuple[int, int]] = []
        for family, weight, rx in self._patterns:
            if family in families and not spans:
                continue
            if spans:
                hits = [m.span() for m in rx.finditer(low)]
                if hits:
                    families[family] = weight
                    found.extend(hits)
            elif rx.search(low) is not None:
                families[family] = weight
        return InjectionScore(sum(families.values()), tuple(families), tuple(sorted(found)))


# Windows short enough for small embedders (MiniLM reads 256 tokens); a long text is
# checked window by window, up to SEMANTIC_MAX_CHARS of it.
SEMANTIC_WINDOW_CHARS = 800  # about 200 tokens of English
SEMANTIC_MAX_CHARS = 8 * SEMANTIC_WINDOW_CHARS


def semantic_windows(
    texts: Sequence[str],
    window_chars: int = SEMANTIC_WINDOW_CHARS,
    max_chars: int = SEMANTIC_MAX_CHARS,
) -> list[str]:
    """The pieces of ``texts`` the semantic filter embeds: each text cut into windows of
    ``window_chars``, its first ``max_chars`` only, in order; empty texts give none."""
    return [
        t[i : i + window_chars]
        for t in texts
        for i in range(0, min(len(t), max_chars), window_chars)
    ]


class SemanticFilter:
    """Blocks text whose embedding is close to one of the configured example embeddings.

    Args:
        examples: one vector per example (all of the same dimension, none all-zero), from
            the same embedding model that will embed the checked text.
        threshold: cosine similarity at or above which a text matches, in (0, 1].
        labels: optional names of the examples, reported in ``match`` (never the text).
        action: ``"block"`` raises ContentBlocked from ``check``; ``"flag"`` returns a finding.
        status: 400 or 403, the status of the ContentBlocked.

    Raises:
        ValueError: no examples, ragged or zero vectors, or a threshold outside (0, 1].
    """

    def __init__(
        self,
        examples: Sequence[Sequence[float]] | Any,
        threshold: float,
        labels: Sequence[str] = (),
        *,
        action: str = "block",
        status: int = 400,
    ) -> None:
        import numpy as np  # lazily: only a configured semantic filter pays for numpy

        if not 0 < threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in (0, 1], got {threshold}")
        try:
            m = np.asarray(examples, dtype=np.float32)
        except ValueError as e:
            raise ValueError(f"examples must be vectors of one dimension: {e}") from None
        if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
            raise ValueError(f"examples must be a non-empty list of vectors, got shape {m.shape}")
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        if not np.all(np.isfinite(m)) or np.any(norms == 0):
            raise ValueError("example vectors must be finite and not all zero")
        if action not in ("block", "flag"):
            raise ValueError(f"a semantic filter blocks or flags, not {action!r}")
        if status not in (400, 403):
            raise ValueError(f"a blocked request answers 400 or 403, not {status}")
        if labels and len(labels) != m.shape[0]:
            raise ValueError(f"{len(labels)} labels for {m.shape[0]} examples")
        self._np = np
        self._m: npt.NDArray[np.float32] = m / norms
        self.threshold = float(threshold)
        self.labels = tuple(labels) or tuple(f"example-{i}" for i in range(m.shape[0]))
        self.dim = int(m.shape[1])
        self.action = action
        self.status = status

    def similarity(self, vector: Sequence[float] | Any) -> tuple[float, int]:
        """The highest cosine similarity to an example, and that example's index.

        A zero vector is similar to nothing (0.0, -1).

        Raises:
            ValueError: the vector's dimension is not the examples'.
        """
        np = self._np
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"vector of dimension {v.shape[0]}, the examples have {self.dim}")
        norm = float(np.linalg.norm(v))
        if not norm > 0 or not np.isfinite(norm):
            return 0.0, -1
        sims = self._m @ (v / norm)
        i = int(np.argmax(sims))
        return float(sims[i]), i

    def match(self, vector: Sequence[float] | Any) -> str | None:
        """The label of the closest example if it is at or above the threshold, else None."""
        sim, i = self.similarity(vector)
        return self.labels[i] if i >= 0 and sim >= self.threshold else None

    def check(self, vector: Sequence[float] | Any, *, where: str = "prompt") -> Finding | None:
        """Apply the filter to a text's embedding: a finding when flagged, None when clear.

        Raises:
            ContentBlocked: the text is close to an example and the action is ``"block"``.
            ValueError: the vector's dimension is not the examples'.
        """
        label = self.match(vector)
        if label is None:
            return None
        if self.action == "block":
            raise ContentBlocked(
                f"the {where} was blocked by the semantic filter: it is too close to the "
                f"blocked example {label!r}",
                rule="semantic",
                status=self.status,
            )
        return Finding("semantic", "flag", 1)
