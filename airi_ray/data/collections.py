"""Document collections in LanceDB: chunks, vectors per embedding model version, search.

A collection holds the chunks of its documents (id ``doc#n``, text, JSON metadata, tenant,
document id) with the vector one embedding model version made of each. Every version has a
table of its own, so a query embedded by one model never meets vectors of another; a small
``_manifest`` table under the same storage URI records, per collection and version, the
table, the vector dimension, whether the table is complete and which version is active
(the one ingestion writes to).

- ``upsert`` chunks, embeds and writes documents in one ``merge_insert`` per call (all chunks
  and vectors are computed first): a re-ingested document replaces all its chunks, and a
  failure half-way writes nothing.
- ``reembed`` builds another version's table from the stored chunk texts, in batches that
  are each an idempotent merge, so a crashed run restarts where it stopped without
  duplicates; the manifest marks the version complete only at the end. ``search`` refuses
  a version that is not complete.
- ``search`` always scopes to one tenant and applies metadata equality filters inside
  LanceDB (prefilter), so the top-k is the top-k among the rows allowed, not a post-filtered
  remainder. Values reach SQL only as quoted literals (``'`` doubled).
- An ANN index (see ``IndexSpec``) is built once a table reaches ``index_min_rows``; below
  that, search is exact.
- From the same size on, queries without a metadata filter are answered from an in-memory
  index of the table (``airi_ray.data.ann``: a scan of compressed codes per tenant, its
  candidates reranked exactly from the stored vectors), rebuilt in the background after writes
  and used only while the table is at the version it was built from; until then queries go
  to LanceDB as above. LanceDB stays the store and the source of truth.

Writes to the active version only; ``delete`` removes a document from every version's
table, so a deleted text never comes back through an older embedder. A non-active version
lags behind later upserts until ``reembed`` is run for it again (it only embeds what
changed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.background_loop import LOOP
from lancedb.index import Bitmap, HnswSq, IvfPq, IvfSq
from tqdm import tqdm

from airi_ray.core.chunking import Chunker
from airi_ray.core.errors import AiriError, InvalidRequest, NotFound, PayloadTooLarge
from airi_ray.core.mmr import mmr_select
from airi_ray.data.ann import AnnSpec, Found, TableAnn

__all__ = [
    "DEFAULT_INDEX",
    "AnnSpec",
    "Collection",
    "CollectionNotFound",
    "CollectionStore",
    "Document",
    "EmbedderNotReady",
    "EmbedderState",
    "Hit",
    "IndexSpec",
    "UpsertResult",
]

logger = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], Sequence[Sequence[float]]]
Embedder = tuple[str, str]  # (model name, model version)

MANIFEST = "_manifest"
MAX_K = 1000
MMR_POOL_FACTOR = 4  # MMR chooses k among this many times k nearest candidates
MAX_SMALL_FILES = 16  # an indexed table is compacted once it has more small data files
MAX_REEMBED_PASSES = 5
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_INGEST_SUFFIXES = (".md", ".txt")
INDEX_KINDS = ("IVF_PQ", "IVF_SQ", "IVF_HNSW_SQ")

_MANIFEST_SCHEMA = pa.schema(
    [
        ("table_name", pa.string()),
        ("collection", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("dim", pa.int32()),
        ("complete", pa.bool_()),
        ("active", pa.bool_()),
        ("created_at", pa.float64()),
        ("completed_at", pa.float64()),
    ]
)
_TEXT_COLUMNS = ["tenant", "id", "doc_id", "text", "metadata", "labels"]


class CollectionNotFound(NotFound, LookupError):
    """No collection of that name exists under the storage URI."""

    code = "collection_not_found"


class EmbedderNotReady(AiriError):
    """The collection has no complete table for the requested embedding model version."""

    status = 409
    type = "invalid_request_error"
    code = "embedder_not_ready"


@dataclass(frozen=True)
class IndexSpec:
    """Which ANN index to build and how to query it (chosen by ``benchmarks/retrieval.py``).

    Attributes:
        kind: ``"IVF_PQ"``, ``"IVF_SQ"`` (8-bit scalar quantisation: 4x smaller than the
            vectors, distances close to exact ones) or ``"IVF_HNSW_SQ"``.
        rows_per_partition: IVF partitions are ``rows / rows_per_partition`` (at least 1).
        num_sub_vectors: PQ sub-vectors (``IVF_PQ``; must divide the dimension).
        nprobes: IVF partitions searched per query.
        refine_factor: fetch ``k * refine_factor`` approximate candidates and rerank them
            with exact distances. At least 1: a quantised index's own distance is approximate
            and, for cosine, about twice the cosine distance (squared L2 of the normalised
            vectors), so the returned rows are always rescored exactly. 1 reranks only the k
            returned (from their vectors, see ``search_table``); more recovers the recall
            quantisation loses.
        ef: HNSW search breadth (``IVF_HNSW_SQ``).
    """

    kind: str = "IVF_SQ"
    rows_per_partition: int = 6250
    num_sub_vectors: int = 48
    nprobes: int = 16
    refine_factor: int = 1
    ef: int = 64

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(
                f"index kind must be one of {', '.join(INDEX_KINDS)}; got {self.kind!r}"
            )
        if self.refine_factor < 1:
            raise ValueError(
                "refine_factor must be at least 1 (the exact rerank is what makes the scores "
                f"cosine similarities); got {self.refine_factor}"
            )

    def config(self, rows: int, dim: int) -> IvfPq | IvfSq | HnswSq:
        partitions = max(1, rows // self.rows_per_partition)
        if self.kind == "IVF_PQ":
            # PQ needs the dimension to split evenly; fall back to the largest divisor below.
            subs = max(s for s in range(1, self.num_sub_vectors + 1) if dim % s == 0)
            return IvfPq(
                distance_type="cosine",
                num_partitions=partitions,
                num_sub_vectors=subs,
                max_iterations=20,
            )
        if self.kind == "IVF_SQ":
            return IvfSq(distance_type="cosine", num_partitions=partitions, max_iterations=20)
        return HnswSq(distance_type="cosine", num_partitions=partitions, max_iterations=20)


# benchmarks/retrieval.py on 100k 384-dim vectors (2 CPUs): IVF_SQ with all 16 partitions
# probed is the only index above recall@10 0.95 on uniform random vectors (the issue's
# workload) at about NumPy's speed, and 0.97 on clustered ones; IVF_PQ needs a x200 rerank
# on uniform data (3x slower), IVF_HNSW_SQ a very wide search. Beyond 100k rows the 16
# probes are a fraction of the partitions: latency stays, recall then rests on clustering.
DEFAULT_INDEX = IndexSpec()


@dataclass(frozen=True)
class Document:
    """A document to ingest: a non-empty id, its text and JSON-serialisable metadata."""

    id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query."""

    id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float


