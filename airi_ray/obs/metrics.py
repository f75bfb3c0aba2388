"""The metric catalogue: every ``airi_`` metric is defined here and nowhere else.

``ObserverMetrics`` (graph timings, quality, drift, alerts, feedback) lives in the observer
actor; ``RuntimeMetrics`` lives in the scheduler actor, which sees every request's lease and
release whatever surface it came from (HTTP, Python client, graphs), and the engine stats
the controller collects from replicas. ``HttpMetrics`` lives in each ingress replica.
``ControllerMetrics`` (the reconcile loop's step timings and failures) lives in the
controller.
Each owns a private registry, so ``/metrics`` concatenates their texts without clashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from airi_ray.core.requests import Usage
from airi_ray.core.scheduling import Lease
from airi_ray.core.stats import RateWindow

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class _EngineCollector(Collector):
    """Exports the latest engine stats of each replica (pushed by the controller)."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Any]:
        gauges = {
            "running": GaugeMetricFamily(
                "airi_engine_running_requests",
                "Requests running in the engine",
                labels=["model", "replica"],
            ),
            "waiting": GaugeMetricFamily(
                "airi_engine_waiting_requests",
                "Requests waiting inside the engine",
                labels=["model", "replica"],
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "airi_kv_cache_usage_ratio",
                "Fraction of the KV cache in use",
                labels=["model", "replica"],
            ),
        }
        queries = CounterMetricFamily(
            "airi_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            labels=["model", "replica"],
        )
        hits = CounterMetricFamily(
            "airi_prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            labels=["model", "replica"],
        )
        batches = CounterMetricFamily(
            "airi_embedding_batches",
            "Batches of embedding calls sent to the engine",
            labels=["model", "replica"],
        )
        batch_items = CounterMetricFamily(
            "airi_embedding_batch_items",
            "Embedding calls in those batches (items / batches = mean batch size)",
            labels=["model", "replica"],
        )
        rate = GaugeMetricFamily(
            "airi_prefix_cache_hit_rate",
            "Prefix-cache hits over queries since start",
            labels=["model"],
        )
        per_model: dict[str, list[int]] = {}
        for rid, s in sorted(self.replicas.items()):
            labels = [s["model"], rid]
            for key, g in gauges.items():
                g.add_metric(labels, float(s.get(key, 0)))
            queries.add_metric(labels, float(s.get("prefix_cache_queries", 0)))
            hits.add_metric(labels, float(s.get("prefix_cache_hits", 0)))
            if s.get("embed_batches"):
                batches.add_metric(labels, float(s["embed_batches"]))
                batch_items.add_metric(labels, float(s["embed_batch_items"]))
            acc = per_model.setdefault(s["model"], [0, 0])
            acc[0] += int(s.get("prefix_cache_hits", 0))
            acc[1] += int(s.get("prefix_cache_queries", 0))
        for model, (h, q) in sorted(per_model.items()):
            rate.add_metric([model], h / q if q else 0.0)
        yield from gauges.values()
        yield from (queries, hits, rate, batches, batch_items)


class _SchedulerCollector(Collector):
    """Exports the scheduler core's state per model and tenant, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        tenant_labels = ["model", "tenant"]
        depth = GaugeMetricFamily(
            "airi_queue_depth", "Requests waiting for a replica", labels=tenant_labels
        )
        oldest = GaugeMetricFamily(
            "airi_queue_oldest_wait_seconds",
            "How long the oldest waiting request has waited",
            labels=tenant_labels,
        )
        in_flight = GaugeMetricFamily(
            "airi_in_flight_requests", "Leased requests", labels=tenant_labels
        )
        counter = GaugeMetricFamily(
            "airi_virtual_token_counter",
            "Weighted tokens served (the fair scheduler serves the smallest first)",
            labels=tenant_labels,
        )
        decisions = CounterMetricFamily(
            "airi_admission_decisions",
            "Requests admitted to a queue, refused (429/503), requeued after their replica died "
            "before answering, or migrated to another replica mid-stream",
            labels=["model", "tenant", "decision"],
        )
        routes = CounterMetricFamily(
            "airi_routing_decisions",
            "Leases by the reason their replica was chosen",
            labels=["model", "reason"],
        )
        kv_tokens = GaugeMetricFamily(
            "airi_in_flight_tokens",
            "Prompt plus max_tokens of leased requests (what admission counts)",
            labels=["model"],
        )
        for model, m in sorted(self._stats().items()):
            kv_tokens.add_metric([model], float(m.in_flight_tokens))
            for reason, n in sorted(m.routes.items()):
                routes.add_metric([model, reason], float(n))
            for tenant, t in sorted(m.tenants.items()):
                labels = [model, tenant]
                depth.add_metric(labels, float(t.queue_depth))
                oldest.add_metric(labels, t.oldest_wait_s)
                in_flight.add_metric(labels, float(t.in_flight))
                counter.add_metric(labels, t.virtual_counter)
                for decision in ("admitted", "refused", "requeued", "migrated"):
                    decisions.add_metric([*labels, decision], float(getattr(t, decision)))
        yield from (depth, oldest, in_flight, counter, decisions, routes, kv_tokens)


class UsageLogCollector(Collector):
    """Exports the scheduler's usage log writer (durable accounting), read at scrape time
    from ``GlobalScheduler.usage_stats``: nothing while accounting is in memory only."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        if not s.get("durable"):
            return
        pending = GaugeMetricFamily(
            "airi_usage_records_pending",
            "Usage records buffered and not yet written (what a scheduler kill would lose)",
        )
        pending.add_metric([], float(s["pending"]))
        written = CounterMetricFamily(
            "airi_usage_records_written", "Usage records written to the usage log"
        )
        written.add_metric([], float(s["written"]))
        dropped = CounterMetricFamily(
            "airi_usage_records_dropped",
            "Usage records dropped because the buffer was full (storage down for long)",
        )
        dropped.add_metric([], float(s["dropped"]))
        failures = CounterMetricFamily(
            "airi_usage_write_failures", "Failed writes of a usage batch (each retried)"
        )
        failures.add_metric([], float(s["failures"]))
        yield from (pending, written, dropped, failures)


