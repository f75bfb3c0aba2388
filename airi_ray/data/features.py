"""The feature store: feature-view events in LanceDB, served from an in-memory index.

Each ``FeatureView`` has one LanceDB table (``features_<view>``) holding its raw events:
``_entity``, ``_ts`` (epoch seconds), ``_seq`` (arrival number), one typed column per
declared field, then ``_tenant`` (the scope: the pushing tenant in a per-tenant view, ``''``
in a shared one) and ``_event_id`` (the event's id, if it has one). Transforms are not
stored; they are recomputed from the raw fields when the table is loaded, like on arrival.
A table written before the last two columns existed gains them (its events as shared).

Tenants: every call names its tenant, and ``core.features.view_scope`` decides whose events
it pushes and reads (one in-memory index per scope). A view that changes from per-tenant to
shared, or back, serves none of the events stored under the other kind of scope: events
pushed as one tenant's never become another's.

Event ids: an event whose id the view's index holds (in the same scope) is not stored again,
so a retried push counts once, also after a restart (the ids are loaded with the events).

- ``push`` validates the whole batch first (``airi_ray.core.features.validate_batch``), then
  appends it as one LanceDB commit, then adds it to the in-memory ``FeatureIndex``. A bad
  event rejects the batch with nothing written; a failed commit leaves memory untouched.
- ``get_features`` answers from memory only: no I/O on the lookup path.
- On start every table is read back in arrival order, so a restart serves the same
  features (events past the retention horizon at that time are dropped from memory).
- ``compact`` drops expired events and those past the per-entity cap from memory and from
  the tables, then merges the small fragments that one-batch commits leave.

Not thread-safe: one owner (an actor) calls it. The clock is ``clock()`` unless a call
passes ``now``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.core.features import (
    EVENT_ID,
    SHARED,
    FeatureIndex,
    FeatureView,
    NormalisedEvent,
    Value,
    validate_batch,
    view_scope,
)

__all__ = ["FeatureStore"]

_ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(), "bool": pa.bool_()}
_UNITS_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_DELETE_CHUNK = 500  # entities per delete predicate, to keep the SQL short


def table_name(view: str) -> str:
    return f"features_{view}"


_SCOPE_COLUMNS = (("_tenant", pa.string()), ("_event_id", pa.string()))
# How a table written before the scope columns gains them: its events were the app's.
_MIGRATION = {"_tenant": "''", "_event_id": "CAST(NULL AS STRING)"}


def schema(view: FeatureView) -> pa.Schema:
    """The table schema of ``view``: bookkeeping columns, the declared fields, then the
    scope and event id (last, where LanceDB adds them to an older table)."""
    return pa.schema(
        [
            ("_entity", pa.string()),
            ("_ts", pa.float64()),
            ("_seq", pa.int64()),
            *((name, _ARROW_TYPES[ftype]) for name, ftype in view.fields.items()),
            *_SCOPE_COLUMNS,
        ]
    )


def _columns(s: pa.Schema) -> list[tuple[str, pa.DataType]]:
    """Names and types (a column added to an old table may differ in nullability only)."""
    return [(f.name, f.type) for f in s]


class FeatureStore:
    """Feature views over LanceDB under ``uri`` (a local folder or object storage).

    Args:
        uri: the LanceDB storage URI.
        views: the declared views; their tables are created or loaded.
        clock: the current time in epoch seconds, when a call passes no ``now``.
        storage_options: passed to LanceDB (object-storage credentials and the like).

    Raises:
        InvalidRequest: two views share a name, or a view's stored table has other
            columns than it declares now (its fields changed).
    """

    def __init__(
        self,
        uri: str | Path,
        views: Sequence[FeatureView],
        *,
        clock: Callable[[], float] = time.time,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        names = [v.name for v in views]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"feature view names must be unique, got {', '.join(names)}")
        self.uri = str(uri)
        self.clock = clock
        self._db = lancedb.connect(self.uri, storage_options=dict(storage_options or {}))
        self._views = {v.name: v for v in views}
        self._tables: dict[str, Any] = {}
        self._indexes: dict[str, dict[str, FeatureIndex]] = {}  # view -> scope -> index
        self._next_seq: dict[str, int] = {}
        now = clock()
        for v in views:
            self._open(v, now)

    def _open(self, view: FeatureView, now: float) -> None:
        expected = schema(view)
        try:
            table = self._db.open_table(table_name(view.name))
        except ValueError:  # not created yet (lancedb raises ValueError for a missing table)
            table = self._db.create_table(table_name(view.name), schema=expected, exist_ok=True)
        older = _columns(expected)[: -len(_SCOPE_COLUMNS)]
        if _columns(table.schema) == older:  # written before the scope columns
            table.add_columns(_MIGRATION)
        if _columns(table.schema) != _columns(expected):
            held = [n for n in table.schema.names[3:] if n not in dict(_SCOPE_COLUMNS)]
            raise InvalidRequest(
                f"feature view {view.name!r} declares fields {dict(view.fields)} but its table "
                f"{table_name(view.name)!r} under {self.uri} holds {held}; "
                "use a new view name for new fields (or drop the table)"
            )
        rows = table.to_arrow().sort_by("_seq")
        self._tables[view.name] = table
        self._indexes[view.name] = {}
        shared = bool(view.tenants)
        for scope in pc.unique(rows["_tenant"]).to_pylist():
            if (scope == SHARED) != shared:
                continue  # stored under the other kind of scope: not served (see above)
            index = self._index(view.name, scope)
            index.add(_events(view, rows.filter(pc.equal(rows["_tenant"], scope))))
            index.expire(now)
        self._next_seq[view.name] = rows["_seq"][-1].as_py() + 1 if rows.num_rows else 0

    def _index(self, view: str, scope: str) -> FeatureIndex:
        indexes = self._indexes[view]
        index = indexes.get(scope)
        if index is None:
            index = indexes[scope] = FeatureIndex(self._views[view])
        return index

    # -- views ------------------------------------------------------------------------------

    @property
    def views(self) -> list[str]:
        """Names of the views, sorted."""
        return sorted(self._views)

    def view(self, name: str) -> FeatureView:
        """The declared view ``name``.

        Raises:
            NotFound: no such view; the message lists the known ones.
        """
        v = self._views.get(name)
        if v is None:
            raise NotFound(
                f"no feature view {name!r}; known views: {', '.join(self.views) or 'none'}"
            )
        return v

    def stats(self, name: str) -> dict[str, int]:
        """Entities and events held in memory for view ``name`` (every scope), its scopes,
        and the next arrival number."""
        indexes = self._indexes[self.view(name).name].values()
        return {
            "entities": sum(len(i) for i in indexes),
            "events": sum(i.events for i in indexes),
            "scopes": len(indexes),
            "next_seq": self._next_seq[name],
        }

    # -- writes -----------------------------------------------------------------------------

    def push(
        self, view: str, events: Iterable[object], now: float | None = None, *, tenant: str
    ) -> int:
        """Validate ``events`` for ``view`` and store them together, as ``tenant``'s;
        returns how many the batch holds. An event whose ``event_id`` is held already
        (a retried push) is not stored again, and still counts: a retry gets the answer
        the first push got.

        Raises:
            NotFound: no such view.
            PermissionDenied: the view is shared by other tenants only.
            InvalidRequest: an event is invalid; none of the batch is stored.
        """
        v = self.view(view)
        scope = view_scope(v, tenant)
        now = self.clock() if now is None else now
        batch = validate_batch(v, events, now)
        index = self._index(view, scope)
        new = index.fresh(batch)
        if not new:
            return len(batch)
        first = self._next_seq[view]
        columns: dict[str, list[Any]] = {
            "_entity": [e.entity for e in new],
            "_ts": [e.ts for e in new],
            "_seq": list(range(first, first + len(new))),
        }
        for name in v.fields:
            columns[name] = [e.values[name] for e in new]
        columns["_tenant"] = [scope] * len(new)
        columns["_event_id"] = [e.event_id for e in new]
        # One commit: after a crash the batch is either wholly in the table or absent.
        self._tables[view].add(pa.Table.from_pydict(columns, schema=schema(v)))
        self._next_seq[view] = first + len(new)
        index.add(new)
        return len(batch)

    def ingest_table(
        self,
        view: str,
        source: pa.Table | str | Path,
        now: float | None = None,
        *,
        tenant: str,
    ) -> int:
        """Push the rows of an Arrow table or a Parquet file as one batch; returns how many.

        A timestamp column of Arrow timestamp type is read as UTC when it has no timezone.
        Every column must be a field of the view (select the columns first).

        Raises:
            NotFound: no such view.
            PermissionDenied: the view is shared by other tenants only.
            InvalidRequest: the file cannot be read, or a row is invalid (rows are
                numbered from 0 in the messages, as "event N"); nothing is stored.
        """
        v = self.view(view)
        view_scope(v, tenant)  # refused before the file is read
        if isinstance(source, pa.Table):
            table = source
        else:
            try:
                table = pq.read_table(source)
            except (OSError, pa.ArrowInvalid) as e:
                raise InvalidRequest(f"cannot read Parquet file {str(source)!r}: {e}") from None
        ts = v.timestamp_field
        if ts in table.column_names and pa.types.is_timestamp(table.schema.field(ts).type):
            column = table[ts]
            # Arrow stores timestamps as UTC counts of the unit, with or without a timezone.
            seconds = [
                None if n is None else n / _UNITS_PER_S[column.type.unit]
                for n in column.cast(pa.int64()).to_pylist()
            ]
            table = table.set_column(
                table.column_names.index(ts), ts, pa.array(seconds, pa.float64())
            )
        return self.push(view, table.to_pylist(), now, tenant=tenant)

    # -- reads ------------------------------------------------------------------------------

    def get_features(
        self,
        view: str,
        entity_ids: Iterable[object],
        as_of: float | None = None,
        *,
        tenant: str,
    ) -> dict[Any, dict[str, Value | None]]:
        """The features of each entity as of ``as_of`` (default: now), keyed by the ids as
        given, from the events ``tenant`` may see (its own, or a shared view's). Only
        events with ``ts <= as_of`` are seen; an unknown entity gets empty values (count
        and sum 0, the others None).

        Raises:
            NotFound: no such view.
            PermissionDenied: the view is shared by other tenants only.
            InvalidRequest: ``as_of`` is not a finite number, or an id is not a non-empty
                string or an integer.
        """
        v = self.view(view)
        index = self._indexes[v.name].get(view_scope(v, tenant)) or FeatureIndex(v)
        if as_of is not None and not (
            isinstance(as_of, int | float) and not isinstance(as_of, bool) and math.isfinite(as_of)
        ):
            raise InvalidRequest(
                f"as_of must be a finite number of seconds since the epoch, got {as_of!r}"
            )
        at = self.clock() if as_of is None else float(as_of)
        return {e: index.features(e, at) for e in entity_ids}

    # -- maintenance ------------------------------------------------------------------------

    def compact(self, now: float | None = None) -> int:
        """Drop expired and over-cap events from memory and storage, then merge fragments.

        Call it periodically. Returns how many events left the in-memory indexes.
        """
        now = self.clock() if now is None else now
        dropped = 0
        for name, v in self._views.items():
            table = self._tables[name]
            horizon = now - v.horizon_s
            if horizon > float("-inf"):
                table.delete(f"_ts <= {horizon!r}")
            for scope, index in self._indexes[name].items():
                before = index.events
                index.expire(now)
                evicted = sorted(index.take_evicted().items())
                for i in range(0, len(evicted), _DELETE_CHUNK):
                    # Rows older than an entity's oldest kept event were dropped by the cap
                    # (a row at exactly that time may stay; loading drops it again).
                    table.delete(
                        f"_tenant = {_quote(scope)} AND ("
                        + " OR ".join(
                            f"(_entity = {_quote(e)} AND _ts < {t!r})"
                            for e, t in evicted[i : i + _DELETE_CHUNK]
                        )
                        + ")"
                    )
                dropped += before - index.events
            table.optimize(cleanup_older_than=timedelta(minutes=1))
        return dropped


def _events(view: FeatureView, rows: pa.Table) -> list[NormalisedEvent]:
    """Stored rows back into events (transforms recomputed), in arrival order."""
    entities, times = rows["_entity"].to_pylist(), rows["_ts"].to_pylist()
    ids = rows["_event_id"].to_pylist()
    fields = rows.select(list(view.fields)).to_pylist()
    stored = [
        {view.entity_key: e, view.timestamp_field: t, **f} | ({EVENT_ID: i} if i else {})
        for e, t, f, i in zip(entities, times, fields, ids, strict=True)
    ]
    # Stored rows passed validation once; only the clock-skew check must not apply now.
    return validate_batch(view, stored, now=float("inf"))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
