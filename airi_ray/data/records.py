"""Append-only logs of records: the durable layer under the context store.

A record is a small row ``(kind, tenant, key, seq, name, body, at)``; ``(kind, tenant, key,
seq, name)`` is its identity. The store above keeps the materialised views and decides
idempotency; a log appends batches atomically and reads back what the store asks for: the
records of one key (a conversation, a run, a LangGraph thread), of some kinds (the traces,
one tenant's threads), or everything (``load``, for tools and tests: the store's start-up
never calls it, so starting costs the hot part, not the table).

Two backends with one contract (``tests/unit/test_context_store.py`` runs the same suite on
both): ``LanceRecordLog`` commits each batch as one LanceDB table version under a storage
URI (a local folder or object storage), so a batch is either wholly durable or absent after
a crash; a B-tree index on ``key`` and a bitmap on ``kind`` (built at the first compaction,
folded in at each one) keep a by-key read and the start-up read of a large table fast.
``MemoryRecordLog`` keeps rows in a list for the in-process executor and tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Protocol

import pyarrow as pa

logger = logging.getLogger(__name__)

TABLE = "records"
APPEND_ATTEMPTS = 5  # an append that loses a commit race (a compaction, a delete) is retried
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("tenant", pa.string()),
        ("key", pa.string()),
        ("seq", pa.int64()),
        ("name", pa.string()),
        ("body", pa.string()),
        ("at", pa.float64()),
    ]
)


@dataclass(frozen=True, slots=True)
class Record:
    kind: str  # "turn" | "run" | "checkpoint" | "trace"
    tenant: str
    key: str  # conversation id or run id
    seq: int  # turn number, superstep, or event number
    name: str  # role of a turn, node of a checkpoint
    body: str  # JSON
    at: float  # wall-clock seconds

    @property
    def identity(self) -> tuple[str, str, str, int, str]:
        return (self.kind, self.tenant, self.key, self.seq, self.name)


class RecordLog(Protocol):
    def load(self) -> list[Record]:
        """Every record (tools and tests; the store does not call it)."""

    def load_key(self, kinds: tuple[str, ...], key: str, tenant: str | None = None) -> list[Record]:
        """The records of ``kinds`` of ``key`` (of ``tenant`` only, if given)."""

    def load_kinds(self, kinds: tuple[str, ...], tenant: str | None = None) -> list[Record]:
        """The records of ``kinds`` (of ``tenant`` only, if given)."""

    def append(self, records: list[Record]) -> None:
        """Make ``records`` durable together, or raise with none of them written."""

    def compact(self) -> None: ...

    def prune(self, kind: str, before: float) -> None:
        """Delete the records of ``kind`` written before ``before`` (wall-clock seconds)."""

    def drop(self, kinds: tuple[str, ...], tenant: str, key: str, below_seq: int) -> None:
        """Delete the records of ``kinds`` of ``(tenant, key)`` with ``seq < below_seq``."""


class MemoryRecordLog:
    """Records in a list: for the in-process executor and tests."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def load(self) -> list[Record]:
        return list(self.records)

    def load_key(self, kinds: tuple[str, ...], key: str, tenant: str | None = None) -> list[Record]:
        return [r for r in self.load_kinds(kinds, tenant) if r.key == key]

    def load_kinds(self, kinds: tuple[str, ...], tenant: str | None = None) -> list[Record]:
        return [r for r in self.records if r.kind in kinds and tenant in (None, r.tenant)]

    def append(self, records: list[Record]) -> None:
        self.records.extend(records)

    def compact(self) -> None:
        pass

    def prune(self, kind: str, before: float) -> None:
        self.records = [r for r in self.records if r.kind != kind or r.at >= before]

    def drop(self, kinds: tuple[str, ...], tenant: str, key: str, below_seq: int) -> None:
        self.records = [
            r
            for r in self.records
            if not (r.kind in kinds and r.tenant == tenant and r.key == key and r.seq < below_seq)
        ]


class LanceRecordLog:
    """Records in one LanceDB table under ``uri``; each append is one commit."""

    def __init__(self, uri: str) -> None:
        import lancedb

        self.uri = uri
        self._db = lancedb.connect(uri)
        try:
            self._table = self._db.open_table(TABLE)
        except ValueError:  # not created yet (lancedb raises ValueError for a missing table)
            self._table = self._db.create_table(TABLE, schema=SCHEMA, exist_ok=True)

    def load(self) -> list[Record]:
        return _records(self._table.to_arrow().to_pylist())

    def load_key(self, kinds: tuple[str, ...], key: str, tenant: str | None = None) -> list[Record]:
        where = f"key = {_quote(key)} AND {_kinds(kinds)}"
        if tenant is not None:
            where += f" AND tenant = {_quote(tenant)}"
        return self._where(where)

    def load_kinds(self, kinds: tuple[str, ...], tenant: str | None = None) -> list[Record]:
        where = _kinds(kinds)
        if tenant is not None:
            where += f" AND tenant = {_quote(tenant)}"
        return self._where(where)

    def _where(self, where: str) -> list[Record]:
        return _records(self._table.search().where(where).limit(None).to_arrow().to_pylist())

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        data = pa.Table.from_pylist([asdict(r) for r in records], schema=SCHEMA)
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                self._table.add(data)
                return
            except Exception as e:
                # An append commutes with a compaction and a delete, and Lance rebases it;
                # should a commit race still be reported, nothing was written: try again.
                if attempt == APPEND_ATTEMPTS or "conflict" not in str(e).lower():
                    raise
                logger.warning("record log append lost a commit race (%s); retrying", e)
                time.sleep(0.01 * attempt)

    def compact(self) -> None:
        """Merge the small fragments that one-batch commits leave, fold new rows into the
        indexes (building them the first time) and drop old versions."""
        self.index()
        self._table.optimize(cleanup_older_than=timedelta(minutes=1))

    def index(self) -> None:
        """Build the scalar indexes the targeted reads use, if missing: a B-tree on ``key``
        (one conversation, run or thread among millions) and a bitmap on ``kind`` (the
        traces read at start). Rows added later are searched unindexed until ``compact``."""
        from lancedb.index import Bitmap, BTree  # lancedb only where a LanceDB log is used

        indexed = {tuple(i.columns) for i in self._table.list_indices()}
        if ("key",) not in indexed:
            self._table.create_index("key", config=BTree())
        if ("kind",) not in indexed:
            self._table.create_index("kind", config=Bitmap())

    def prune(self, kind: str, before: float) -> None:
        if kind.isidentifier():  # a fixed record kind, never user input
            self._table.delete(f"kind = '{kind}' AND at < {float(before)!r}")

    def drop(self, kinds: tuple[str, ...], tenant: str, key: str, below_seq: int) -> None:
        if kinds and all(k.isidentifier() for k in kinds):
            listed = ", ".join(f"'{k}'" for k in kinds)
            self._table.delete(
                f"kind IN ({listed}) AND tenant = {_quote(tenant)} AND key = {_quote(key)} "
                f"AND seq < {int(below_seq)}"
            )


def _records(rows: Iterable[dict[str, object]]) -> list[Record]:
    return [Record(**r) for r in rows]  # type: ignore[arg-type]


def _kinds(kinds: tuple[str, ...]) -> str:
    """A filter on record kinds: fixed names of the store, never user input."""
    if not kinds or not all(k.isidentifier() for k in kinds):
        raise ValueError(f"record kinds must be identifiers, got {kinds!r}")
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def _quote(value: str) -> str:
    """``value`` as an SQL string literal (tenants and keys come from users)."""
    return "'" + value.replace("'", "''") + "'"