class RuntimeMetrics:
    """Request, token, queue and engine metrics labelled by model and tenant."""

    def __init__(self, scheduler_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "airi_requests", "Finished model calls", ["model", "tenant", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "airi_ttft_seconds",
            "Time to first token",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "airi_time_per_output_token_seconds",
            "Time per output token after the first",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "airi_request_latency_seconds",
            "End-to-end latency of a model call",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "airi_queue_wait_seconds",
            "Time from acquire to lease",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "airi_input_tokens", "Prompt tokens", ["model", "tenant"], registry=r
        )
        self.output_tokens = Counter(
            "airi_output_tokens", "Generated tokens", ["model", "tenant"], registry=r
        )
        self.tokens_per_s = Gauge(
            "airi_output_tokens_per_second",
            "Output tokens per second over the last 10 s",
            ["model"],
            registry=r,
        )
        self.replicas = Gauge("airi_replicas", "Replicas by state", ["model", "state"], registry=r)
        self.policy_refusals = Counter(
            "airi_policy_refusals",
            "Calls refused by tenant policy (ACL, rate limits, budget, concurrency), by rule",
            ["model", "tenant", "rule"],
            registry=r,
        )
        self.policy_filter_events = Counter(
            "airi_policy_filter_events",
            "Content-filter outcomes on prompts and answers (block, redact, flag), by rule",
            ["model", "tenant", "rule", "action"],
            registry=r,
        )
        self.autoscale_decisions = Counter(
            "airi_autoscale_decisions",
            "Replica count changes the autoscaler made, by direction",
            ["model", "direction"],
            registry=r,
        )
        self.desired_replicas = Gauge(
            "airi_desired_replicas", "Replicas the autoscaler wants", ["model"], registry=r
        )
        self.traffic = Gauge(
            "airi_model_traffic_weight",
            "Share of a model's new requests each version takes (0 to 1)",
            ["model", "version"],
            registry=r,
        )
        self.rollout_decisions = Counter(
            "airi_rollout_decisions",
            "Rollout decisions acted on (advance, promote, rollback), by model",
            ["model", "action"],
            registry=r,
        )
        self.engines = _EngineCollector()
        r.register(self.engines)
        r.register(_SchedulerCollector(scheduler_stats))
        self._rates: dict[str, RateWindow] = {}

    def record_call(self, lease: Lease, usage: Usage) -> None:
        """A leased call ended (however it ended): count it and its tokens and timings."""
        model, tenant = lease.model, lease.tenant
        self.requests.labels(model, tenant, "error" if usage.error else "ok").inc()
        self.queue_wait.labels(model, tenant).observe(lease.queue_wait_s)
        self.input_tokens.labels(model, tenant).inc(usage.prompt_tokens)
        self.output_tokens.labels(model, tenant).inc(usage.completion_tokens)
        self.e2e.labels(model, tenant).observe(usage.e2e_s)
        if usage.ttft_s is not None:
            self.ttft.labels(model, tenant).observe(usage.ttft_s)
        if usage.tpot_s is not None:
            self.tpot.labels(model).observe(usage.tpot_s)
        self._rates.setdefault(model, RateWindow(10.0)).add(
            time.monotonic(), usage.completion_tokens
        )

    def text(self) -> bytes:
        now = time.monotonic()
        for model, window in self._rates.items():
            self.tokens_per_s.labels(model).set(window.rate(now))
        return generate_latest(self.registry)


class HttpMetrics:
    """HTTP-level counts of one ingress replica, by route and status code."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter(
            "airi_http_responses", "HTTP responses", ["route", "code"], registry=self.registry
        )
        self.refusals_paced = Counter(
            "airi_http_refusals_paced",
            "Refusals answered late because their tenant's refusals were over its pace",
            registry=self.registry,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)


class ObserverMetrics:
    """Metrics only the observer knows: graph timings, quality, drift, alerts."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.node_seconds = Histogram(
            "airi_graph_node_seconds",
            "Graph node latency",
            ["graph", "node", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.runs = Counter(
            "airi_graph_runs", "Finished graph runs", ["graph", "status"], registry=r
        )
        self.run_seconds = Histogram(
            "airi_graph_run_seconds",
            "Graph run latency",
            ["graph"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            "airi_alerts",
            "Drift and anomaly alerts",
            ["kind", "severity", "model", "version"],
            registry=r,
        )
        self.quality = Gauge(
            "airi_quality",
            "Quality signals per model version over the recent window",
            ["model", "version", "signal"],
            registry=r,
        )
        self.drift = Gauge(
            "airi_drift_score",
            "Latest drift scores per model version",
            ["model", "version", "score"],
            registry=r,
        )
        self.feedback = Counter(
            "airi_feedback", "User feedback received", ["model", "version", "sentiment"], registry=r
        )


class ControllerMetrics:
    """How long each step of the controller's reconcile loop takes, and how often one fails
    (a failing step is logged and counted; the loop goes on with the next)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.step_seconds = Histogram(
            "airi_controller_step_seconds",
            "Duration of one controller loop step",
            ["step"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_failures = Counter(
            "airi_controller_step_failures",
            "Controller loop steps that raised",
            ["step"],
            registry=r,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
