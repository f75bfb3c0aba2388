"""The Grafana dashboard names only metrics and labels that ``/metrics`` really exports.

The exported catalogue is built the way the runtime builds it (``RuntimeMetrics`` as the
scheduler actor does, ``HttpMetrics`` as the ingress does), fed one call, one engine replica
and one tenant's scheduler state so that every family has samples, then read back from its
Prometheus text. No Ray.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from airi_ray.core.requests import Usage
from airi_ray.core.scheduling import Lease, ModelStats, TenantStats
from airi_ray.obs.metrics import HttpMetrics, RuntimeMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deployments" / "grafana" / "airi-dashboard.json"
METRIC = re.compile(r"airi_[a-z0-9_]+")
# A metric with a label selector: the selector's label names must be the metric's.
SELECTOR = re.compile(r"(airi_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__all", "__auto"}


def _scheduler_stats() -> dict[str, ModelStats]:
    tenant = TenantStats(
        queue_depth=1,
        oldest_wait_s=0.5,
        in_flight=1,
        virtual_counter=10.0,
        admitted=2,
        refused=1,
        requeued=0,
    )
    return {
        "m": ModelStats(
            queue_depth=1,
            in_flight=1,
            in_flight_tokens=30,
            routes={"load": 2},
            tenants={"t": tenant},
        )
    }


def _exported() -> dict[str, set[str]]:
    """Every sample name the runtime exports, with the label names it carries."""
    runtime = RuntimeMetrics(_scheduler_stats)
    lease = Lease("r1", "m", "t", "replica-0", enqueued_at=0.0, granted_at=0.1)
    runtime.record_call(lease, Usage(prompt_tokens=5, completion_tokens=3, ttft_s=0.1, e2e_s=0.3))
    runtime.engines.replicas["replica-0"] = {
        "model": "m",
        "running": 1,
        "waiting": 0,
        "kv_cache_usage": 0.2,
        "prefix_cache_queries": 10,
        "prefix_cache_hits": 4,
        "embed_batches": 2,
        "embed_batch_items": 7,
    }
    # What the scheduler actor sets from the controller's and the policy engine's reports.
    runtime.replicas.labels("m", "ready").set(1)
    runtime.policy_refusals.labels("m", "t", "rate_limit").inc()
    runtime.policy_filter_events.labels("m", "t", "pii", "redact").inc()
    runtime.autoscale_decisions.labels("m", "up").inc()
    runtime.desired_replicas.labels("m").set(2)
    runtime.traffic.labels("m", "v1").set(1.0)
    runtime.rollout_decisions.labels("m", "advance").inc()
    http = HttpMetrics()
    http.responses.labels("/v1/chat/completions", "200").inc()

    text = (runtime.text() + http.text()).decode()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return _exported()


def test_catalogue_yields_every_family(exported: dict[str, set[str]]) -> None:
    # Guards the fake data above: a family with no samples would hide its names.
    for name in (
        "airi_queue_depth",
        "airi_admission_decisions_total",
        "airi_embedding_batch_items_total",
        "airi_prefix_cache_hit_rate",
        "airi_ttft_seconds_bucket",
        "airi_time_per_output_token_seconds_bucket",
        "airi_http_responses_total",
    ):
        assert name in exported, name


def test_dashboard_uses_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    expressions = _expressions(_dashboard())
    assert expressions
    unknown = {
        (title, name)
        for title, expr in expressions
        for name in METRIC.findall(expr)
        if name not in exported
    }
    assert not unknown, f"panels name metrics /metrics does not export: {sorted(unknown)}"


def test_dashboard_uses_only_exported_labels(exported: dict[str, set[str]]) -> None:
    wrong = []
    for title, expr in _expressions(_dashboard()):
        for name, selector in SELECTOR.findall(expr):
            for label in MATCHER.findall(selector):
                if label not in exported.get(name, set()):
                    wrong.append((title, name, label))
        known = set().union(*(exported.get(n, set()) for n in METRIC.findall(expr)))
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in known:
                    wrong.append((title, "by", label))
    assert not wrong, f"panels use labels their metrics do not carry: {wrong}"


def test_panel_ids_unique_and_placed() -> None:
    panels = list(_panels(_dashboard()))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] != "row":
            assert panel.get("description"), f"{panel['title']!r} has no description"


def test_template_variables_defined() -> None:
    dashboard = _dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "tenant"} <= defined
    used = set()
    for match in VARIABLE.finditer(
        json.dumps(dashboard["panels"] + dashboard["templating"]["list"])
    ):
        used.add(match.group(1) or match.group(2))
    inputs = {i["name"] for i in dashboard.get("__inputs", [])}
    undefined = used - defined - inputs - BUILTIN_VARIABLES
    assert not undefined, f"variables used but not defined: {sorted(undefined)}"
    assert {"model", "tenant"} <= used
