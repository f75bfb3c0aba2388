"""The feature store on a real LanceDB in a temp dir: batches, restarts, tables, compaction."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.core.features import Aggregation, FeatureView
from airi_ray.data.features import FeatureStore

NOW = 1_700_000_000.0

CLICKS = FeatureView(
    name="clicks",
    entity_key="user_id",
    fields={"amount": "float", "page": "str"},
    transforms={"big": "amount > 10"},
    aggregations=[
        Aggregation("n_5m", "user_id", "count", 300.0),
        Aggregation("sum_1h", "amount", "sum", 3600.0),
        Aggregation("big_1h", "big", "sum", 3600.0),
        Aggregation("page_last", "page", "last", 86_400.0),
    ],
    ttl_s=600.0,
)
ORDERS = FeatureView(
    name="orders",
    entity_key="order_user",
    fields={"total": "float"},
    aggregations=[Aggregation("max_1d", "total", "max", 86_400.0)],
    max_events_per_entity=2,
)


def click(
    user: str = "u1", ts: float = NOW - 10, amount: float = 1.0, page: str = "/"
) -> dict[str, Any]:
    return {"user_id": user, "ts": ts, "amount": amount, "page": page}


def store(tmp_path: Path, views: list[FeatureView] | None = None) -> FeatureStore:
    return FeatureStore(tmp_path / "db", views or [CLICKS, ORDERS], clock=lambda: NOW)


def rows(fs: FeatureStore, view: str) -> int:
    return int(fs._tables[view].count_rows())


def test_push_then_lookup_now_and_as_of(tmp_path: Path) -> None:
    fs = store(tmp_path)
    assert fs.views == ["clicks", "orders"]
    n = fs.push(
        "clicks",
        [
            click(ts=NOW - 100, amount=20.0, page="/a"),
            click(ts=NOW - 5, amount=2.0, page="/b"),
            click("u2"),
        ],
        tenant="t1",
    )
    assert n == 3 and rows(fs, "clicks") == 3
    got = fs.get_features("clicks", ["u1", "u2", "nobody"], tenant="t1")
    assert got["u1"] == {"n_5m": 2, "sum_1h": 22.0, "big_1h": 1, "page_last": "/b"}
    assert got["u2"]["n_5m"] == 1
    assert got["nobody"] == {"n_5m": 0, "sum_1h": 0, "big_1h": 0, "page_last": None}
    # As of a past time the later events are not seen.
    assert fs.get_features("clicks", ["u1"], as_of=NOW - 50, tenant="t1")["u1"] == {
        "n_5m": 1,
        "sum_1h": 20.0,
        "big_1h": 1,
        "page_last": "/a",
    }


def test_a_restart_serves_the_same_features(tmp_path: Path) -> None:
    fs = store(tmp_path)
    fs.push(
        "clicks", [click(ts=NOW - 30, amount=5.0, page="/x"), click("u2", ts=NOW - 20)], tenant="t1"
    )
    # Out of order and with an equal time: arrival order decides "last" after the restart too.
    fs.push(
        "clicks",
        [click(ts=NOW - 40, amount=7.0, page="/y"), click(ts=NOW - 30, amount=1.0, page="/z")],
        tenant="t1",
    )
    fs.push("orders", [{"order_user": 9, "ts": NOW - 1, "total": 12.5}], tenant="t1")
    before = {v: fs.get_features(v, ["u1", "u2", "9", 9], tenant="t1") for v in fs.views}
    before_past = fs.get_features("clicks", ["u1"], as_of=NOW - 35, tenant="t1")
    assert before["clicks"]["u1"]["page_last"] == "/z"

    again = store(tmp_path)
    assert {
        v: again.get_features(v, ["u1", "u2", "9", 9], tenant="t1") for v in again.views
    } == before
    assert again.get_features("clicks", ["u1"], as_of=NOW - 35, tenant="t1") == before_past
    # New arrivals continue the sequence rather than reusing it.
    assert again.stats("clicks") == {"entities": 2, "events": 4, "scopes": 1, "next_seq": 4}
    again.push("clicks", [click(ts=NOW - 30, amount=0.0, page="/after")], tenant="t1")
    assert (
        store(tmp_path).get_features("clicks", ["u1"], as_of=NOW - 30, tenant="t1")["u1"][
            "page_last"
        ]
        == "/after"
    )


def test_a_bad_batch_writes_nothing(tmp_path: Path) -> None:
    fs = store(tmp_path)
    fs.push("clicks", [click()], tenant="t1")
    before = fs.get_features("clicks", ["u1"], tenant="t1")
    bad = [click(amount=100.0), click(ts="not a time"), {"ts": NOW, "amount": 1.0, "page": "/"}]
    with pytest.raises(InvalidRequest) as err:
        fs.push("clicks", bad, tenant="t1")
    assert err.value.message.startswith("2 of 3 events for view 'clicks' are invalid")
    assert (
        "event 1: 'ts'" in err.value.message
        and "event 2: missing entity key 'user_id'" in err.value.message
    )
    assert rows(fs, "clicks") == 1
    assert fs.get_features("clicks", ["u1"], tenant="t1") == before
    assert store(tmp_path).get_features("clicks", ["u1"], tenant="t1") == before


def test_events_from_the_future_are_refused(tmp_path: Path) -> None:
    fs = store(tmp_path)
    with pytest.raises(InvalidRequest, match="s in the future; allowed: at most 60 s after now"):
        fs.push("clicks", [click(ts=NOW + 3600)], tenant="t1")
    assert rows(fs, "clicks") == 0


def test_unknown_view_is_not_found_and_lists_the_views(tmp_path: Path) -> None:
    fs = store(tmp_path)
    for call in (
        lambda: fs.get_features("clickz", ["u1"], tenant="t1"),
        lambda: fs.push("clickz", [click()], tenant="t1"),
        lambda: fs.ingest_table("clickz", pa.table({"x": [1]}), tenant="t1"),
    ):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.message == "no feature view 'clickz'; known views: clicks, orders"
        assert err.value.status == 404


def test_a_bad_as_of_or_entity_id_is_refused(tmp_path: Path) -> None:
    fs = store(tmp_path)
    with pytest.raises(InvalidRequest, match="as_of must be a finite number of seconds"):
        fs.get_features("clicks", ["u1"], as_of=float("nan"), tenant="t1")
    with pytest.raises(
        InvalidRequest, match="an entity id must be a non-empty string or an integer"
    ):
        fs.get_features("clicks", [1.5], tenant="t1")


def test_empty_batch_writes_nothing(tmp_path: Path) -> None:
    fs = store(tmp_path)
    assert fs.push("clicks", [], tenant="t1") == 0
    assert rows(fs, "clicks") == 0


def test_ingest_an_arrow_table_and_a_parquet_file(tmp_path: Path) -> None:
    fs = store(tmp_path)
    when = datetime.fromtimestamp(NOW - 60, tz=UTC)
    table = pa.table(
        {
            "user_id": ["u1", "u2"],
            "ts": pa.array([when, when], pa.timestamp("ms", tz="UTC")),
            "amount": [3.0, 40.0],
            "page": ["/t", "/t"],
        }
    )
    assert fs.ingest_table("clicks", table, tenant="t1") == 2
    path = tmp_path / "clicks.parquet"
    naive = table.set_column(1, "ts", pa.array([when.replace(tzinfo=None)] * 2, pa.timestamp("us")))
    pq.write_table(naive, path)
    assert fs.ingest_table("clicks", path, tenant="t1") == 2
    assert fs.ingest_table("clicks", str(path), tenant="t1") == 2
    got = fs.get_features("clicks", ["u1", "u2"], tenant="t1")
    assert got["u1"]["sum_1h"] == 9.0 and got["u2"]["big_1h"] == 3
    assert (
        fs.get_features("clicks", ["u1"], as_of=NOW - 61, tenant="t1")["u1"]["n_5m"] == 0
    )  # naive = UTC


def test_ingest_a_bad_table_writes_nothing(tmp_path: Path) -> None:
    fs = store(tmp_path)
    extra = pa.table(
        {"user_id": ["u1"], "ts": [NOW], "amount": [1.0], "page": ["/"], "referrer": ["x"]}
    )
    with pytest.raises(InvalidRequest, match="unknown field 'referrer'"):
        fs.ingest_table("clicks", extra, tenant="t1")
    nulls = pa.table(
        {"user_id": ["u1", "u2"], "ts": [NOW, None], "amount": [1.0, 2.0], "page": ["/", "/"]}
    )
    with pytest.raises(InvalidRequest, match="event 1: 'ts' must be a number of seconds"):
        fs.ingest_table("clicks", nulls, tenant="t1")
    with pytest.raises(InvalidRequest, match="cannot read Parquet file"):
        fs.ingest_table("clicks", tmp_path / "missing.parquet", tenant="t1")
    assert rows(fs, "clicks") == 0


def test_compact_drops_expired_and_over_cap_events_everywhere(tmp_path: Path) -> None:
    fs = store(tmp_path)
    # clicks keep 86,400 + 600 s; orders keep the latest 2 per user.
    fs.push("clicks", [click(ts=NOW - 90_000), click(ts=NOW - 100, amount=4.0)], tenant="t1")
    fs.push(
        "orders",
        [{"order_user": "a", "ts": NOW - 30 + i, "total": float(i)} for i in range(5)],
        tenant="t1",
    )
    fs.push("orders", [{"order_user": "b", "ts": NOW - 5, "total": 1.0}], tenant="t1")
    assert fs.stats("orders")["events"] == 3  # the cap applies in memory at once
    assert fs.get_features("orders", ["a"], tenant="t1")["a"]["max_1d"] == 4.0
    later = NOW + 1000
    assert fs.compact(now=later) == 1  # the expired click
    assert rows(fs, "clicks") == 1 and rows(fs, "orders") == 3
    after = fs.get_features("clicks", ["u1"], as_of=later, tenant="t1")["u1"]
    assert after["sum_1h"] == 4.0 and after["n_5m"] == 0  # the kept click is 1,100 s old
    restarted = FeatureStore(tmp_path / "db", [CLICKS, ORDERS], clock=lambda: later)
    assert restarted.get_features("orders", ["a", "b"], tenant="t1") == fs.get_features(
        "orders", ["a", "b"], tenant="t1"
    )
    assert restarted.stats("clicks")["events"] == 1


def test_a_view_whose_fields_changed_is_refused_with_a_hint(tmp_path: Path) -> None:
    store(tmp_path).push("clicks", [click()], tenant="t1")
    changed = FeatureView(
        "clicks", "user_id", {"amount": "int"}, [Aggregation("s", "amount", "sum", 60.0)]
    )
    with pytest.raises(InvalidRequest, match="use a new view name for new fields"):
        FeatureStore(tmp_path / "db", [changed], clock=lambda: NOW)


def test_duplicate_view_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="feature view names must be unique"):
        FeatureStore(tmp_path / "db", [CLICKS, CLICKS])


def test_a_quote_in_an_entity_id_is_stored_and_compacted_safely(tmp_path: Path) -> None:
    fs = store(tmp_path)
    fs.push(
        "orders",
        [{"order_user": "o'brien", "ts": NOW - 10 + i, "total": float(i)} for i in range(4)],
        tenant="t1",
    )
    fs.compact()
    assert rows(fs, "orders") == 2
    assert (
        store(tmp_path).get_features("orders", ["o'brien"], tenant="t1")["o'brien"]["max_1d"] == 3.0
    )
