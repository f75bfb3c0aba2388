"""The controller's durable state: named JSON documents in one LanceDB table.

The controller keeps its registry (model versions and their states), rollout progress,
autoscaler state and replica records here, under the app's storage URI, so a restarted
controller picks up where the killed one stopped. ``save`` writes the documents that
changed as one commit (one table version: all of them or none after a crash); ``load``
reads the latest of each. Every ``COMPACT_EVERY`` commits the table is rewritten with only
the latest documents, so it stays small however long the app runs.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

TABLE = "control"
SCHEMA = pa.schema([("key", pa.string()), ("seq", pa.int64()), ("body", pa.string())])
COMPACT_EVERY = 200


class ControlState:
    """Documents by key, durable in LanceDB at ``uri`` (in memory only with ``uri=None``)."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._table: Any = None
        if uri is not None:
            import lancedb

            db = lancedb.connect(uri)
            try:
                self._table = db.open_table(TABLE)
            except ValueError:  # not created yet
                self._table = db.create_table(TABLE, schema=SCHEMA, exist_ok=True)
        self._docs: dict[str, str] = {}  # key -> JSON, as last written
        self._seq = 0
        self._commits = 0

    def load(self) -> dict[str, Any]:
        """The latest value of every document (deleted ones left out)."""
        if self._table is not None:
            latest: dict[str, tuple[int, str]] = {}
            for row in self._table.to_arrow().to_pylist():
                if row["key"] not in latest or row["seq"] > latest[row["key"]][0]:
                    latest[row["key"]] = (row["seq"], row["body"])
            self._seq = max((s for s, _ in latest.values()), default=0)
            self._docs = {k: body for k, (_, body) in latest.items() if body != "null"}
        return {k: json.loads(v) for k, v in self._docs.items()}

    def save(self, docs: dict[str, Any]) -> bool:
        """Write the documents whose value changed (``None`` deletes one) in one commit.

        Returns whether anything was written. Raises whatever the storage raises, with
        nothing written; the in-memory copy changes only after the commit.
        """
        changed = {k: json.dumps(v, sort_keys=True) for k, v in docs.items()}
        changed = {k: v for k, v in changed.items() if self._docs.get(k, "null") != v}
        if not changed:
            return False
        rows = [
            {"key": k, "seq": self._seq + i + 1, "body": body}
            for i, (k, body) in enumerate(changed.items())
        ]
        if self._table is not None:
            self._table.add(pa.Table.from_pylist(rows, schema=SCHEMA))
        self._seq += len(rows)
        for k, body in changed.items():
            if body == "null":
                self._docs.pop(k, None)
            else:
                self._docs[k] = body
        self._commits += 1
        if self._table is not None and self._commits % COMPACT_EVERY == 0:
            self._compact()
        return True

    def _compact(self) -> None:
        """Rewrite the table with the latest documents only (one atomic overwrite)."""
        rows = [{"key": k, "seq": self._seq, "body": body} for k, body in self._docs.items()]
        self._table.add(pa.Table.from_pylist(rows, schema=SCHEMA), mode="overwrite")
