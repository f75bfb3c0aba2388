"""Feature views scoped to tenants, and retried pushes counted once (issue 21 item 8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa
import pytest

from airi_ray.config import parse_spec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.features import (
    SHARED,
    Aggregation,
    FeatureIndex,
    FeatureView,
    validate_batch,
    view_scope,
)
from airi_ray.core.policy import PermissionDenied
from airi_ray.data.features import FeatureStore

NOW = 1_700_000_000.0
AGGS = [
    Aggregation("n", "customer", "count", 3600.0),
    Aggregation("spend", "amount", "sum", 3600.0),
]


def orders(**overrides: Any) -> FeatureView:
    return FeatureView(
        **{
            "name": "orders",
            "entity_key": "customer",
            "fields": {"amount": "float"},
            "aggregations": AGGS,
            "max_events_per_entity": 3,
        }
        | overrides
    )


def order(customer: Any = 7, amount: float = 1.0, ts: float = NOW - 10, **extra: Any) -> dict:
    return {"customer": customer, "ts": ts, "amount": amount, **extra}


def store(tmp_path: Path, *views: FeatureView) -> FeatureStore:
    return FeatureStore(tmp_path / "db", list(views) or [orders()], clock=lambda: NOW)


# -- the pure decisions ----------------------------------------------------------------------


def test_a_view_without_tenants_gives_each_tenant_its_own_scope() -> None:
    v = orders()
    assert view_scope(v, "tenant-a") == "tenant-a"
    assert view_scope(v, "tenant-b") == "tenant-b"


def test_a_shared_view_admits_the_tenants_its_globs_match_only() -> None:
    v = orders(tenants=["tenant-a", "team-*"])
    assert view_scope(v, "tenant-a") == SHARED
    assert view_scope(v, "team-red") == SHARED
    with pytest.raises(PermissionDenied) as e:
        view_scope(v, "tenant-b")
    assert e.value.status == 403 and e.value.code == "feature_view_not_allowed"
    assert "'orders'" in e.value.message and "tenant-a, team-*" in e.value.message


def test_tenants_must_be_names_or_globs() -> None:
    for bad in ("tenant-a", ["ok", ""], [3]):
        with pytest.raises(InvalidRequest, match="tenants must be a list"):
            orders(tenants=bad)


def test_event_ids_are_validated_and_reserved() -> None:
    v = orders()
    [e] = validate_batch(v, [order(event_id="e-1")], NOW)
    assert e.event_id == "e-1"
    assert validate_batch(v, [order(event_id=42)], NOW)[0].event_id == "42"
    assert validate_batch(v, [order()], NOW)[0].event_id is None
    for bad in ("", "x" * 257, 1.5, None, True):
        with pytest.raises(InvalidRequest, match="'event_id' must be a string of 1 to 256"):
            validate_batch(v, [order(event_id=bad)], NOW)
    with pytest.raises(InvalidRequest, match="unknown field 'evt'.*optional 'event_id'"):
        validate_batch(v, [order(evt="x")], NOW)
    with pytest.raises(InvalidRequest, match="'event_id' is reserved"):
        orders(fields={"amount": "float", "event_id": "str"})


def test_the_index_leaves_out_events_it_holds_and_forgets_dropped_ones() -> None:
    v = orders()
    index = FeatureIndex(v)
    first = validate_batch(v, [order(event_id="a", ts=NOW - 50), order(event_id="b")], NOW)
    assert index.fresh(first) == first
    index.add(first)
    again = validate_batch(
        v, [order(event_id="a"), order(event_id="c"), order(event_id="c"), order()], NOW
    )
    fresh = index.fresh(again)
    assert [e.event_id for e in fresh] == ["c", None]  # held, new, repeated, unnamed
    index.add(fresh)
    # Four events held but the cap keeps 3 per entity: the oldest ("a") went, and its id
    # is free again.
    assert index.features("7", NOW)["n"] == 3
    assert [e.event_id for e in index.fresh(first)] == ["a"]
    # Expiry drops everything held: every id is free.
    index.expire(NOW + 10 * v.horizon_s)
    assert index.fresh(first) == first


# -- the store -------------------------------------------------------------------------------


def test_each_tenant_reads_only_its_own_events_by_default(tmp_path: Path) -> None:
    fs = store(tmp_path)
    fs.push("orders", [order(7, 10.0), order(7, 5.0)], tenant="tenant-a")
    fs.push("orders", [order(7, 1.0)], tenant="tenant-b")
    assert fs.get_features("orders", [7], tenant="tenant-a")[7] == {"n": 2, "spend": 15.0}
    assert fs.get_features("orders", [7], tenant="tenant-b")[7] == {"n": 1, "spend": 1.0}
    assert fs.get_features("orders", [7], tenant="tenant-c")[7] == {"n": 0, "spend": 0}
    again = store(tmp_path)  # and after a restart
    assert again.get_features("orders", [7], tenant="tenant-a")[7] == {"n": 2, "spend": 15.0}
    assert again.get_features("orders", [7], tenant="tenant-b")[7] == {"n": 1, "spend": 1.0}
    assert again.stats("orders")["scopes"] == 2


def test_a_shared_view_is_shared_by_its_tenants_and_refuses_others(tmp_path: Path) -> None:
    fs = store(tmp_path, orders(tenants=["tenant-a", "tenant-b"]))
    fs.push("orders", [order(7, 10.0)], tenant="tenant-a")
    assert fs.get_features("orders", [7], tenant="tenant-b")[7]["spend"] == 10.0
    for call in (
        lambda: fs.push("orders", [order(7)], tenant="tenant-c"),
        lambda: fs.get_features("orders", [7], tenant="tenant-c"),
        lambda: fs.ingest_table("orders", pa.table({"customer": [7]}), tenant="tenant-c"),
    ):
        with pytest.raises(PermissionDenied, match="tenant 'tenant-c' may not use feature view"):
            call()
    assert fs.get_features("orders", [7], tenant="tenant-a")[7]["n"] == 1


def test_changing_a_views_scope_never_hands_one_tenants_events_to_another(
    tmp_path: Path,
) -> None:
    store(tmp_path).push("orders", [order(7, 10.0)], tenant="tenant-a")
    shared = store(tmp_path, orders(tenants=["*"]))
    assert shared.get_features("orders", [7], tenant="tenant-b")[7]["n"] == 0
    shared.push("orders", [order(7, 3.0)], tenant="tenant-b")
    private = store(tmp_path)
    assert private.get_features("orders", [7], tenant="tenant-a")[7]["spend"] == 10.0
    assert private.get_features("orders", [7], tenant="tenant-b")[7]["n"] == 0


def test_a_retried_push_is_stored_once_also_after_a_restart(tmp_path: Path) -> None:
    fs = store(tmp_path)
    batch = [order(7, 10.0, event_id="o-1"), order(7, 5.0, event_id="o-2")]
    assert fs.push("orders", batch, tenant="tenant-a") == 2
    assert fs.push("orders", batch, tenant="tenant-a") == 2  # the retry: same answer
    assert fs.get_features("orders", [7], tenant="tenant-a")[7] == {"n": 2, "spend": 15.0}
    assert int(fs._tables["orders"].count_rows()) == 2
    again = store(tmp_path)
    again.push("orders", batch + [order(7, 1.0, event_id="o-3")], tenant="tenant-a")
    assert again.get_features("orders", [7], tenant="tenant-a")[7] == {"n": 3, "spend": 16.0}
    # Event ids are the tenant's: tenant b's "o-1" is another event.
    again.push("orders", batch[:1], tenant="tenant-b")
    assert again.get_features("orders", [7], tenant="tenant-b")[7]["n"] == 1
    assert int(again._tables["orders"].count_rows()) == 4


def test_a_table_from_before_tenants_serves_its_events_as_the_apps(tmp_path: Path) -> None:
    db = lancedb.connect(str(tmp_path / "db"))
    old = pa.schema([("_entity", pa.string()), ("_ts", pa.float64()), ("_seq", pa.int64())])
    old = old.append(pa.field("amount", pa.float64()))
    table = db.create_table("features_orders", schema=old)
    table.add(pa.table({"_entity": ["7"], "_ts": [NOW - 5], "_seq": [0], "amount": [4.0]}))
    shared = store(tmp_path, orders(tenants=["*"]))
    assert shared.get_features("orders", [7], tenant="tenant-a")[7]["spend"] == 4.0
    shared.push("orders", [order(7, 1.0, event_id="x")], tenant="tenant-a")
    assert store(tmp_path, orders(tenants=["*"])).stats("orders")["events"] == 2
    # Per tenant (the default), the app's old events are no tenant's.
    assert store(tmp_path).get_features("orders", [7], tenant="tenant-a")[7]["n"] == 0


def test_compaction_drops_capped_events_of_the_right_tenant(tmp_path: Path) -> None:
    fs = store(tmp_path)
    fs.push("orders", [order(7, float(i), ts=NOW - 50 + i) for i in range(5)], tenant="tenant-a")
    fs.push("orders", [order(7, 9.0)], tenant="tenant-b")
    fs.compact()
    again = store(tmp_path)
    assert again.get_features("orders", [7], tenant="tenant-a")[7] == {"n": 3, "spend": 9.0}
    assert again.get_features("orders", [7], tenant="tenant-b")[7] == {"n": 1, "spend": 9.0}


# -- the spec --------------------------------------------------------------------------------


def _spec(tenants: Any) -> Any:
    view = {
        "name": "orders",
        "entity_key": "customer",
        "fields": {"amount": "float"},
        "aggregations": [{"name": "n", "field": "amount", "fn": "count", "window": "1h"}],
        "tenants": tenants,
    }
    return parse_spec({"features": [view]})


def test_the_spec_takes_tenant_globs_and_refuses_bad_ones() -> None:
    from airi_ray.runtime.feature_server import feature_view

    assert feature_view(_spec(["tenant-a", "team-*"]).features[0]).tenants == (
        "tenant-a",
        "team-*",
    )
    assert feature_view(_spec([]).features[0]).tenants == ()
    for bad in ([""], ["two words"], ["x" * 65]):
        with pytest.raises(InvalidRequest, match="a tenant pattern is a tenant name or a glob"):
            _spec(bad)
