"""When a query may use a collection's in-memory ANN index, and when to rebuild it.

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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AnnView", "should_rebuild", "use_index"]


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
