"""Append-only logs of records: the durable layer under the context store.

A record is a small row ``(kind, tenant, key, seq, name, body, at)``; ``(kind, tenant, key,
seq, name)`` is its identity. The store above keeps the materialised views and decides
idempotency; a log only loads everything back and appends batches atomically.

Two backends with one contract (``tests/unit/test_context_store.py`` runs the same suite on
both): ``LanceRecordLog`` commits each batch as one LanceDB table version under a storage
URI (a local folder or object storage), so a batch is either wholly durable or absent after
a crash; ``MemoryRecordLog`` keeps rows in a list for the in-process executor and tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Protocol

import pyarrow as pa

TABLE = "records"
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
    def load(self) -> list[Record]: ...

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
        rows = self._table.to_arrow().to_pylist()
        return [Record(**r) for r in rows]

    def append(self, records: list[Record]) -> None:
        if records:
            self._table.add(pa.Table.from_pylist([asdict(r) for r in records], schema=SCHEMA))

    def compact(self) -> None:
        """Merge the small fragments that one-batch commits leave and drop old versions."""
        self._table.optimize(cleanup_older_than=timedelta(minutes=1))

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


def _quote(value: str) -> str:
    """``value`` as an SQL string literal (tenants and keys come from users)."""
    return "'" + value.replace("'", "''") + "'"
