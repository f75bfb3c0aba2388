"""The scheduler's usage records (``core.accounting.UsageRecord``), durable in LanceDB.

One table (``usage``) under the app's storage URI, beside the context store's records and
the controller's state. The scheduler appends a batch at a time (each batch one table
version: all of it or none after a crash), reads back what a rebuild needs after a
restart (``load(since)``), and deletes what no rebuild needs any more (``prune``).
Appends leave a fragment each, so ``compact`` merges them now and then.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc

from airi_ray.core.accounting import UsageRecord

TABLE = "usage"
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("admitted_at", pa.float64()),
        ("at", pa.float64()),
    ]
)
_FIELDS = SCHEMA.names


class UsageLog:
    """Usage records in one LanceDB table under ``uri`` (a local folder or object storage)."""

    def __init__(self, uri: str) -> None:
        import lancedb

        self.uri = uri
        db = lancedb.connect(uri)
        try:
            self._table = db.open_table(TABLE)
        except ValueError:  # not created yet (lancedb raises ValueError for a missing table)
            self._table = db.create_table(TABLE, schema=SCHEMA, exist_ok=True)

    def append(self, records: list[UsageRecord]) -> None:
        """Make ``records`` durable together (one commit), or raise with none written."""
        if not records:
            return
        columns = list(zip(*records, strict=True))
        self._table.add(pa.Table.from_arrays([list(c) for c in columns], schema=SCHEMA))

    def load(self, since: float = float("-inf")) -> list[UsageRecord]:
        """The records made at or after ``since`` (wall-clock seconds), in no order."""
        table = self._table
        if since == float("-inf"):
            rows = table.to_arrow()
        else:
            rows = table.search().where(f"at >= {float(since)!r}").limit(None).to_arrow()
        cols = [rows.column(n).to_pylist() for n in _FIELDS]
        return [UsageRecord(*values) for values in zip(*cols, strict=True)]

    def budget_totals(self, windows: Mapping[str, float], before: float) -> dict[str, int]:
        """Per tenant of ``windows``: the tokens of its ``settle`` records made from its
        window's start up to ``before``, summed by the storage (a day of records is not
        read one by one). A batch written twice counts twice here."""
        if not windows:
            return {}
        lo = min(windows.values())
        rows = (
            self._table.search()
            .where(f"kind = 'settle' AND at >= {float(lo)!r} AND at < {float(before)!r}")
            .select(["tenant", "prompt_tokens", "completion_tokens", "at"])
            .limit(None)
            .to_arrow()
        )
        tokens = pc.add(rows.column("prompt_tokens"), rows.column("completion_tokens"))
        out = {}
        for tenant, start in windows.items():
            mask = pc.and_(
                pc.equal(rows.column("tenant"), tenant),
                pc.greater_equal(rows.column("at"), start),
            )
            total = pc.sum(pc.filter(tokens, mask)).as_py()
            if total:
                out[tenant] = int(total)
        return out

    def prune(self, before: float) -> None:
        """Delete the records made before ``before`` (wall-clock seconds)."""
        self._table.delete(f"at < {float(before)!r}")

    def compact(self) -> None:
        """Merge the small fragments one-batch commits leave and drop old table versions."""
        self._table.optimize(cleanup_older_than=timedelta(minutes=1))

    def count(self) -> int:
        return int(self._table.count_rows())
