"""Online features: events pushed through the client and HTTP, windowed aggregations,
point-in-time lookups, all-or-nothing batches, and state that survives a restart."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.graphs import END, START, Field, StateGraph, features
from airi_ray.runtime import names
from tests.conftest import KEY, wait_for

HEADERS = {"Authorization": f"Bearer {KEY}"}


def test_windowed_features_and_point_in_time_lookups(client) -> None:
    user, now = f"u-{time.time_ns()}", time.time()
    events = [
        {"user": user, "ts": now - 7200, "amount": 100.0},  # outside the 1 h window
        {"user": user, "ts": now - 600, "amount": 20.0},  # inside 1 h, outside 5 m
        {"user": user, "ts": now - 60, "amount": 5.0},
    ]
    assert client.push_events("orders", events) == 3
    got = client.features("orders", [user, "nobody"])
    assert got[user] == {"orders_5m": 1, "spend_1h": 25.0, "last_amount": 5.0}
    assert got["nobody"] == {"orders_5m": 0, "spend_1h": 0, "last_amount": None}
    # As of 5 minutes ago the latest event had not happened: it must not leak in.
    past = client.features("orders", [user], as_of=now - 300)[user]
    assert past == {"orders_5m": 0, "spend_1h": 20.0, "last_amount": 20.0}


def test_features_over_http(airi_app) -> None:
    user = f"h-{time.time_ns()}"
    base = f"{airi_app.base_url}/v1/features/orders"
    event = {"user": user, "ts": time.time() - 1, "amount": 7.5}
    r = httpx.post(f"{base}/events", json={"events": [event]}, headers=HEADERS)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    r = httpx.get(base, params={"entity_id": user}, headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["data"][user]["last_amount"] == 7.5
    assert httpx.get(base, params={"entity_id": user}).status_code == 401
    missing = httpx.get(
        f"{airi_app.base_url}/v1/features/nope", params={"entity_id": "a"}, headers=HEADERS
    )
    assert (
        missing.status_code == 404 and "known views: orders" in missing.json()["error"]["message"]
    )
    bad = httpx.post(
        f"{base}/events", json={"events": [{"user": user, "amount": 1.0}]}, headers=HEADERS
    )
    assert bad.status_code == 400 and "ts" in bad.json()["error"]["message"]


def test_a_bad_batch_writes_nothing(client) -> None:
    user, now = f"b-{time.time_ns()}", time.time()
    good = {"user": user, "ts": now - 5, "amount": 1.0}
    for bad, message in [
        ({"ts": now, "amount": 1.0}, "user"),
        ({"user": user, "ts": "yesterday", "amount": 1.0}, "ts"),
        ({"user": user, "ts": now + 3600, "amount": 1.0}, "future"),
        ({"user": user, "ts": now, "amount": "lots"}, "amount"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            client.push_events("orders", [good, bad])
    assert client.features("orders", [user])[user]["orders_5m"] == 0
    with pytest.raises(NotFound):
        client.features("nope", [user])


def test_features_survive_a_restart_and_serve_graph_nodes(client) -> None:
    user = f"r-{time.time_ns()}"
    client.push_events("orders", [{"user": user, "ts": time.time() - 2, "amount": 3.0}])
    server = names.get_actor(names.FEATURE_SERVER_NAME)
    ray.kill(server, no_restart=False)

    def served() -> dict:
        try:
            return client.features("orders", [user])[user]
        except Exception:
            return {}

    assert wait_for(served, what="the restarted feature server")["last_amount"] == 3.0
    g = StateGraph("user-features", {"user": Field(), "f": Field()}, inputs=["user"])
    g.add_node(
        "lookup",
        features("orders", lambda v: [v["user"]], output="f"),
        reads=["user"],
        writes=["f"],
    )
    g.add_edge(START, "lookup").add_edge("lookup", END)
    client.register_graph(g.compile())
    result = client.run_graph("user-features", {"user": user})
    assert result["state"]["f"][user]["orders_5m"] == 1