@dataclass(frozen=True)
class UpsertResult:
    documents: int
    chunks: int


@dataclass(frozen=True)
class EmbedderState:
    """One embedding model version of a collection, as the manifest records it."""

    model: str
    version: str
    table_name: str
    dim: int
    complete: bool
    active: bool
    created_at: float
    completed_at: float | None


def collections_uri(storage_uri: str) -> str:
    """Where an app's collections live under its storage URI."""
    return storage_uri.rstrip("/") + "/collections"


def quote(value: str) -> str:
    """A SQL string literal: the value in single quotes, inner quotes doubled.

    LanceDB's SQL (DataFusion) treats a backslash as an ordinary character, so doubling
    ``'`` is the whole escape.
    """
    return "'" + value.replace("'", "''") + "'"


def _label(key: str, value: Any) -> str:
    """The filter label of one top-level metadata item: its canonical JSON ``[key, value]``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 and 3 compare equal in JSON; give them one label
    return json.dumps([key, value], ensure_ascii=False, separators=(",", ":"))


def _labels(metadata: Mapping[str, Any]) -> list[str]:
    return [
        _label(k, v)
        for k, v in metadata.items()
        if v is None or isinstance(v, str | int | float | bool)
    ]


def _filter_sql(tenant: str, filter: Mapping[str, Any] | None) -> str:
    clauses = [f"tenant = {quote(tenant)}"]
    for key, value in (filter or {}).items():
        if not isinstance(key, str) or not (
            value is None or isinstance(value, str | int | float | bool)
        ):
            raise InvalidRequest(
                "filter keys must be strings and values a string, number, boolean or null "
                f"(equality on top-level metadata); got {key!r}: {type(value).__name__}"
            )
        clauses.append(f"array_has(labels, {quote(_label(key, value))})")
    return " AND ".join(clauses)


def _in_list(values: Iterable[str]) -> str:
    return "(" + ", ".join(quote(v) for v in values) + ")"


def _chunk_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("tenant", pa.string()),
            ("id", pa.string()),
            ("doc_id", pa.string()),
            ("text", pa.string()),
            ("metadata", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("model", pa.string()),
            ("version", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def _table_name(collection: str, model: str, version: str) -> str:
    digest = hashlib.sha256(f"{model}\0{version}".encode()).hexdigest()[:12]
    return f"{collection}__{digest}"


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise InvalidRequest(f"tenant must be a non-empty string, got {tenant!r}")


class CollectionStore:
    """All collections under one storage URI (a local directory or an object-store URI).

    Args:
        uri: where LanceDB keeps the tables (``/path``, ``s3://bucket/prefix``, ...).
        storage_options: object-store credentials and settings, passed to LanceDB.
        index_min_rows: rows a version's table needs before an ANN index is built.
        max_document_chars: longest document text accepted.
        embed_batch: texts per call to the embed function.
        index: the ANN index to build and its query settings.
        ann: the in-memory index that serves unfiltered queries of a table with at
            least ``index_min_rows`` rows (None: LanceDB serves every query).
        progress: show a tqdm bar while embedding (ingest and re-embedding).
        read_consistency_s: how stale a read may be relative to other processes' writes
            (0: every read sees the latest commit, e.g. a version another process just
            marked complete; raise it on object stores to save a round trip per read).
            Tables stay open between calls and the manifest's rows are kept per manifest
            version, so a call re-reads them only after a write, by any process.

    Raises:
        ValueError: a limit is out of range.
    """

    def __init__(
        self,
        uri: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        index_min_rows: int = 5_000,
        max_document_chars: int = 2_000_000,
        embed_batch: int = 64,
        index: IndexSpec = DEFAULT_INDEX,
        ann: AnnSpec | None = AnnSpec(),  # noqa: B008 (frozen, so sharing it is safe)
        progress: bool = True,
        read_consistency_s: float = 0.0,
    ) -> None:
        if index_min_rows < 1 or max_document_chars < 1 or embed_batch < 1:
            raise ValueError(
                "index_min_rows, max_document_chars and embed_batch must be at least 1; got "
                f"{index_min_rows}, {max_document_chars} and {embed_batch}"
            )
        self.uri = uri
        self.index_min_rows = index_min_rows
        self.max_document_chars = max_document_chars
        self.embed_batch = embed_batch
        self.index = index
        self.ann = ann
        self.progress = progress
        self._db = lancedb.connect(
            uri,
            storage_options=dict(storage_options or {}),
            read_consistency_interval=timedelta(seconds=read_consistency_s),
        )
        self._tables: dict[str, Any] = {}
        self._complete: dict[tuple[str, str, str], EmbedderState] = {}
        self._manifest_rows: tuple[int, list[tuple[str, EmbedderState]]] | None = None
        self._anns: dict[str, TableAnn] = {}

    # -- manifest ---------------------------------------------------------------------------

    def _manifest(self) -> Any:
        if MANIFEST not in self._tables:
            self._tables[MANIFEST] = self._db.create_table(
                MANIFEST, schema=_MANIFEST_SCHEMA, exist_ok=True
            )
        return self._tables[MANIFEST]

    def _states(self, collection: str | None = None) -> list[tuple[str, EmbedderState]]:
        # Every write to the manifest, this process's or another's, makes a new table
        # version, so the rows read at one version stay valid until it changes: a call costs
        # one version check (under a millisecond, within read_consistency_s), not a scan.
        manifest = self._manifest()
        version = manifest.version
        cached = self._manifest_rows
        if cached is None or cached[0] != version:
            rows = manifest.search().limit(None).to_list()
            states = [
                (
                    r["collection"],
                    EmbedderState(
                        model=r["model"],
                        version=r["version"],
                        table_name=r["table_name"],
                        dim=r["dim"],
                        complete=r["complete"],
                        active=r["active"],
                        created_at=r["created_at"],
                        completed_at=r["completed_at"],
                    ),
                )
                for r in rows
            ]
            # A write between the version check and the scan only makes the next call
            # read again: the rows are never older than the version they are kept under.
            cached = self._manifest_rows = (version, states)
        return [(c, s) for c, s in cached[1] if collection is None or c == collection]

    def _write_states(self, collection: str, states: Sequence[EmbedderState]) -> None:
        rows = [
            {"collection": collection, **{f: getattr(s, f) for f in s.__dataclass_fields__}}
            for s in states
        ]
        (
            self._manifest()
            .merge_insert("table_name")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(pa.Table.from_pylist(rows, schema=_MANIFEST_SCHEMA))
        )

    def _table(self, name: str) -> Any:
        if name not in self._tables:
            self._tables[name] = self._db.open_table(name)
        return self._tables[name]

    def _ann(self, name: str, dim: int) -> TableAnn | None:
        """The in-memory index of table ``name`` (None when the store has them off)."""
        if self.ann is None:
            return None
        ann = self._anns.get(name)
        if ann is None:
            ann = self._anns.setdefault(
                name, TableAnn(name, self._pinned(name), dim, self.ann, self.index_min_rows)
            )
        return ann

    def _pinned(self, name: str) -> Callable[[int], Any]:
        def open_at(version: int) -> Any:
            # A handle of its own: checking out a version on the shared one would pin the
            # queries and writes that use it too.
            table = self._db.open_table(name)
            table.checkout(version)
            return table

        return open_at

    def _forget(self, name: str) -> None:
        self._tables.pop(name, None)
        self._anns.pop(name, None)

    # -- collections ------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the collections, sorted."""
        return sorted({c for c, _ in self._states()})

    def create(self, name: str, *, model: str, version: str, dim: int) -> Collection:
        """Create a collection whose active embedder is ``(model, version)`` of ``dim``.

        Raises:
            InvalidRequest: a bad name or dimension, or the collection already exists.
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidRequest(
                "a collection name is 1 to 64 letters, digits, '_' or '-', starting with a "
                f"letter or digit; got {name!r}"
            )
        if name in self.names():
            raise InvalidRequest(f"collection {name!r} already exists")
        self._add_version(name, model, version, dim, complete=True, active=True)
        return Collection(self, name)

    def open(self, name: str) -> Collection:
        """The collection called ``name``.

        Raises:
            CollectionNotFound: no such collection (the message lists the known ones).
        """
        known = self.names()
        if name not in known:
            raise CollectionNotFound(
                f"no collection {name!r} under {self.uri}; known collections: "
                f"{', '.join(known) or '(none)'}"
            )
        return Collection(self, name)

    def drop(self, name: str) -> None:
        """Delete a collection: every version's table and its manifest rows.

        Raises:
            CollectionNotFound: no such collection.
        """
        states = self.open(name).embedders()
        for s in states:
            self._forget(s.table_name)
            self._complete.pop((name, s.model, s.version), None)
            self._db.drop_table(s.table_name, ignore_missing=True)
        self._manifest().delete(f"collection = {quote(name)}")

    def _add_version(
        self, collection: str, model: str, version: str, dim: int, *, complete: bool, active: bool
    ) -> EmbedderState:
        for label, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"the embedder {label} must be a non-empty string")
        if not isinstance(dim, int) or dim < 1:
            raise InvalidRequest(f"the vector dimension must be a positive integer, got {dim!r}")
        name = _table_name(collection, model, version)
        self._db.create_table(name, schema=_chunk_schema(dim), exist_ok=True)
        now = time.time()
        state = EmbedderState(
            model, version, name, dim, complete, active, now, now if complete else None
        )
        self._write_states(collection, [state])
        return state


class Collection:
    """One collection: ingestion, deletion, search and re-embedding.

    Obtain it from ``CollectionStore.create`` or ``CollectionStore.open``; it is a light
    handle (state lives in the tables), cheap to make per call.
    """

    def __init__(self, store: CollectionStore, name: str) -> None:
        self.store = store
        self.name = name

    # -- versions ---------------------------------------------------------------------------

    def embedders(self) -> list[EmbedderState]:
        """Every embedding model version of this collection, oldest first."""
        states = [s for _, s in self.store._states(self.name)]
        return sorted(states, key=lambda s: s.created_at)

    def active(self) -> EmbedderState:
        """The version ingestion writes to."""
        [state] = [s for s in self.embedders() if s.active]
        return state

    def _state(self, model: str, version: str) -> EmbedderState:
        for s in self.embedders():
            if (s.model, s.version) == (model, version):
                return s
        raise EmbedderNotReady(
            f"collection {self.name!r} has no table for embedder {model!r} version "
            f"{version!r}; it has: {self._describe()}"
        )

    def _describe(self) -> str:
        return ", ".join(
            f"{s.model} {s.version} ({'complete' if s.complete else 'building'})"
            for s in self.embedders()
        )

    def _complete_state(self, model: str, version: str) -> EmbedderState:
        # A version never goes from complete back to building, so once seen complete its
        # state is kept in memory: a query then costs no manifest read.
        key = (self.name, model, version)
        state = self.store._complete.get(key)
        if state is None:
            state = self._state(model, version)
            if not state.complete:
                ready = [f"{s.model} {s.version}" for s in self.embedders() if s.complete]
                raise EmbedderNotReady(
                    f"embedder {model!r} version {version!r} of {self.name!r} is still being "
                    f"built; complete versions: {', '.join(ready) or '(none)'}"
                )
            self.store._complete[key] = state
        return state

    def table_for(self, model: str, version: str) -> Any:
        """The LanceDB table of one embedding model version (complete or being built).

        Raises:
            EmbedderNotReady: the collection has no such version.
        """
        return self.store._table(self._state(model, version).table_name)

    def activate(self, model: str, version: str) -> None:
        """Make a complete version the one ingestion writes to.

        Raises:
            EmbedderNotReady: the version is unknown or not complete.
        """
        target = self._state(model, version)
        if not target.complete:
            raise EmbedderNotReady(
                f"embedder {model!r} version {version!r} of {self.name!r} is still being "
                "built; run reembed to completion before activating it"
            )
        changed = [replace(s, active=s.table_name == target.table_name) for s in self.embedders()]
        self.store._write_states(self.name, changed)

    def drop_version(self, model: str, version: str) -> None:
        """Delete a version's table (not the active one).

        Raises:
            EmbedderNotReady: no such version. InvalidRequest: it is the active version.
        """
        state = self._state(model, version)
        if state.active:
            raise InvalidRequest(
                f"embedder {model!r} version {version!r} is the active one of {self.name!r}; "
                "activate another version before dropping it"
            )
        self.store._forget(state.table_name)
        self.store._complete.pop((self.name, model, version), None)
        self.store._db.drop_table(state.table_name, ignore_missing=True)
        self.store._manifest().delete(f"table_name = {quote(state.table_name)}")

    # -- ingestion --------------------------------------------------------------------------

    def _documents(self, documents: Iterable[Document | Mapping[str, Any]]) -> list[Document]:
        docs: list[Document] = []
        seen: set[str] = set()
        limit = self.store.max_document_chars
        for raw in documents:
            doc = (
                raw
                if isinstance(raw, Document)
                else Document(raw.get("id", ""), raw.get("text", ""), raw.get("metadata") or {})
            )
            if not isinstance(doc.id, str) or not doc.id.strip():
                raise InvalidRequest(f"a document id must be a non-empty string, got {doc.id!r}")
            if doc.id in seen:
                raise InvalidRequest(f"document id {doc.id!r} appears twice in one upsert")
            if not isinstance(doc.text, str):
                raise InvalidRequest(f"document {doc.id!r}: text must be a string")
            if len(doc.text) > limit:
                raise PayloadTooLarge(
                    f"document {doc.id!r} has {len(doc.text):,} characters; at most "
                    f"{limit:,} are allowed (split it into several documents)"
                )
            if not isinstance(doc.metadata, Mapping) or not all(
                isinstance(k, str) for k in doc.metadata
            ):
                raise InvalidRequest(
                    f"document {doc.id!r}: metadata must be a mapping with string keys"
                )
            try:
                json.dumps(dict(doc.metadata))
            except (TypeError, ValueError) as e:
                raise InvalidRequest(
                    f"document {doc.id!r}: metadata must be JSON-serialisable ({e})"
                ) from None
            seen.add(doc.id)
            docs.append(doc)
        return docs

    def _embed(
        self, texts: list[str], embed: EmbedFn, dim: int, progress: bool | None, what: str
    ) -> list[np.ndarray]:
        """Vectors of ``texts`` in batches, each checked for count and dimension."""
        show = self.store.progress if progress is None else progress
        out: list[np.ndarray] = []
        step = self.store.embed_batch
        with tqdm(total=len(texts), disable=not show, unit="chunk", desc=what) as bar:
            for i in range(0, len(texts), step):
                batch = texts[i : i + step]
                vectors = embed(batch)
                if len(vectors) != len(batch):
                    raise InvalidRequest(
                        f"the embed function returned {len(vectors)} vectors for "
                        f"{len(batch)} texts; it must return one per text"
                    )
                for v in vectors:
                    arr = np.asarray(v, dtype=np.float32)
                    if arr.shape != (dim,):
                        raise InvalidRequest(
                            f"vector of the wrong dimension for collection {self.name!r}: "
                            f"expected {dim}, got {arr.shape[0] if arr.ndim == 1 else arr.shape}"
                        )
                    if not np.isfinite(arr).all():
                        raise InvalidRequest("the embed function returned a non-finite value")
                    out.append(arr)
                bar.update(len(batch))
        return out

    def upsert(
        self,
        documents: Iterable[Document | Mapping[str, Any]],
        *,
        tenant: str,
        embed: EmbedFn,
        chunker: Chunker,
        progress: bool | None = None,
    ) -> UpsertResult:
        """Chunk, embed and write documents of one tenant into the active version.

        Each document replaces every chunk the tenant had for its id. All chunks and vectors
        are computed before anything is written, and the write is one transaction.

        Args:
            documents: ``Document`` objects or dicts with ``id``, ``text``, ``metadata``.
            embed: ``texts -> vectors`` of the active version's model.
            chunker: the tokenizer and window sizes.
            progress: show a progress bar (default: the store's setting).

        Raises:
            InvalidRequest: empty or duplicate id, bad metadata, wrong vector dimension.
            PayloadTooLarge: a text longer than ``max_document_chars``.
        """
        _check_tenant(tenant)
        docs = self._documents(documents)
        if not docs:
            return UpsertResult(0, 0)
        state = self.active()
        rows: list[dict[str, Any]] = []
        for doc in docs:
            meta = json.dumps(dict(doc.metadata), ensure_ascii=False, sort_keys=True)
            labels = _labels(doc.metadata)
            for chunk in chunker.split(doc.text):
                rows.append(
                    {
                        "tenant": tenant,
                        "id": f"{doc.id}#{chunk.index}",
                        "doc_id": doc.id,
                        "text": chunk.text,
                        "metadata": meta,
                        "labels": labels,
                        "model": state.model,
                        "version": state.version,
                    }
                )
        vectors = self._embed([r["text"] for r in rows], embed, state.dim, progress, "embedding")
        for r, v in zip(rows, vectors, strict=True):
            r["vector"] = v
        table = self.store._table(state.table_name)
        replaced = f"tenant = {quote(tenant)} AND doc_id IN {_in_list(d.id for d in docs)}"
        if rows:
            (
                table.merge_insert(["tenant", "id"])
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(replaced)
                .execute(pa.Table.from_pylist(rows, schema=_chunk_schema(state.dim)))
            )
        else:  # only empty texts: nothing to insert, the old chunks still go
            table.delete(replaced)
        self._upkeep(table, state.dim)
        return UpsertResult(len(docs), len(rows))

    def ingest_folder(
        self,
        folder: str | Path,
        *,
        tenant: str,
        embed: EmbedFn,
        chunker: Chunker,
        progress: bool | None = None,
    ) -> UpsertResult:
        """Upsert every ``.md`` and ``.txt`` file under ``folder`` (recursively).

        The document id is the path relative to ``folder`` without its suffix (``faq/returns``);
        the metadata holds ``{"source": relative path}``.

        Raises:
            InvalidRequest: ``folder`` is not a directory; and as ``upsert``.
        """
        root = Path(folder)
        if not root.is_dir():
            raise InvalidRequest(f"{str(root)!r} is not a directory")
        paths = sorted(p for p in root.rglob("*") if p.suffix in _INGEST_SUFFIXES and p.is_file())
        docs = [
            Document(
                p.relative_to(root).with_suffix("").as_posix(),
                p.read_text(encoding="utf-8"),
                {"source": p.relative_to(root).as_posix()},
            )
            for p in paths
        ]
        return self.upsert(docs, tenant=tenant, embed=embed, chunker=chunker, progress=progress)

    def delete(self, doc_ids: Iterable[str], *, tenant: str) -> None:
        """Remove the tenant's chunks of these documents from every version's table."""
        _check_tenant(tenant)
        ids = list(doc_ids)
        if not ids:
            return
        where = f"tenant = {quote(tenant)} AND doc_id IN {_in_list(ids)}"
        for state in self.embedders():
            table = self.store._table(state.table_name)
            table.delete(where)
            self._refresh_ann(table, state.dim)

    def optimize(self, model: str, version: str) -> bool:
        """Bring one version's table up to date now, as every write does when it is due.

        Builds the ANN index once the table has ``index_min_rows`` rows, folds unindexed rows
        into it and compacts small files. Returns whether the index or the files changed.

        Raises:
            EmbedderNotReady: the collection has no such version.
        """
        state = self._state(model, version)
        table = self.store._table(state.table_name)
        changed = self._maybe_index(table, state.dim)
        self._refresh_ann(table, state.dim)
        return changed

    def wait_for_ann(self, model: str, version: str, timeout: float = 600.0) -> bool:
        """Bring the version's in-memory index up to the table's version and wait for it
        (tests, benchmarks; queries never wait). A write during a rebuild makes it end
        behind; then another is started.

        Returns whether the index serves the table's current version (False: the table is
        too small for one, the store has them off, a rebuild failed or time ran out).

        Raises:
            EmbedderNotReady: the collection has no such version.
        """
        state = self._state(model, version)
        ann = self.store._ann(state.table_name, state.dim)
        if ann is None:
            return False
        table = self.store._table(state.table_name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ann.wait(max(deadline - time.monotonic(), 0.0))
            current = table.version
            if ann.view().index_version == current:
                return True
            if not ann.refresh(current, table.count_rows()) and ann.view().building_version is None:
                return False  # not due: too small, or a failed rebuild not yet retried
        return False

    def _refresh_ann(self, table: Any, dim: int, version: int | None = None) -> None:
        """Start a background rebuild of the table's in-memory index if it is behind.

        Called after writes and by queries the index could not answer. A failure to start
        is logged, not raised: the write has committed, the query is answered by LanceDB,
        and the next write or query tries again.
        """
        ann = self.store._ann(table.name, dim)
        if ann is None:
            return
        try:
            version = table.version if version is None else version
            view = ann.view()
            if view.index_version != version and view.building_version is None:
                ann.refresh(version, table.count_rows())
        except Exception:
            logger.warning("could not start rebuilding %s", table.name, exc_info=True)

    def _upkeep(self, table: Any, dim: int) -> None:
        """``_maybe_index`` after a write, which has committed by then: a failure here (say
        a compaction that lost a race with a concurrent write) is logged and left to the
        next write to retry, not reported as a failed write. Until then search is correct,
        only slower. Then the in-memory index, now behind, starts rebuilding in the
        background."""
        try:
            self._maybe_index(table, dim)
        except Exception:
            logger.warning(
                "upkeep of table %s failed; the next write retries it", table.name, exc_info=True
            )
        self._refresh_ann(table, dim)

    def _maybe_index(self, table: Any, dim: int) -> bool:
        """Build the ANN index once the table is big enough; fold new rows in later.

        Also compacts the table's files: every upsert writes files of its own, and a query
        opens each (100k rows from 10 upserts: about 1 ms of a 7 ms query, measured by
        ``benchmarks/retrieval.py``). Returns whether the index or the files changed.
        """
        rows = table.count_rows()
        indexed = {tuple(i.columns): i.name for i in table.list_indices()}
        if ("vector",) not in indexed:
            if rows < self.store.index_min_rows:
                return False
            table.optimize()  # compact first: the index then covers a few large files
            table.create_index("vector", config=self.store.index.config(rows, dim))
            if ("tenant",) not in indexed:
                table.create_index("tenant", config=Bitmap())
            return True
        stats = table.index_stats(indexed[("vector",)])
        small_files = table.stats()["fragment_stats"]["num_small_fragments"]
        # Unindexed rows are searched exactly (correct, slower); fold them in once they
        # reach a tenth of the table rather than on every small write, and compact once
        # small files pile up. optimize() does both (and keeps old versions for a week, so
        # a reader at an older version is not disturbed).
        unindexed = stats.num_unindexed_rows if stats is not None else 0
        if unindexed > max(rows // 10, 1) or small_files > MAX_SMALL_FILES:
            table.optimize()
            return True
        return False

    # -- search -----------------------------------------------------------------------------

    def search(
        self,
        query_vector: Sequence[float] | np.ndarray,
        k: int = 5,
        *,
        tenant: str,
        embedder: Embedder,
        filter: Mapping[str, Any] | None = None,
        mmr_lambda: float | None = None,
    ) -> list[Hit]:
        """The ``k`` chunks of ``tenant`` nearest to the query, best first.

        Args:
            query_vector: the query embedded by ``embedder``.
            embedder: ``(model, version)`` that embedded the query; only that version's
                table is read.
            filter: top-level metadata equality, ``{"lang": "en"}`` (all must match).
            mmr_lambda: when set, maximal marginal relevance over ``4k`` candidates, in
                ``[0, 1]`` (1 is plain relevance).

        Raises:
            InvalidRequest: bad ``k``, tenant, filter, lambda or vector dimension.
            EmbedderNotReady: the collection has no complete table for ``embedder``.
        """
        _check_tenant(tenant)
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequest(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise InvalidRequest(f"mmr_lambda must be in [0, 1] or None, got {mmr_lambda}")
        model, version = embedder
        state = self._complete_state(model, version)
        q = np.asarray(query_vector, dtype=np.float32)
        if q.shape != (state.dim,):
            raise InvalidRequest(
                f"query vector of the wrong dimension for {model!r} {version!r}: expected "
                f"{state.dim}, got {q.shape[0] if q.ndim == 1 else q.shape}"
            )
        if not np.isfinite(q).all() or not np.any(q):
            raise InvalidRequest("the query vector must be finite and not all zeros")
        where = _filter_sql(tenant, filter)
        table = self.store._table(state.table_name)
        limit = k if mmr_lambda is None else k * MMR_POOL_FACTOR
        found = self._search_ann(table, state.dim, tenant, q, limit, filtered=bool(filter))
        if found is None:
            # Every column read costs the query a random read per hit (~0.3 ms for 10
            # hits): the document id is the chunk id's prefix (``doc#n``), so it is not read.
            result, vectors, scores = search_table(
                table, q, limit, where, self.store.index, ["id", "text", "metadata"]
            )
            found = Found(
                result.column("id").to_pylist(),
                result.column("text").to_pylist(),
                result.column("metadata").to_pylist(),
                vectors,
                scores,
            )
        vectors = found.vectors
        hits = [
            Hit(chunk_id, chunk_id.rpartition("#")[0], text, json.loads(meta), float(score))
            for chunk_id, text, meta, score in zip(
                found.ids, found.texts, found.metadata, found.scores, strict=True
            )
        ]
        if mmr_lambda is None or not hits:
            return hits
        return [hits[i] for i in mmr_select(q, vectors, k, mmr_lambda)]

    def _search_ann(
        self, table: Any, dim: int, tenant: str, q: np.ndarray, limit: int, *, filtered: bool
    ) -> Found | None:
        """The answer from the in-memory index, or None: no index, or not at the table's
        version (then a rebuild is started, and LanceDB answers meanwhile)."""
        ann = self.store._ann(table.name, dim)
        if ann is None:
            return None
        # The latest commit of any process, as LanceDB's strong consistency would see it.
        version = ann.watch(table).version(table)
        found = ann.search(version, tenant, q, limit, filtered=filtered)
        if found is None and not filtered:
            self._refresh_ann(table, dim, version)
        return found

    # -- re-embedding -----------------------------------------------------------------------

    def reembed(
        self,
        model: str,
        version: str,
        embed: EmbedFn,
        *,
        dim: int,
        progress: bool | None = None,
    ) -> int:
        """Build (or bring up to date) ``(model, version)``'s table from the active one.

        A plain synchronous function: the runtime may run it in a thread. It compares the
        two tables by chunk key and content, embeds only chunks missing or changed in the
        target, writes them batch by batch (each an idempotent merge), deletes chunks gone
        from the source, and repeats while the source changed meanwhile (at most
        ``MAX_REEMBED_PASSES`` passes). Only then is the version marked complete. A crashed
        run is restarted by calling it again: done batches are not embedded twice.

        Returns:
            how many chunks were embedded.

        Raises:
            InvalidRequest: ``(model, version)`` is the active version, or ``dim`` differs
                from the dimension recorded for it; as ``upsert`` for bad vectors.
        """
        source = self.active()
        if (source.model, source.version) == (model, version):
            raise InvalidRequest(
                f"embedder {model!r} version {version!r} is already the active version of "
                f"{self.name!r}; re-embed into a new version"
            )
        try:
            target = self._state(model, version)
        except EmbedderNotReady:
            target = self.store._add_version(
                self.name, model, version, dim, complete=False, active=False
            )
        if target.dim != dim:
            raise InvalidRequest(
                f"embedder {model!r} version {version!r} of {self.name!r} was started with "
                f"dimension {target.dim}, got {dim}"
            )
        src = self.store._table(source.table_name)
        dst = self.store._table(target.table_name)
        schema = _chunk_schema(dim)
        embedded = 0
        for _ in range(MAX_REEMBED_PASSES):
            want = _rows_by_key(src)
            have = _rows_by_key(dst)
            todo = [row for key, row in want.items() if have.get(key) != row]
            gone = [key for key in have if key not in want]
            if not todo and not gone:
                break
            _delete_keys(dst, gone)
            step = self.store.embed_batch * 16  # one merge per 16 embed calls
            for i in range(0, len(todo), step):
                batch = [dict(r) for r in todo[i : i + step]]
                vectors = self._embed(
                    [r["text"] for r in batch], embed, dim, progress, f"re-embedding {model}"
                )
                for r, v in zip(batch, vectors, strict=True):
                    r.update(model=model, version=version, vector=v)
                (
                    dst.merge_insert(["tenant", "id"])
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(pa.Table.from_pylist(batch, schema=schema))
                )
            embedded += len(todo)
        self._upkeep(dst, dim)
        done = self._state(model, version)
        self.store._write_states(
            self.name,
            [replace(done, complete=True, completed_at=time.time())],
        )
        return embedded


def _rows_by_key(table: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every chunk's text columns, by ``(tenant, id)``: what re-embedding compares."""
    rows = table.search().select(_TEXT_COLUMNS).limit(None).to_list()
    return {(r["tenant"], r["id"]): {c: r[c] for c in _TEXT_COLUMNS} for r in rows}


def _delete_keys(table: Any, keys: Sequence[tuple[str, str]]) -> None:
    by_tenant: dict[str, list[str]] = {}
    for tenant, chunk_id in keys:
        by_tenant.setdefault(tenant, []).append(chunk_id)
    for tenant, ids in by_tenant.items():
        table.delete(f"tenant = {quote(tenant)} AND id IN {_in_list(ids)}")


def search_table(
    table: Any,
    query: np.ndarray,
    limit: int,
    where: str,
    index: IndexSpec,
    columns: Sequence[str],
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The nearest ``limit`` rows matching ``where`` (a prefilter), best first.

    Returns the rows (``columns``), their vectors ``(n, dim)`` and their exact cosine
    similarities to ``query``. The query settings of ``index`` apply once the table has an
    ANN index; without one LanceDB searches exactly. ``Collection.search`` and the
    benchmark both go through here.

    The returned rows are reranked here by exact similarity, computed from their vectors,
    which are read with the other columns: what LanceDB's ``refine_factor(1)`` does, without
    its second read of the vectors (0.5 ms at 100k rows). LanceDB refines only for
    ``refine_factor > 1``, to rerank more candidates than are returned.

    The query goes to the table's async handle in one call on LanceDB's event loop: the sync
    builder of LanceDB 0.40 (the pinned version) costs six round trips to that loop per
    query (three of them schema reads), about 1.5 ms at 100k rows on 2 CPUs. An async
    query filters before the search unless told ``postfilter()``, as ``prefilter=True`` does.
    """
    builder = (
        table._table.query()
        .nearest_to(query)
        .column("vector")
        .distance_type("cosine")
        .where(where)
        # _distance is selected only because LanceDB 0.40 warns on every query without it
        .select([*columns, "vector", "_distance"])
        .limit(limit)
        .nprobes(index.nprobes)
    )
    if index.refine_factor > 1:
        builder = builder.refine_factor(index.refine_factor)
    if index.kind == "IVF_HNSW_SQ":
        builder = builder.ef(index.ef)
    result = LOOP.run(_collect(builder))
    column = result.column("vector")
    flat = (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).flatten()
    vectors = flat.to_numpy(zero_copy_only=False).reshape(len(result), query.shape[0])
    dots = vectors @ query
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors) * float(query @ query))
    scores = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    order = np.argsort(-scores, kind="stable")
    if (order == np.arange(len(order))).all():  # the usual case: the index's order held
        return result, vectors, scores
    return result.take(order), vectors[order], scores[order]


async def _collect(builder: Any) -> pa.Table:
    # AsyncQuery.to_arrow first reads the table's schema to look for blob columns (chunk
    # tables have none): one more consistency check and 0.3 ms per query.
    stream = await builder._inner.execute(max_batch_length=None, timeout=None)
    batches = [batch async for batch in stream]
    return pa.Table.from_batches(batches, schema=stream.schema)
