"""``FeatureServer``: the app's feature views, served online from one actor.

Every call names the tenant it is for: a view's events are each tenant's own unless the
view's ``tenants`` share them (``core.features.view_scope``). The actor owns the ``FeatureStore`` (the single writer of its LanceDB tables, under the
app's storage URI): pushed events are validated as a batch and committed in one write before
they count, and lookups are answered from memory. A restarted actor reloads the tables. Heavy
work (a commit, a Parquet ingest, compaction) runs in a thread under a lock, so lookups keep
being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from airi_ray.config import FeatureViewSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.features import Aggregation, FeatureView, view_scope
from airi_ray.data.features import FeatureStore
from airi_ray.runtime.cluster_kv import saved_spec

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_PUSH = 10_000
MAX_ENTITIES_PER_LOOKUP = 1_000
COMPACT_PERIOD_S = 600.0


def feature_view(spec: FeatureViewSpec) -> FeatureView:
    return FeatureView(
        name=spec.name,
        entity_key=spec.entity_key,
        timestamp_field=spec.timestamp_field,
        fields=dict(spec.fields),
        transforms=dict(spec.transforms),
        aggregations=[Aggregation(a.name, a.field, a.fn, a.window_s()) for a in spec.aggregations],
        ttl_s=spec.ttl_s,
        tenants=tuple(spec.tenants),
    )


class FeatureServer:
    """Feature views under ``uri``; ``configure`` sets the views of the deployed spec."""

    def __init__(self, uri: str, views: list[dict[str, Any]]) -> None:
        self._uri = uri.rstrip("/") + "/features"
        spec = saved_spec()  # a restarted actor serves the views deployed last
        if spec is not None:
            views = [f.model_dump() for f in spec.features]
        self._store = self._open(views)
        self._write = asyncio.Lock()
        self._compacted_at = time.time()

    def _open(self, views: list[dict[str, Any]]) -> FeatureStore:
        specs = [FeatureViewSpec.model_validate(v) for v in views]
        return FeatureStore(self._uri, [feature_view(s) for s in specs])

    async def configure(self, views: list[dict[str, Any]]) -> list[str]:
        """Serve these views (a changed view's events are reloaded from its table)."""
        async with self._write:
            self._store = await asyncio.to_thread(self._open, views)
        return self._store.views

    def views(self) -> list[str]:
        return self._store.views

    async def push(self, tenant: str, view: str, events: list[Any]) -> int:
        """Validate and store a batch of events as ``tenant``'s; all or nothing. Returns
        how many (an event with an ``event_id`` stored before counts, and is not stored
        again).

        Raises:
            NotFound: no such view.
            PermissionDenied: the view is shared by other tenants only.
            InvalidRequest: a malformed event (the message names it) or too many events.
        """
        if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_PUSH:
            raise InvalidRequest(f"events must be a list of at most {MAX_EVENTS_PER_PUSH} events")
        view_scope(self._store.view(view), tenant)  # NotFound, 403 before taking the lock
        async with self._write:
            n = await asyncio.to_thread(
                functools.partial(self._store.push, view, events, tenant=tenant)
            )
            if time.time() - self._compacted_at > COMPACT_PERIOD_S:
                self._compacted_at = time.time()
                await asyncio.to_thread(self._store.compact)
        return n

    async def ingest_table(self, tenant: str, view: str, path: str) -> int:
        """Push the rows of a Parquet file (readable from this actor's node) as one batch,
        as ``tenant``'s."""
        async with self._write:
            return await asyncio.to_thread(
                functools.partial(self._store.ingest_table, view, path, tenant=tenant)
            )

    def get(
        self, tenant: str, view: str, entity_ids: list[Any], as_of: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features as of ``as_of`` (default now), keyed by entity id, from
        the events ``tenant`` may see: its own, or a shared view's.

        Raises:
            NotFound: no such view.
            PermissionDenied: the view is shared by other tenants only.
            InvalidRequest: too many ids, a bad id or a bad ``as_of``.
        """
        if not isinstance(entity_ids, list) or not 0 < len(entity_ids) <= MAX_ENTITIES_PER_LOOKUP:
            raise InvalidRequest(f"entity ids must be a list of 1 to {MAX_ENTITIES_PER_LOOKUP} ids")
        found = self._store.get_features(view, entity_ids, as_of, tenant=tenant)
        return {str(k): v for k, v in found.items()}
