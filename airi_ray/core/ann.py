"""The in-memory index's rules: when it may answer, when to rebuild it, how to rerank.

The in-memory index (``airi_ray.data.ann``) is a cache of one LanceDB table at one table
version. LanceDB stays the source of truth: every write, compaction or index build there
makes a new version, and a cache of an older version may miss rows written since or return
rows deleted since. So the rules, kept here free of I/O and clocks:

- a query is answered from the cache only when the cache was built from the version the
  table has now, and the query has no metadata filter; otherwise it goes to LanceDB (exact
  for unindexed rows, its own ANN index otherwise): slower, never stale;
- a rebuild starts when the cache is behind the table, the table is big enough to be worth
  an index, no rebuild of that table is running (one at a time), and the last failed one
  is not too recent (a table dropped or broken is not read again in a loop).

The cache scans compressed codes (product quantisation) for candidates and reranks them by
exact cosine from the stored vectors; how many candidates, how many codes per vector and
the rerank itself are here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "AnnView",
    "candidates",
    "code_count",
    "rerank",
    "should_rebuild",
    "use_index",
]


@dataclass(frozen=True)
class AnnView:
    """What a table's cache holds right now.

    Attributes:
        index_version: the table version the served index was built from (None: none yet).
        building_version: the version a running rebuild reads (None: no rebuild running).
        failed_at: when the last rebuild failed (None: it did not, or one succeeded since).
    """

    index_version: int | None = None
    building_version: int | None = None
    failed_at: float | None = None


def use_index(view: AnnView, table_version: int, *, filtered: bool) -> bool:
    """Whether a query at ``table_version`` may be answered from the cache."""
    return not filtered and view.index_version is not None and view.index_version == table_version


def should_rebuild(
    view: AnnView,
    table_version: int,
    rows: int,
    *,
    min_rows: int,
    now: float,
    retry_s: float,
) -> bool:
    """Whether to start rebuilding the cache from ``table_version`` now.

    Args:
        view: the cache's state.
        table_version: the table's current version.
        rows: the table's row count at that version.
        min_rows: fewer rows than this are searched by LanceDB alone.
        now: the current time (seconds, any monotonic origin the caller keeps).
        retry_s: how long after a failed rebuild the next one may start.
    """
    if view.index_version == table_version or view.building_version is not None:
        return False
    if rows < min_rows:
        return False
    return view.failed_at is None or now - view.failed_at >= retry_s


def code_count(dim: int, dims_per_code: int) -> int:
    """How many product-quantisation codes a ``dim``-vector gets: the fewest that divide
    ``dim`` into equal slices of at most ``dims_per_code`` dimensions.

    Raises:
        ValueError: ``dim`` or ``dims_per_code`` is below 1.
    """
    if dim < 1 or dims_per_code < 1:
        raise ValueError(f"dim and dims_per_code must be at least 1; got {dim}, {dims_per_code}")
    return next(m for m in range(math.ceil(dim / dims_per_code), dim + 1) if dim % m == 0)


def candidates(limit: int, rows: int, *, per_hit: int, floor: int) -> int | None:
    """How many rows the compressed scan passes to the exact rerank for a ``limit``-query
    over ``rows`` rows; None when an exact scan of every row is the cheaper way.

    The scan ranks by approximate scores, so the true top ``limit`` lies somewhere in its
    first few dozen times ``limit``: ``per_hit`` times ``limit``, at least ``floor`` (which
    costs nothing next to the scan). Reranking picks its rows at random places in memory,
    a few times slower per row than a sequential scan; from a quarter of the rows on, an
    exact scan of them all costs about as much and is exact.
    """
    wanted = max(limit * per_hit, floor)
    return None if 4 * wanted >= rows else wanted


def rerank(
    rows: npt.NDArray[np.int64],
    dots: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    query_norm: float,
    limit: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The ``limit`` candidates most similar to the query by exact cosine, best first.

    Args:
        rows: the candidates' row numbers.
        dots: each candidate's exact dot product with the query.
        norms: each candidate's norm.
        query_norm: the query's norm.
        limit: how many to return (fewer when there are fewer candidates).

    Returns:
        ``(rows, scores)``; a zero vector scores 0; ties keep the candidates' order.
    """
    scale = norms * query_norm
    scores: npt.NDArray[np.float32] = np.divide(
        dots, scale, out=np.zeros_like(dots), where=scale > 0
    )
    if len(rows) > limit:
        top = np.argpartition(-scores, limit - 1)[:limit]
        top.sort()  # back in candidate order, so that the stable sort keeps ties in it
        rows, scores = rows[top], scores[top]
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]
