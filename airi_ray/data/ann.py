"""An in-memory HNSW index of one LanceDB chunk table, kept in step with its version.

LanceDB's own indexes (IVF_PQ, IVF_SQ, IVF_HNSW_SQ) reach recall@10 0.98 on 100k 384-dim
vectors only at about the cost of an exact scan (``benchmarks/retrieval.py``), and a
LanceDB query spends 4-5 ms outside the scan itself (planning, a random read per column
and hit). So queries without a metadata filter are answered here, from a snapshot of the
table held in memory:

- one snapshot per table, built from one table version (read through a handle pinned to
  it) and served only while the table is still at that version (``airi_ray.core.ann``):
  a write, delete or compaction sends queries back to LanceDB until the next snapshot is
  swapped in. Never a stale answer; LanceDB stays the source of truth.
- one HNSW graph per tenant, not one graph with a tenant filter: a tenant's query walks a
  graph of its own rows only, so it can neither see another tenant's rows nor lose recall
  when its rows are a small part of the table (a filtered walk skips most of what it
  visits). A tenant with fewer than ``graph_min_rows`` rows is scanned exactly, which is
  faster than a graph walk at that size.
- the graph's candidates are reranked by exact cosine from the stored vectors, which the
  snapshot keeps with the chunk id, text and metadata, so a query reads nothing from disk.
- rebuilds run in a background thread, one at a time per table, and are swapped in by one
  reference assignment; queries meanwhile use the old snapshot (if still current) or
  LanceDB. hnswlib releases the GIL while it builds and searches.

Library: hnswlib over faiss-cpu's ``IndexHNSWFlat``, both measured by
``benchmarks/retrieval.py`` on its 100k x 384 vectors with M 32 and ef_construction 200
(``ann_libraries`` in its JSON). On clustered vectors, where HNSW helps, both reach recall
1.0 from ef 64, and hnswlib answers faster at every ef (0.37 vs 0.52 ms at ef 64) and builds
faster (293 vs 328 s on 2 threads of a loaded machine). On uniform random vectors faiss
finds more per ef, but both reach 0.96-0.98 only at about the cost of an exact scan: an HNSW
graph cannot help data without neighbourhood structure. hnswlib also takes its thread count
per call, where faiss uses the calling thread's OpenMP setting.
The memory cost: the vectors are held twice (the graph's copy, normalised, and the stored
ones for the rerank), about 2 x 150 MB at 100k x 384.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import hnswlib
import numpy as np
import pyarrow as pa

from airi_ray.core.ann import AnnView, should_rebuild, use_index

__all__ = ["AnnSpec", "Found", "Snapshot", "TableAnn", "VersionWatch", "build_snapshot"]

logger = logging.getLogger(__name__)

_COLUMNS = ["tenant", "id", "text", "metadata", "vector"]
QUIET_S = 1.0  # a versions directory untouched this long has no commit in flight


class VersionWatch:
    """A table's latest version, at the cost of one ``stat`` while the table is quiet.

    Asking LanceDB costs a hop to its event loop and a look at the store (0.25 ms on an
    idle machine, 1-2 ms on a loaded one): most of a query answered from memory. On a local
    file system every commit adds a manifest to the table's ``_versions`` directory, which
    changes the directory's mtime. So the version LanceDB gave is kept with the mtime seen
    just before asking, and reused while the mtime is unchanged, but only if the directory
    had been quiet for ``QUIET_S`` when it was kept: a commit later than that gets a later
    mtime even on a file system with coarse timestamps. Object stores (and any error) ask
    LanceDB every time.

    Args:
        uri: the table's URI (``table.uri``).
        wall_clock: seconds since the epoch, as mtimes are.
    """

    def __init__(self, uri: str, wall_clock: Callable[[], float] = time.time) -> None:
        local = uri.removeprefix("file://") if "://" not in uri.removeprefix("file://") else None
        self._dir = os.path.join(local, "_versions") if local else None
        self._clock = wall_clock
        self._kept: tuple[int, int] | None = None  # (mtime_ns, version)

    def version(self, table: Any) -> int:
        if self._dir is None:
            return int(table.version)
        try:
            mtime = os.stat(self._dir).st_mtime_ns
        except OSError:
            self._kept = None
            return int(table.version)
        kept = self._kept
        if kept is not None and kept[0] == mtime:
            return kept[1]
        version = int(table.version)
        quiet = self._clock() - mtime / 1e9 >= QUIET_S
        self._kept = (mtime, version) if quiet else None
        return version


@dataclass(frozen=True)
class AnnSpec:
    """How the in-memory HNSW graphs are built and searched.

    Attributes:
        m: graph degree (hnswlib's ``M``); higher reaches more recall per hop on
            high-dimensional data, at more memory and build time.
        ef_construction: search breadth while inserting.
        ef: search breadth per query (at least the ``k`` asked for).
        graph_min_rows: a tenant with fewer rows is scanned exactly instead.
        build_threads: threads one rebuild uses (queries keep the other cores).
        retry_s: how long after a failed rebuild the next one may start.
    """

    m: int = 32
    ef_construction: int = 200
    ef: int = 128
    graph_min_rows: int = 2_000
    build_threads: int = 1
    retry_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.m, self.ef_construction, self.ef, self.graph_min_rows, self.build_threads) < 1:
            raise ValueError(
                "m, ef_construction, ef, graph_min_rows and build_threads must be at least 1; "
                f"got {self}"
            )


@dataclass(frozen=True)
class Found:
    """The nearest rows of one tenant, best first, with exact cosine similarities."""

    ids: list[str]
    texts: list[str]
    metadata: list[str]  # JSON, as stored
    vectors: np.ndarray  # (n, dim), as stored
    scores: np.ndarray


class _Tenant:
    """One tenant's rows of a snapshot and, above ``graph_min_rows``, its HNSW graph."""

    def __init__(self, table: pa.Table, rows: np.ndarray, spec: AnnSpec) -> None:
        part = table.take(pa.array(rows))
        self.ids: list[str] = part.column("id").to_pylist()
        self.texts: list[str] = part.column("text").to_pylist()
        self.metadata: list[str] = part.column("metadata").to_pylist()
        self.vectors = _vectors(part)
        self.norms = np.linalg.norm(self.vectors, axis=1)
        self.graph: hnswlib.Index | None = None
        started = time.perf_counter()
        if len(rows) >= spec.graph_min_rows:
            graph = hnswlib.Index(space="cosine", dim=self.vectors.shape[1])
            graph.init_index(max_elements=len(rows), ef_construction=spec.ef_construction, M=spec.m)
            graph.add_items(self.vectors, np.arange(len(rows)), num_threads=spec.build_threads)
            graph.set_ef(spec.ef)
            self.graph = graph
        self.build_s = time.perf_counter() - started

    def search(self, query: np.ndarray, limit: int) -> Found:
        n = len(self.ids)
        limit = min(limit, n)
        if self.graph is not None and limit < n:
            # The graph's ef is fixed at build time (set_ef is not safe beside a running
            # query); a larger k widens the search to k itself.
            labels, _ = self.graph.knn_query(query, k=limit, num_threads=1)
            candidates = labels[0].astype(np.int64)
        else:
            candidates = np.arange(n)
        vectors = self.vectors[candidates]
        scores = _cosine(vectors, self.norms[candidates], query)
        if len(candidates) > limit:
            top = np.argpartition(-scores, limit - 1)[:limit]
            candidates, vectors, scores = candidates[top], vectors[top], scores[top]
        order = np.argsort(-scores, kind="stable")
        rows = candidates[order]
        return Found(
            [self.ids[i] for i in rows],
            [self.texts[i] for i in rows],
            [self.metadata[i] for i in rows],
            vectors[order],
            scores[order],
        )


@dataclass(frozen=True)
class Snapshot:
    """A table's rows at one version, by tenant."""

    version: int
    tenants: dict[str, _Tenant]
    dim: int

    def search(self, tenant: str, query: np.ndarray, limit: int) -> Found:
        """The tenant's ``limit`` rows nearest to ``query`` (none if it has no rows)."""
        rows = self.tenants.get(tenant)
        if rows is None:
            empty = np.zeros(0, dtype=np.float32)
            return Found([], [], [], np.zeros((0, self.dim), dtype=np.float32), empty)
        return rows.search(query, limit)


def build_snapshot(table: Any, version: int, dim: int, spec: AnnSpec) -> Snapshot:
    """Read ``table`` (a LanceDB table pinned to ``version``) and build its graphs."""
    data = table.search().select(_COLUMNS).limit(None).to_arrow()
    tenants = np.asarray(data.column("tenant").to_pylist(), dtype=object)
    names, inverse = np.unique(tenants, return_inverse=True) if len(tenants) else ([], [])
    by_tenant = {
        str(name): _Tenant(data, np.flatnonzero(inverse == i), spec) for i, name in enumerate(names)
    }
    return Snapshot(version, by_tenant, dim)


class TableAnn:
    """The snapshot of one table, and the background thread that rebuilds it.

    Args:
        name: the table's name (for logs).
        open_at: opens a private handle of the table pinned to a version.
        dim: the vector dimension.
        spec: graph settings.
        min_rows: a table with fewer rows gets no snapshot (LanceDB alone serves it).
        clock: monotonic seconds, for the retry delay after a failed rebuild.
    """

    def __init__(
        self,
        name: str,
        open_at: Callable[[int], Any],
        dim: int,
        spec: AnnSpec,
        min_rows: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._open_at = open_at
        self._dim = dim
        self._spec = spec
        self._min_rows = min_rows
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._view = AnnView()
        self._thread: threading.Thread | None = None
        self._watch: VersionWatch | None = None

    def watch(self, table: Any) -> VersionWatch:
        """The table's version watch (made on first use, from the table's URI)."""
        if self._watch is None:
            self._watch = VersionWatch(table.uri)
        return self._watch

    def view(self) -> AnnView:
        return self._view

    def search(
        self, version: int, tenant: str, query: np.ndarray, limit: int, *, filtered: bool
    ) -> Found | None:
        """The answer at ``version``, or None when the snapshot cannot give it."""
        snapshot = self._snapshot  # one read: a concurrent swap gives this or the next one
        view = AnnView(index_version=None if snapshot is None else snapshot.version)
        if snapshot is None or not use_index(view, version, filtered=filtered):
            return None
        return snapshot.search(tenant, query, limit)

    def refresh(self, version: int, rows: int) -> bool:
        """Start a background rebuild from ``version`` if one is due; returns whether."""
        with self._lock:
            due = should_rebuild(
                self._view,
                version,
                rows,
                min_rows=self._min_rows,
                now=self._clock(),
                retry_s=self._spec.retry_s,
            )
            if not due:
                return False
            self._view = replace(self._view, building_version=version)
            self._thread = threading.Thread(
                target=self._build, args=(version,), name=f"ann-{self.name}", daemon=True
            )
            self._thread.start()
        return True

    def set_ef(self, ef: int) -> None:
        """Change the search breadth of the served graphs (benchmarks: hnswlib's ``ef`` is
        read by running queries, so change it only while none runs)."""
        snapshot = self._snapshot
        for rows in snapshot.tenants.values() if snapshot is not None else ():
            if rows.graph is not None:
                rows.graph.set_ef(ef)

    def graph_build_s(self) -> float:
        """Seconds the served snapshot spent building graphs (reading the table excluded)."""
        snapshot = self._snapshot
        return sum(t.build_s for t in snapshot.tenants.values()) if snapshot else 0.0

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild; returns whether none is running now."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._view.building_version is None

    def _build(self, version: int) -> None:
        started = time.perf_counter()
        try:
            snapshot = build_snapshot(self._open_at(version), version, self._dim, self._spec)
        except Exception:
            logger.warning(
                "rebuilding the in-memory index of %s at version %d failed; queries use "
                "LanceDB meanwhile",
                self.name,
                version,
                exc_info=True,
            )
            with self._lock:
                self._view = replace(self._view, building_version=None, failed_at=self._clock())
            return
        with self._lock:
            self._snapshot = snapshot
            self._view = AnnView(index_version=version)
        logger.info(
            "in-memory index of %s at version %d: %d tenants in %.1f s",
            self.name,
            version,
            len(snapshot.tenants),
            time.perf_counter() - started,
        )


def _vectors(table: pa.Table) -> np.ndarray:
    column = table.column("vector")
    flat = (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).flatten()
    dim = column.type.list_size
    return np.ascontiguousarray(flat.to_numpy(zero_copy_only=False).reshape(len(table), dim))


def _cosine(vectors: np.ndarray, norms: np.ndarray, query: np.ndarray) -> np.ndarray:
    dots = vectors @ query
    scale = norms * float(np.linalg.norm(query))
    return np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)
