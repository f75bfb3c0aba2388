"""Online features: events pushed through the client and HTTP, windowed aggregations,
point-in-time lookups, all-or-nothing batches, and state that survives a restart."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.graphs import END, START, Field, StateGraph, features
from airi_ray.runtime import names
from tests.conftest import KEY, OTHER_KEY, restart_actor, wait_for

HEADERS = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


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


def test_a_tenant_reads_none_of_another_tenants_events(airi_app) -> None:
    """Issue 21 item 8: a view with no ``tenants:`` keeps each tenant's events apart."""
    customer = f"c-{time.time_ns()}"
    base = f"{airi_app.base_url}/v1/features/orders"
    event = {"user": customer, "ts": time.time() - 1, "amount": 40.0}
    r = httpx.post(f"{base}/events", json={"events": [event]}, headers=HEADERS)
    assert r.status_code == 200, r.text
    mine = httpx.get(base, params={"entity_id": customer}, headers=HEADERS).json()
    assert mine["data"][customer]["last_amount"] == 40.0
    theirs = httpx.get(base, params={"entity_id": customer}, headers=OTHER)
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["data"][customer] == {
        "orders_5m": 0,
        "spend_1h": 0,
        "last_amount": None,
    }


@pytest.fixture
def shared_view(airi_app) -> Iterator[str]:
    """Deploy a view shared by tenant-a only for one test, then restore the spec."""
    controller = names.get_actor(names.CONTROLLER_NAME)
    spec: dict[str, Any] = copy.deepcopy(airi_app.spec)
    view = copy.deepcopy(spec["features"][0]) | {"name": "team_orders", "tenants": ["tenant-a"]}
    spec["features"].append(view)
    ray.get(controller.deploy.remote(spec))
    yield "team_orders"
    ray.get(controller.deploy.remote(airi_app.spec))


def test_a_shared_view_refuses_the_tenants_it_does_not_name(airi_app, shared_view) -> None:
    base = f"{airi_app.base_url}/v1/features/{shared_view}"
    event = {"user": "c1", "ts": time.time() - 1, "amount": 2.0}
    assert httpx.post(f"{base}/events", json={"events": [event]}, headers=HEADERS).is_success
    for r in (
        httpx.get(base, params={"entity_id": "c1"}, headers=OTHER),
        httpx.post(f"{base}/events", json={"events": [event]}, headers=OTHER),
    ):
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "feature_view_not_allowed"
        assert "'team_orders'" in error["message"] and "tenant-a" in error["message"]


def test_a_retried_push_with_one_event_id_counts_once(airi_app, client) -> None:
    customer = f"e-{time.time_ns()}"
    base = f"{airi_app.base_url}/v1/features/orders"
    event = {"user": customer, "ts": time.time() - 1, "amount": 5.0, "event_id": f"{customer}-1"}
    for _ in range(2):  # the first push, and its retry
        r = httpx.post(f"{base}/events", json={"events": [event]}, headers=HEADERS)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert client.features("orders", [customer])[customer]["orders_5m"] == 1

    # Also once the server restarted: the ids are stored with the events.
    restart_actor(names.FEATURE_SERVER_NAME)

    def pushed() -> int:
        try:
            return client.push_events("orders", [event])
        except Exception:
            return 0

    assert wait_for(pushed, what="the restarted feature server") == 1
    assert client.features("orders", [customer])[customer] == {
        "orders_5m": 1,
        "spend_1h": 5.0,
        "last_amount": 5.0,
    }
