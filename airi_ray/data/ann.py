"""An in-memory index of one LanceDB chunk table, kept in step with its version.

LanceDB's own indexes (IVF_PQ, IVF_SQ, IVF_HNSW_SQ) reach recall@10 0.98 on 100k 384-dim
vectors only at about the cost of an exact scan (``benchmarks/retrieval.py``), and a
LanceDB query spends 4-5 ms outside the scan itself (planning, a random read per column
and hit). So queries without a metadata filter are answered here, from a snapshot of the
table held in memory:

- one snapshot per table, built from one table version (read through a handle pinned to
  it) and served only while the table is still at that version (``airi_ray.core.ann``):
  a write, delete or compaction sends queries back to LanceDB until the next snapshot is
  swapped in. Never a stale answer; LanceDB stays the source of truth.
- per tenant, its rows' product-quantisation codes (faiss ``IndexPQFastScan``: one 4-bit
  code per 2 dimensions, 96 bytes for a 384-dim vector, a sixteenth of its float32 size),
  not one index with a tenant filter: a tenant's query scans its own rows only, so it can
  neither see another tenant's rows nor lose recall when its rows are a small part of the
  table. One codebook, trained on a sample of the table, serves every tenant. A tenant
  with fewer than ``codes_min_rows`` rows is scanned exactly, which is as fast at that size.
- the scan's best ``candidates_per_hit`` x k rows are reranked by exact cosine from the
  stored vectors, which the snapshot keeps with the chunk id, text and metadata, so a query
  reads nothing from disk.
- rebuilds run in a background thread, one at a time per table, and are swapped in by one
  reference assignment; queries meanwhile use the old snapshot (if still current) or
  LanceDB. faiss releases the GIL while it trains, encodes and scans; a rebuild of 100k x
  384 takes about 2 s on one thread (1.1 s training the codebook on 20k rows, 0.8 s
  encoding, 0.3 s reading the table).

Why a compressed scan and not a graph or partitions: uniform random 384-dim vectors (the
issue's workload) have no neighbourhood structure, so an HNSW graph must visit about as
many vectors as an exact scan to reach recall 0.98 (hnswlib, M 32: 0.96 at ef 2048, slower
than NumPy's scan, after 335 s of building), and an IVF index must probe nearly every
partition. A scan finds the neighbours at any structure; an exact float32 scan is bound by
memory bandwidth (1.5 KB a vector), and the codes cut that 16-fold, scanned from registers
with SIMD lookups (faiss's "fast scan"). ``benchmarks/retrieval.py`` compares it
(``approaches`` in its JSON) with an 8-bit scalar-quantised scan (faiss
``IndexScalarQuantizer``: 4x smaller than float32, but decoding each dimension makes it as
slow as NumPy's scan), sign-bit codes (48 bytes, Hamming distance: too coarse, the
neighbours hide among thousands) and an HNSW graph (hnswlib): on clustered vectors the
graph answers about 3x faster, but the codes meet the target there too, build several
times faster on half the threads and take a fraction of the memory, and they need no guess
at build time of how structured a collection's vectors are; so one kind serves them all.
The memory cost: the stored vectors (for the rerank) plus 1/16 of them in codes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from airi_ray.core.ann import AnnView, candidates, code_count, rerank, should_rebuild, use_index

__all__ = ["AnnSpec", "Found", "Snapshot", "TableAnn", "VersionWatch", "build_snapshot"]

logger = logging.getLogger(__name__)

_COLUMNS = ["tenant", "id", "text", "metadata", "vector"]
QUIET_S = 1.0  # a versions directory untouched this long has no commit in flight
_ENCODE_BATCH = 16_384  # rows normalised and encoded at a time (bounds the build's copy)


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
    """How the in-memory codes are built and searched.

    Attributes:
        dims_per_code: dimensions per 4-bit product-quantisation code (2: 96 bytes for a
            384-dim vector); more is a smaller, faster, coarser scan that needs more
            candidates for the same recall.
        candidates_per_hit: rows of the compressed scan reranked exactly per hit asked for.
        min_candidates: rows reranked at least, however few hits are asked for.
        codes_min_rows: a tenant with fewer rows is scanned exactly instead.
        train_rows: rows (a seeded sample of the table) the codebook is trained on.
        build_threads: threads one rebuild uses (queries keep the other cores).
        retry_s: how long after a failed rebuild the next one may start.
    """

    dims_per_code: int = 2
    candidates_per_hit: int = 40
    min_candidates: int = 200
    codes_min_rows: int = 2_000
    train_rows: int = 20_000
    build_threads: int = 1
    retry_s: float = 30.0

    def __post_init__(self) -> None:
        sizes = (
            self.dims_per_code,
            self.candidates_per_hit,
            self.min_candidates,
            self.codes_min_rows,
            self.build_threads,
        )
        if min(sizes) < 1:
            raise ValueError(
                "dims_per_code, candidates_per_hit, min_candidates, codes_min_rows and "
                f"build_threads must be at least 1; got {self}"
            )
        if min(self.codes_min_rows, self.train_rows) < 64:
            # The codebook's k-means (16 centroids per code) needs more points than that.
            raise ValueError(
                f"codes_min_rows and train_rows must be at least 64; got {self.codes_min_rows} "
                f"and {self.train_rows}"
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
    """One tenant's rows of a snapshot and, from ``codes_min_rows`` on, their codes."""

    def __init__(
        self, table: pa.Table, rows: np.ndarray, codebook: Any | None, spec: AnnSpec
    ) -> None:
        part = table.take(pa.array(rows))
        self.ids: list[str] = part.column("id").to_pylist()
        self.texts: list[str] = part.column("text").to_pylist()
        self.metadata: list[str] = part.column("metadata").to_pylist()
        self.vectors = _vectors(part)
        self.norms = np.linalg.norm(self.vectors, axis=1)
        self.codes: Any | None = None  # a faiss IndexPQFastScan
        started = time.perf_counter()
        if codebook is not None and len(rows) >= spec.codes_min_rows:
            codes = faiss.clone_index(codebook)  # trained, empty
            for start in range(0, len(rows), _ENCODE_BATCH):
                batch = slice(start, start + _ENCODE_BATCH)
                codes.add(_unit(self.vectors[batch], self.norms[batch]))
            self.codes = codes
        self.encode_s = time.perf_counter() - started

    def rerank(
        self, rows: np.ndarray, query: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``limit`` of candidate ``rows`` nearest ``query`` (a contiguous float32
        vector) by exact cosine from the stored vectors: ``(rows, scores)``, best first."""
        rows = np.ascontiguousarray(rows[rows >= 0], dtype=np.int64)  # -1: a scan's padding
        dots = _dots(self.vectors, rows, query)
        return rerank(rows, dots, self.norms[rows], float(np.linalg.norm(query)), limit)

    def search(self, query: np.ndarray, limit: int, spec: AnnSpec) -> Found:
        n = len(self.ids)
        limit = min(limit, n)
        wanted = None
        if self.codes is not None:
            wanted = candidates(
                limit, n, per_hit=spec.candidates_per_hit, floor=spec.min_candidates
            )
        query = np.ascontiguousarray(query, dtype=np.float32)
        if wanted is None:
            rows = np.arange(n)
            rows, scores = rerank(
                rows, self.vectors @ query, self.norms, float(np.linalg.norm(query)), limit
            )
        else:
            # OpenMP's thread count is per calling thread: one per query, so that
            # concurrent queries (and a rebuild) share the cores rather than oversubscribe.
            faiss.omp_set_num_threads(1)
            # Inner product of unit codes ranks as cosine does; the query's norm changes
            # no order, so it is passed as it is.
            rows, scores = self.rerank(self.codes.search(query[None], wanted)[1][0], query, limit)
        return Found(
            [self.ids[i] for i in rows],
            [self.texts[i] for i in rows],
            [self.metadata[i] for i in rows],
            self.vectors[rows],
            scores,
        )


@dataclass(frozen=True)
class Snapshot:
    """A table's rows at one version, by tenant.

    Attributes:
        train_s: seconds spent training the codebook.
        encode_s: seconds spent encoding every tenant's rows.
        build_s: seconds the whole build took, reading the table included.
    """

    version: int
    tenants: dict[str, _Tenant]
    dim: int
    train_s: float = 0.0
    encode_s: float = 0.0
    build_s: float = 0.0

    def search(self, tenant: str, query: np.ndarray, limit: int, spec: AnnSpec) -> Found:
        """The tenant's ``limit`` rows nearest to ``query`` (none if it has no rows)."""
        rows = self.tenants.get(tenant)
        if rows is None:
            empty = np.zeros(0, dtype=np.float32)
            return Found([], [], [], np.zeros((0, self.dim), dtype=np.float32), empty)
        return rows.search(query, limit, spec)


def build_snapshot(table: Any, version: int, dim: int, spec: AnnSpec) -> Snapshot:
    """Read ``table`` (a LanceDB table pinned to ``version``) and encode its tenants' rows."""
    started = time.perf_counter()
    faiss.omp_set_num_threads(spec.build_threads)  # this thread's, as for queries
    data = table.search().select(_COLUMNS).limit(None).to_arrow()
    tenants = np.asarray(data.column("tenant").to_pylist(), dtype=object)
    names, inverse = np.unique(tenants, return_inverse=True) if len(tenants) else ([], [])
    groups = {str(name): np.flatnonzero(inverse == i) for i, name in enumerate(names)}
    coded = [rows for rows in groups.values() if len(rows) >= spec.codes_min_rows]
    t0 = time.perf_counter()
    codebook = _train(data, np.concatenate(coded), dim, spec) if coded else None
    train_s = time.perf_counter() - t0
    by_tenant = {name: _Tenant(data, rows, codebook, spec) for name, rows in groups.items()}
    return Snapshot(
        version,
        by_tenant,
        dim,
        train_s=train_s,
        encode_s=sum(t.encode_s for t in by_tenant.values()),
        build_s=time.perf_counter() - started,
    )


def _train(data: pa.Table, rows: np.ndarray, dim: int, spec: AnnSpec) -> Any:
    """An empty ``IndexPQFastScan`` whose codebook is trained on a seeded sample of
    ``rows`` (the same rows give the same codebook)."""
    if len(rows) > spec.train_rows:
        rows = np.sort(np.random.default_rng(0).choice(rows, spec.train_rows, replace=False))
    sample = _vectors(data.take(pa.array(rows)))
    index = faiss.IndexPQFastScan(
        dim, code_count(dim, spec.dims_per_code), 4, faiss.METRIC_INNER_PRODUCT
    )
    index.train(_unit(sample, np.linalg.norm(sample, axis=1)))
    return index


class TableAnn:
    """The snapshot of one table, and the background thread that rebuilds it.

    Args:
        name: the table's name (for logs).
        open_at: opens a private handle of the table pinned to a version.
        dim: the vector dimension.
        spec: how the codes are built and searched.
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
        return snapshot.search(tenant, query, limit, self._spec)

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

    def tune(self, **changes: Any) -> None:
        """Change the query settings (benchmarks: ``candidates_per_hit``, ``min_candidates``);
        the build settings take effect from the next rebuild."""
        self._spec = replace(self._spec, **changes)

    def snapshot(self) -> Snapshot | None:
        """The snapshot served now (None: none yet)."""
        return self._snapshot

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
            "in-memory index of %s at version %d: %d tenants in %.1f s (codebook %.1f s, "
            "encoding %.1f s)",
            self.name,
            version,
            len(snapshot.tenants),
            time.perf_counter() - started,
            snapshot.train_s,
            snapshot.encode_s,
        )


def _vectors(table: pa.Table) -> np.ndarray:
    column = table.column("vector")
    flat = (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).flatten()
    dim = column.type.list_size
    return np.ascontiguousarray(flat.to_numpy(zero_copy_only=False).reshape(len(table), dim))


def _dots(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors[rows] @ query``, read in place: NumPy would copy the rows out first, which
    took half of a 400-row rerank (0.04 of 0.08 ms)."""
    out = np.empty(len(rows), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(query),
        faiss.swig_ptr(vectors),
        faiss.swig_ptr(rows),
        vectors.shape[1],
        1,
        len(rows),
    )
    return out


def _unit(vectors: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The rows scaled to unit length (a zero row stays zero), as the codes hold them."""
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return np.ascontiguousarray(vectors * scale[:, None], dtype=np.float32)
