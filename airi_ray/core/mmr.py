"""Maximal marginal relevance: pick results that are relevant and not redundant.

Plain top-k retrieval often returns near-duplicate chunks (the same paragraph from two
versions of a page, or overlapping windows of one document), which waste context tokens.
MMR picks greedily: at each step the candidate maximising

    lambda * sim(query, c) - (1 - lambda) * max(sim(c, s) for s already picked)

where ``sim`` is cosine similarity. ``lambda = 1`` is plain top-k by relevance, ``lambda = 0``
pure diversity. Run it over a candidate pool a few times larger than ``k`` (the caller's
ANN search), so it has alternatives to choose from. Pure numpy: O(n * k) similarity updates
after one ``n x d`` matrix product.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


def _normalise(x: FloatArray) -> npt.NDArray[np.float64]:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    # A zero vector has no direction: it stays zero (similarity 0 to everything).
    out: npt.NDArray[np.float64] = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return out


def mmr_select(query: FloatArray, candidates: FloatArray, k: int, lambda_: float) -> list[int]:
    """Indexes into ``candidates`` of the ``k`` picks, in the order they were picked.

    Args:
        query: the query vector, shape ``(d,)``.
        candidates: candidate vectors, shape ``(n, d)``; fewer than ``k`` returns all of
            them, in MMR order.
        k: how many to pick (0 picks none).
        lambda_: relevance weight in ``[0, 1]``.

    Raises:
        ValueError: ``lambda_`` outside ``[0, 1]``, ``k`` negative, or shapes that do not
            match.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"mmr lambda must be in [0, 1], got {lambda_}")
    if k < 0:
        raise ValueError(f"k must not be negative, got {k}")
    q = np.asarray(query)
    c = np.asarray(candidates)
    if q.ndim != 1 or c.ndim != 2 or (c.shape[0] and c.shape[1] != q.shape[0]):
        raise ValueError(
            f"need a query of shape (d,) and candidates of shape (n, d); got {q.shape} "
            f"and {c.shape}"
        )
    n = c.shape[0]
    k = min(k, n)
    if k == 0:
        return []
    cn = _normalise(c)
    relevance = cn @ _normalise(q)
    # Highest similarity of each candidate to anything picked so far; -inf before the
    # first pick makes the first choice pure relevance whatever lambda is.
    redundancy = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    picked: list[int] = []
    for _ in range(k):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = lambda_ * relevance - (1.0 - lambda_) * penalty
        score[~available] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, cn @ cn[best])
    return picked
