"""Feature views, event validation and windowed aggregations of the pure core (fake clock)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.features import (
    Aggregation,
    FeatureIndex,
    FeatureView,
    validate_batch,
    validate_event,
)

NOW = 1_700_000_000.0
FNS = ("count", "sum", "mean", "min", "max", "last")


def view(**overrides: Any) -> FeatureView:
    spec: dict[str, Any] = {
        "name": "purchases",
        "entity_key": "user_id",
        "fields": {"amount": "float", "items": "int", "country": "str", "gift": "bool"},
        "aggregations": [Aggregation(f"{fn}_5m", "amount", fn, 300.0) for fn in FNS],
    }
    spec.update(overrides)
    return FeatureView(**spec)


def event(
    user: str | int = "u1", ts: Any = NOW, amount: float = 1.0, **extra: Any
) -> dict[str, Any]:
    return {
        "user_id": user,
        "ts": ts,
        "amount": amount,
        "items": 1,
        "country": "FR",
        "gift": False,
        **extra,
    }


def index_of(v: FeatureView, events: list[dict[str, Any]]) -> FeatureIndex:
    idx = FeatureIndex(v)
    idx.add(validate_batch(v, events, NOW))
    return idx


def test_core_features_module_is_pure() -> None:
    code = (
        "import sys, airi_ray.core.features;"
        "bad = [m for m in ('ray', 'asyncio', 'lancedb', 'pyarrow', 'socket') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- windows and aggregations ---------------------------------------------------------------


def test_each_aggregation_over_a_window() -> None:
    v = view()
    idx = index_of(
        v,
        [
            event(ts=NOW - 200, amount=4.0),
            event(ts=NOW - 100, amount=1.0),
            event(ts=NOW - 50, amount=7.0),
        ],
    )
    assert idx.features("u1", NOW) == {
        "count_5m": 3,
        "sum_5m": 12.0,
        "mean_5m": 4.0,
        "min_5m": 1.0,
        "max_5m": 7.0,
        "last_5m": 7.0,
    }


def test_window_boundaries_exclude_the_start_and_include_as_of() -> None:
    v = view()
    # One event exactly window_s old (out), one just inside, one exactly at as_of (in).
    idx = index_of(
        v,
        [
            event(ts=NOW - 300.0, amount=100.0),
            event(ts=NOW - 299.5, amount=2.0),
            event(ts=NOW, amount=3.0),
        ],
    )
    f = idx.features("u1", NOW)
    assert f["count_5m"] == 2 and f["sum_5m"] == 5.0 and f["max_5m"] == 3.0
    # Half a second later the event at NOW - 299.5 sits exactly on the boundary: out.
    f = idx.features("u1", NOW + 0.5)
    assert f["count_5m"] == 1 and f["sum_5m"] == 3.0 and f["min_5m"] == 3.0
    # Half a second earlier the event at NOW is in the future: out; the NOW - 300 one is in.
    f = idx.features("u1", NOW - 0.5)
    assert f["count_5m"] == 2 and f["sum_5m"] == 102.0 and f["last_5m"] == 2.0


def test_several_windows_and_fields_in_declared_order() -> None:
    aggs = [
        Aggregation("n_1h", "user_id", "count", 3600.0),
        Aggregation("items_5m", "items", "sum", 300.0),
        Aggregation("amount_1d", "amount", "mean", 86_400.0),
        Aggregation("country_last", "country", "last", math.inf),
        Aggregation("n_5m", "amount", "count", 300.0),
    ]
    v = view(aggregations=aggs)
    idx = index_of(
        v,
        [
            event(ts=NOW - 90_000, amount=50.0, country="DE"),  # only the infinite window
            event(ts=NOW - 4_000, amount=10.0, items=3),
            event(ts=NOW - 1_000, amount=20.0, items=5),
            event(ts=NOW - 10, amount=30.0, items=7, country="IT"),
        ],
    )
    f = idx.features("u1", NOW)
    assert list(f) == ["n_1h", "items_5m", "amount_1d", "country_last", "n_5m"]
    assert f == {"n_1h": 2, "items_5m": 7, "amount_1d": 20.0, "country_last": "IT", "n_5m": 1}
    assert idx.features("u1", NOW - 5_000)["country_last"] == "DE"


def test_unknown_entity_and_empty_window_give_empty_values() -> None:
    v = view()
    empty = {
        "count_5m": 0,
        "sum_5m": 0,
        "mean_5m": None,
        "min_5m": None,
        "max_5m": None,
        "last_5m": None,
    }
    idx = index_of(v, [event(ts=NOW - 1000)])
    assert idx.features("nobody", NOW) == empty
    assert idx.features("u1", NOW) == empty  # its only event is outside the window
    assert idx.features("u1", NOW - 2000) == empty  # before its only event
    assert v.empty_features() == empty


def test_integer_entity_ids_match_their_decimal_string() -> None:
    v = view()
    idx = index_of(v, [event(user=42, amount=3.0)])
    assert idx.features(42, NOW)["sum_5m"] == 3.0
    assert idx.features("42", NOW)["sum_5m"] == 3.0


def test_out_of_order_events_are_placed_by_time() -> None:
    v = view()
    idx = index_of(
        v,
        [
            event(ts=NOW - 10, amount=3.0),
            event(ts=NOW - 100, amount=1.0),
            event(ts=NOW - 50, amount=2.0),
        ],
    )
    assert idx.features("u1", NOW)["last_5m"] == 3.0
    assert idx.features("u1", NOW - 60)["last_5m"] == 1.0
    assert idx.features("u1", NOW - 20)["last_5m"] == 2.0
    assert idx.features("u1", NOW - 20)["count_5m"] == 2


def test_equal_times_keep_arrival_order_for_last() -> None:
    v = view()
    idx = index_of(v, [event(ts=NOW - 5, amount=1.0), event(ts=NOW - 1, amount=2.0)])
    idx.add(validate_batch(v, [event(ts=NOW - 5, amount=9.0)], NOW))  # late, same time as the first
    assert idx.features("u1", NOW - 3)["last_5m"] == 9.0
    assert idx.features("u1", NOW)["last_5m"] == 2.0


def test_point_in_time_lookups_never_see_later_events() -> None:
    v = view()
    idx = index_of(v, [event(ts=NOW - 100, amount=1.0)])
    before = idx.features("u1", NOW - 50)
    idx.add(
        validate_batch(
            v, [event(ts=NOW - 40, amount=1000.0), event(ts=NOW - 49.999, amount=500.0)], NOW
        )
    )
    assert idx.features("u1", NOW - 50) == before
    assert idx.features("u1", NOW)["max_5m"] == 1000.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1000), st.integers(-50, 50)),
        min_size=0,
        max_size=40,
    ),
    st.integers(0, 1100),
)
def test_matches_a_brute_force_scan(points: list[tuple[int, int]], as_of_offset: int) -> None:
    v = view(aggregations=[Aggregation(f"{fn}", "items", fn, 250.0) for fn in FNS])
    events = [event(ts=NOW - 1000 + t, items=x) for t, x in points]
    idx = index_of(v, events)
    as_of = NOW - 1000 + as_of_offset
    inside = [(t, x) for t, x in points if as_of - 250 < NOW - 1000 + t <= as_of]
    values = [x for _, x in inside]
    latest = max(range(len(inside)), key=lambda i: (inside[i][0], i), default=None)
    expected = {
        "count": len(values),
        "sum": sum(values),
        "mean": sum(values) / len(values) if values else None,
        "min": min(values, default=None),
        "max": max(values, default=None),
        "last": None if latest is None else inside[latest][1],
    }
    assert idx.features("u1", as_of) == expected


# -- retention -------------------------------------------------------------------------------


def test_expire_drops_events_past_the_longest_window_plus_ttl() -> None:
    v = view(ttl_s=100.0)  # horizon: 300 + 100 s
    idx = index_of(
        v,
        [
            event(user="old", ts=NOW - 1000),
            event(ts=NOW - 400.0, amount=1.0),
            event(ts=NOW - 399.0, amount=2.0),
        ],
    )
    assert idx.expire(NOW) == 2  # "old" entirely, and u1's event exactly at the horizon
    assert len(idx) == 1 and idx.events == 1
    assert idx.features("u1", NOW - 200)["sum_5m"] == 2.0
    assert idx.expire(NOW) == 0


def test_the_cap_keeps_the_latest_events_of_each_entity() -> None:
    v = view(max_events_per_entity=3)
    idx = index_of(v, [event(ts=NOW - 10 * i, amount=float(i)) for i in range(6)])
    assert idx.events == 3
    assert idx.features("u1", NOW)["count_5m"] == 3
    assert idx.features("u1", NOW)["sum_5m"] == 0.0 + 1.0 + 2.0
    # The cap dropped everything before the oldest kept event (NOW - 20).
    assert idx.take_evicted() == {"u1": NOW - 20}
    assert idx.take_evicted() == {}
    # An event older than all kept ones is dropped at once.
    idx.add(validate_batch(v, [event(ts=NOW - 1000, amount=50.0)], NOW))
    assert idx.features("u1", NOW)["max_5m"] == 2.0


# -- validation ------------------------------------------------------------------------------


def test_valid_event_is_normalised() -> None:
    v = view(transforms={"big": "amount > 100", "per_item": "amount / max(items, 1)"})
    e = validate_event(v, event(user=7, ts="2023-11-14T22:13:20Z", amount=250, items=5), NOW)
    assert e.entity == "7" and e.ts == NOW
    assert e.values == {
        "amount": 250.0,
        "items": 5,
        "country": "FR",
        "gift": False,
        "big": True,
        "per_item": 50.0,
    }
    assert isinstance(e.values["amount"], float)
    assert validate_event(v, event(items=3.0), NOW).values["items"] == 3  # JSON-style 3.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, 2], "event 0: must be an object"),
        (
            {"ts": NOW, "amount": 1.0, "items": 1, "country": "FR", "gift": False},
            "event 0: missing entity key 'user_id'",
        ),
        (
            event(user=""),
            "event 0: 'user_id': an entity id must be a non-empty string or an integer",
        ),
        (
            event(user=True),
            "event 0: 'user_id': an entity id must be a non-empty string or an integer",
        ),
        (
            event(ts="yesterday"),
            "event 0: 'ts' must be a number of seconds or an ISO-8601 time, got str 'yesterday'",
        ),
        (event(ts=float("nan")), "event 0: 'ts' must be a number of seconds or an ISO-8601 time"),
        (
            event(ts=None),
            "event 0: 'ts' must be a number of seconds or an ISO-8601 time, got NoneType None",
        ),
        (event(ts="2023-11-14T22:13:20"), "has no timezone"),
        (
            event(ts=NOW + 61),
            "event 0: 'ts' 1700000061.0 is 61.000 s in the future; allowed: at most 60 s after now",
        ),
        (event(amount="12"), "event 0: 'amount' must be a finite number (float), got str '12'"),
        (event(amount=math.inf), "'amount' must be a finite number (float)"),
        (event(items=1.5), "'items' must be an integer (int), got float 1.5"),
        (event(items=True), "'items' must be an integer (int), got bool True"),
        (event(items=2**70), "does not fit in 64 bits"),
        (event(gift=1), "'gift' must be true or false (bool), got int 1"),
        (event(country=3), "'country' must be a string (str), got int 3"),
        (
            event(amout=3.0),
            "event 0: unknown field 'amout'; view 'purchases' accepts user_id, ts, amount, items, country, gift",
        ),
    ],
)
def test_malformed_events_are_named(bad: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_event(view(), bad, NOW)
    assert message in err.value.message
    assert err.value.status == 400


def test_missing_field_and_missing_timestamp() -> None:
    e = event()
    del e["items"]
    with pytest.raises(InvalidRequest) as err:
        validate_event(view(), e, NOW)
    assert "missing field 'items' (int)" in err.value.message
    e = event()
    del e["ts"]
    with pytest.raises(InvalidRequest) as err:
        validate_event(view(), e, NOW)
    assert "missing timestamp 'ts'" in err.value.message


def test_a_bad_batch_names_every_bad_event_and_returns_nothing() -> None:
    events = [event(), event(ts="soon"), event(), event(amount=None)] + [
        event(items="x") for _ in range(6)
    ]
    with pytest.raises(InvalidRequest) as err:
        validate_batch(view(), events, NOW)
    m = err.value.message
    assert m.startswith(
        "8 of 10 events for view 'purchases' are invalid and the batch was rejected"
    )
    assert "event 1: 'ts'" in m and "event 3: 'amount'" in m and "and 3 more" in m


# -- transforms ------------------------------------------------------------------------------


def test_transforms_feed_aggregations() -> None:
    v = view(
        transforms={
            "big": "amount >= 100 and not gift",
            "log_amount": "log1p(abs(amount))",
            "french_items": "items if country == 'FR' else 0",
            "net": "min(amount, 500) - items * 2 + log_amount * 0",
        },
        aggregations=[
            Aggregation("big_n", "big", "sum", 300.0),
            Aggregation("fr_items", "french_items", "sum", 300.0),
            Aggregation("net_max", "net", "max", 300.0),
            Aggregation("log_last", "log_amount", "last", 300.0),
        ],
    )
    idx = index_of(
        v,
        [
            event(amount=150.0, items=2),
            event(amount=900.0, items=1, gift=True, country="DE"),
            event(amount=5.0, items=3),
        ],
    )
    f = idx.features("u1", NOW)
    assert f["big_n"] == 1
    assert f["fr_items"] == 5
    assert f["net_max"] == 498.0
    assert f["log_last"] == pytest.approx(math.log1p(5.0))


def test_a_failing_transform_rejects_the_event() -> None:
    v = view(transforms={"per_item": "amount / items"})
    with pytest.raises(InvalidRequest) as err:
        validate_event(v, event(items=0), NOW, index=4)
    assert (
        "event 4: transform 'per_item' = 'amount / items' failed on this event" in err.value.message
    )
    v = view(transforms={"lg": "log1p(amount)"})
    with pytest.raises(InvalidRequest, match="failed on this event"):
        validate_event(v, event(amount=-1.0), NOW)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "only abs, min, max, log1p may be called"),
        ("amount.real", "Attribute is not allowed"),
        ("amount ** 2", "Pow is not allowed"),
        ("[amount]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("amount + nope", "unknown name 'nope'"),
        ("country * 3", "string field 'country' may only be compared"),
        ("max(country, 'a')", "string field 'country' may only be compared"),
        ("'a' * 1000000000", "constant 'a' is not allowed"),
        ("abs", "unknown name 'abs'"),
        ("amount +", "is not an expression"),
        ("later + 1", "unknown name 'later'"),
        ("max(amount, key=abs)", "with plain arguments"),
    ],
)
def test_unsafe_or_malformed_transforms_are_refused(expression: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        view(transforms={"t": expression, "later": "1"})
    assert message in err.value.message
    assert "feature view 'purchases', transform 't'" in err.value.message


# -- view declarations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "bad name"}, "the name must be 1-64 letters"),
        (
            {"fields": {"amount": "decimal"}},
            "field 'amount' has type 'decimal'; allowed: float, int, str, bool",
        ),
        ({"fields": {"user_id": "str"}}, "field name 'user_id' is used twice"),
        ({"fields": {"_x": "int"}}, "is reserved"),
        ({"fields": {"max": "int"}}, "is reserved"),
        ({"fields": {"a-b": "int"}}, "must be a Python-style identifier"),
        ({"aggregations": []}, "declare at least one aggregation"),
        ({"aggregations": [Aggregation("a", "nope", "sum", 60.0)]}, "unknown field 'nope'"),
        (
            {"aggregations": [Aggregation("a", "country", "mean", 60.0)]},
            "mean needs a numeric field",
        ),
        (
            {"aggregations": [Aggregation("a", "amount", "sum", 60.0)] * 2},
            "two aggregations are named 'a'",
        ),
        ({"entity_key": "ts"}, "must differ"),
        ({"ttl_s": -1.0}, "ttl_s must be >= 0"),
        ({"max_events_per_entity": 0}, "max_events_per_entity must be at least 1"),
    ],
)
def test_bad_view_declarations_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        view(**overrides)
    assert message in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fn": "median", "window_s": 60.0}, "fn must be one of count, sum, mean, min, max, last"),
        ({"fn": "sum", "window_s": 0.0}, "window_s must be a positive number"),
        ({"fn": "sum", "window_s": float("nan")}, "window_s must be a positive number"),
    ],
)
def test_bad_aggregations_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        Aggregation("a", "amount", **kwargs)
    assert message in err.value.message


def test_a_view_keeps_its_own_copy_of_the_declaration() -> None:
    fields = {"amount": "float"}
    v = FeatureView("v", "user_id", fields, [Aggregation("s", "amount", "sum", 60.0)])
    fields["amount"] = "str"
    assert v.fields["amount"] == "float"
    assert v.horizon_s == 60.0 + 86_400.0


def test_a_benchmark_shaped_index_agrees_with_a_scan() -> None:
    # The lookup plan (one slice per window and field) against a plain scan,
    # with 100 entities of 1,000 events each and 12 aggregations.
    aggs = [
        Aggregation(f"{fn}_{w}", "amount", fn, s)
        for w, s in (("5m", 300.0), ("1h", 3600.0), ("1d", 86_400.0))
        for fn in ("count", "sum", "mean", "max")
    ]
    v = FeatureView("b", "user_id", {"amount": "float"}, aggs)
    rng = random.Random(0)
    raw = [
        {
            "user_id": f"u{i}",
            "ts": NOW - 172_800 + k * 172.8 + rng.uniform(-100, 100),
            "amount": rng.random(),
        }
        for k in range(1000)
        for i in range(100)
    ]
    idx = FeatureIndex(v)
    idx.add(validate_batch(v, raw, NOW))
    assert idx.events == 100_000
    mine = [r for r in raw if r["user_id"] == "u7" and NOW - 3600 < r["ts"] <= NOW]
    f = idx.features("u7", NOW)
    assert f["count_1h"] == len(mine)
    assert f["max_1h"] == max(r["amount"] for r in mine)
