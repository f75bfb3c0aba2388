"""``Observer``: quality signals, drift and anomaly detection, alerts and the timeline
behind ``airi report``; one detached actor per cluster.

Call paths send it one record per finished model call (batched, fire-and-forget, never on
the request's critical path); graph executors send node and run timings. It feeds the pure
detectors of ``airi_ray/core`` (``QualityBook``, ``DriftMonitor`` per model version,
``ReplicaAnomalyMonitor``) and raises their alerts: logged, counted in metrics, kept for
``airi alerts`` and posted to the spec's webhook. Sampled prompts of generative models are
embedded with the spec's drift embedder (as the system tenant, batch priority) for the
input-embedding drift; an embedding model's own vectors are used as they are.

Calls are counted in the interval of ``sample_interval_s`` in which they ended (their own
clock, not when the observer got to them); an interval becomes a sample (throughput, TTFT
percentiles, queue depth per tenant, prefix-cache hit rate, drift scores) for the timeline
that ``airi report`` plots once ``SETTLE_S`` have passed after it, so late records count. Alerts, quality aggregates and the timeline live in memory: a restarted observer
starts them afresh (the context store keeps traces; Prometheus keeps the metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import ray
from prometheus_client import generate_latest

from airi_ray.config import SYSTEM_TENANT, ObservabilitySpec
from airi_ray.core.alerts import SEVERITIES, Alert, AlertLog
from airi_ray.core.anomaly import ReplicaAnomalyMonitor
from airi_ray.core.drift import DriftMonitor
from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.core.quality import QualityBook, Response
from airi_ray.core.registry import version_key
from airi_ray.core.requests import CallOptions
from airi_ray.obs.metrics import ObserverMetrics
from airi_ray.runtime import cluster_kv
from airi_ray.runtime.background import spawn
from airi_ray.runtime.calls import CallPath
from airi_ray.runtime.names import SCHEDULER_NAME, get_actor

logger = logging.getLogger(__name__)

SERVED_KEPT = 100_000  # request and run ids remembered for feedback
ALERTS_KEPT = 1000
TIMELINE_S = 3600.0
MAX_DRIFT_TEXT_CHARS = 2000
SETTLE_S = 2.0  # an interval is closed this long after its end (records arrive in batches)


class Observer:
    """See the module doc."""

    def __init__(self) -> None:
        self.config = ObservabilitySpec()
        self._quality = QualityBook()
        self._drift: dict[tuple[str, str], DriftMonitor] = {}
        self._anomaly = ReplicaAnomalyMonitor(self.config.anomaly.config())
        self._alerts = AlertLog(ALERTS_KEPT)
        self._served: OrderedDict[str, tuple[str, str, str]] = (
            OrderedDict()
        )  # id -> tenant, model, version
        self._queue: list[dict[str, Any]] = []
        self._worker: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._path: Any = None
        self._intervals: dict[int, dict[str, Any]] = {}  # open intervals by index
        self._closed = -1  # index of the last interval made a sample
        self._samples: deque[dict[str, Any]] = deque(maxlen=int(TIMELINE_S / 5))
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self.metrics = ObserverMetrics()
        self.records = 0
        self._restore()

    def _restore(self) -> None:
        """A restarted observer takes the deployed spec's settings from Ray's KV store."""
        if not ray.is_initialized():  # constructed outside Ray (tests)
            return
        saved = cluster_kv.saved_spec_dict()
        if saved:
            self.configure(saved.get("observability") or {})

    # -- configuration ---------------------------------------------------------------------

    def configure(self, spec: dict[str, Any]) -> None:
        """The app's ``observability`` section; detectors with changed settings start over."""
        config = ObservabilitySpec.model_validate(spec)
        if config.sample_interval_s != self.config.sample_interval_s:
            self._intervals, self._closed = {}, -1
        if config.anomaly != self.config.anomaly:
            self._anomaly = ReplicaAnomalyMonitor(config.anomaly.config())
        if config.drift != self.config.drift:
            self._drift.clear()
        self.config = config
        self._samples = deque(self._samples, maxlen=int(TIMELINE_S / config.sample_interval_s))
        if config.drift.embedder is not None:
            try:  # load the embedder's tokenizer now, not when the first calls wait for it
                spawn(self._warm())
            except RuntimeError:  # no event loop: constructed outside an actor (tests)
                pass

    async def _warm(self) -> None:
        try:
            await self._call_path().warm()
        except Exception as e:  # the first drift embedding loads what it needs instead
            logger.debug("observer: warm-up failed: %s", e)

    def _call_path(self) -> Any:
        if self._path is None:
            self._path = CallPath()
        return self._path

    # -- intake ----------------------------------------------------------------------------

    async def record(self, records: list[dict[str, Any]]) -> None:
        """Finished model calls from a call path (see ``CallPath._observe``)."""
        self._queue.extend(records)
        if self._worker is None or self._worker.done():
            self._worker = spawn(self._work())
        self._ensure_sampler()

    def record_nodes(self, events: list[dict[str, Any]]) -> None:
        """Graph node and run timings ``{"graph", "node" (None for the run), "ms", "status",
        "run_id", "tenant", "model", "version"}``; a run's last generative call makes it
        a target for feedback."""
        for e in events:
            seconds = e["ms"] / 1000
            if e.get("node") is None:
                self.metrics.runs.labels(e["graph"], e["status"]).inc()
                self.metrics.run_seconds.labels(e["graph"]).observe(seconds)
                if e.get("model"):
                    self._remember(e["run_id"], e["tenant"], e["model"], e["version"])
            else:
                self.metrics.node_seconds.labels(e["graph"], e["node"], e["status"]).observe(
                    seconds
                )

    def record_signal(self, kind: str, model: str, version: str, value: float) -> None:
        """A retrieval's relevance (best similarity, credited to the embedder version) or
        an answer's grounding (credited to the generator version)."""
        if kind == "relevance":
            self._quality.observe_relevance(model, version, value)
        elif kind == "grounding":
            self._quality.observe_grounding(model, version, value)
        else:
            raise InvalidRequest(f"signal kind must be 'relevance' or 'grounding', got {kind!r}")

    def feedback(self, tenant: str, target: str, score: float) -> dict[str, Any]:
        """User feedback on a response or run (``score`` in [-1, 1]: -1 bad, 1 good),
        credited to the model version that produced it.

        Raises:
            InvalidRequest: a score out of range.
            NotFound: no response or run of this tenant with that id (recently).
        """
        if isinstance(score, bool) or not isinstance(score, int | float) or not -1 <= score <= 1:
            raise InvalidRequest(f"score must be a number from -1 (bad) to 1 (good), got {score!r}")
        served = self._served.get(target)
        if served is None or served[0] != tenant:
            raise NotFound(
                f"no recent response or run {target!r}: feedback names the `id` of a "
                "completion or the `run_id` of a graph run"
            )
        _, model, version = served
        self._quality.observe_feedback(model, version, float(score))
        sentiment = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        self.metrics.feedback.labels(model, version, sentiment).inc()
        return {"id": target, "model": model, "version": version, "score": float(score)}

    # -- reads -----------------------------------------------------------------------------

    def alerts(
        self, model: str | None = None, severity: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        if severity is not None and severity not in SEVERITIES:
            raise InvalidRequest(
                f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= ALERTS_KEPT:
            raise InvalidRequest(f"limit must be an integer from 1 to {ALERTS_KEPT}, got {limit!r}")
        recent = self._alerts.recent(limit, severity, model)  # type: ignore[arg-type]
        return [a.to_dict() for a in recent]

    def quality(self) -> dict[str, Any]:
        return self._quality.summary()

    def drift(self) -> dict[str, Any]:
        drift = sorted(self._drift.items())
        return {version_key(m, v): d.scores().to_dict() for (m, v), d in drift}

    def timeline(self, window_s: float = TIMELINE_S) -> list[dict[str, Any]]:
        since = time.time() - window_s
        return [s for s in self._samples if s["at"] >= since]

    def stats(self) -> dict[str, Any]:
        return {"records": self.records, "queued": len(self._queue), "alerts": len(self._alerts)}

    def metrics_text(self) -> bytes:
        for model, versions in self._quality.summary().items():
            for version, q in versions.items():
                for signal in (
                    "error_rate",
                    "refusal_rate",
                    "filtered_rate",
                    "mean_output_tokens",
                    "relevance_mean",
                    "grounding_mean",
                    "feedback_mean",
                ):
                    if q.get(signal) is not None:
                        self.metrics.quality.labels(model, version, signal).set(q[signal])
        for (model, version), d in self._drift.items():
            for name, value in d.scores().to_dict().items():
                self.metrics.drift.labels(model, version, name).set(value)
        return generate_latest(self.metrics.registry)

    async def ping(self) -> bool:
        return True

    # -- processing ------------------------------------------------------------------------

    async def _work(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                vectors = await self._embed_texts(batch)
                for r, vector in zip(batch, vectors, strict=True):
                    if "signal" in r:
                        self.record_signal(r["signal"], r["model"], r["version"], r["value"])
                    else:
                        self._observe(r, vector)
            except Exception:  # observing must never take the observer down
                logger.exception("observer: a batch of %d records failed", len(batch))

    async def _embed_texts(self, batch: list[dict[str, Any]]) -> list[Any]:
        """Each record's input embedding: its own vector (embedding calls) or its sampled
        prompt embedded with the drift embedder, else None."""
        out: list[Any] = [r.get("vector") for r in batch]
        embedder = self.config.drift.embedder
        todo = [i for i, r in enumerate(batch) if r.get("text") and out[i] is None]
        if embedder is None or not todo:
            return out
        texts = [batch[i]["text"][:MAX_DRIFT_TEXT_CHARS] for i in todo]
        try:
            vectors, _ = await self._call_path().embed(
                embedder, texts, SYSTEM_TENANT, CallOptions(priority="batch")
            )
        except Exception as e:  # e.g. a prompt longer than the embedder's window
            logger.warning("observer: drift embedding of %d prompts failed: %s", len(texts), e)
            return out
        for i, v in zip(todo, vectors, strict=True):
            out[i] = v
        return out

    def _observe(self, r: dict[str, Any], vector: Any) -> None:
        now = time.time()
        self.records += 1
        model, version, replica = r["model"], r["version"], r.get("replica")
        failed = r.get("error") is not None
        self._quality.observe(
            Response(
                model,
                version,
                None if failed else r.get("completion_tokens", 0),
                r.get("finish_reason"),
                r.get("error"),
                refused=bool(r.get("refused")),
                filtered=bool(r.get("filtered")),
            )
        )
        if r.get("request_id"):
            self._remember(r["request_id"], r["tenant"], model, version)
        alerts: list[Alert] = []
        if replica:
            service_s = r.get("service_s")
            if service_s is not None and not failed:
                load = int(r.get("load") or 1)
                alerts += self._anomaly.observe_latency(
                    now, replica, model, version, service_s, load=load
                )
            if r.get("error") not in ("cancelled", "CancelledError"):
                alerts += self._anomaly.observe_outcome(now, replica, model, version, not failed)
        monitor = self._drift.get((model, version))
        if monitor is None:
            monitor = self._drift[(model, version)] = DriftMonitor(
                model, version, self.config.drift.config()
            )
        try:
            alerts += monitor.observe(
                now,
                np.asarray(vector, dtype=np.float64) if vector is not None else None,
                int(r.get("prompt_tokens", 0)),
                None if failed or r.get("task") == "embed" else int(r.get("completion_tokens", 0)),
                bool(r.get("refused")),
            )
        except ValueError as e:  # e.g. a new embedder version with another dimension
            logger.warning("observer: drift of %s %s: %s; starting afresh", model, version, e)
            del self._drift[(model, version)]
        iv = self._interval(r.get("at", now))
        iv["requests"] += 1
        iv["errors"] += failed
        iv["tokens_out"] += int(r.get("completion_tokens", 0))
        if r.get("ttft_s") is not None and r.get("task") != "embed":
            iv["ttfts"].append(r["ttft_s"])
        for a in alerts:
            self._raise(a)

    def _remember(self, target: str, tenant: str, model: str, version: str) -> None:
        self._served[target] = (tenant, model, version)
        self._served.move_to_end(target)
        while len(self._served) > SERVED_KEPT:
            self._served.popitem(last=False)

    def _raise(self, alert: Alert) -> None:
        log = logger.warning if alert.severity != "info" else logger.info
        log("alert %s [%s] %s", alert.kind, alert.severity, alert.message)
        self._alerts.add(alert)
        self._interval(time.time())["alerts"] += 1
        self.metrics.alerts.labels(alert.kind, alert.severity, alert.model, alert.version).inc()
        if self.config.webhook:
            task = spawn(self._post(self.config.webhook, alert))
            self._webhook_tasks.add(task)
            task.add_done_callback(self._webhook_tasks.discard)

    @staticmethod
    async def _post(url: str, alert: Alert) -> None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.post(url, json={"type": "airi.alert", **alert.to_dict()})
                response.raise_for_status()
        except Exception as e:
            logger.warning("alert webhook %s failed: %s", url, e)

    # -- timeline --------------------------------------------------------------------------

    def _interval(self, at: float) -> dict[str, Any]:
        """The open interval holding time ``at`` (the oldest open one for a late record)."""
        index = max(int(at // self.config.sample_interval_s), self._closed + 1)
        return self._intervals.setdefault(index, _empty_interval())

    def _ensure_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            self._sampler = spawn(self._sample_loop())

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sample_interval_s / 2)
            try:
                await self._read_gauges()
                self._close_intervals()
            except Exception:
                logger.exception("observer: sampling failed")

    async def _read_gauges(self) -> None:
        """Queue depth (the most seen per tenant), cache hit rate and drift scores, read
        twice per interval into the interval of now."""
        iv = self._interval(time.time())
        if ray.is_initialized():  # else constructed outside Ray (tests)
            try:
                stats = get_actor(SCHEDULER_NAME).timeline_stats.remote()
                found = await asyncio.wait_for(stats, timeout=5)
            except Exception as e:  # a restarting scheduler: no gauges this time
                logger.debug("observer: no scheduler stats: %s", e)
            else:
                for tenant, depth in found["queue_depth"].items():
                    iv["queue_depth"][tenant] = max(iv["queue_depth"].get(tenant, 0), depth)
                iv["cache_hit_rate"] = found["cache_hit_rate"]
        iv["drift"] = self.drift()

    def _close_intervals(self) -> None:
        """Make a sample of every interval that ended ``SETTLE_S`` ago, empty ones included."""
        interval = self.config.sample_interval_s
        last = int((time.time() - SETTLE_S) // interval) - 1
        if last <= self._closed:
            return
        first = self._closed + 1 if self._closed >= 0 else min([*self._intervals, last])
        first = max(first, last - (self._samples.maxlen or 1) + 1)
        for index in range(first, last + 1):
            iv = self._intervals.pop(index, None) or _empty_interval()
            ttfts = iv["ttfts"]
            self._samples.append(
                {
                    "at": (index + 1) * interval,
                    "interval_s": interval,
                    "requests": iv["requests"],
                    "errors": iv["errors"],
                    "tokens_out": iv["tokens_out"],
                    "ttft_ms": (
                        {f"p{q}": float(np.percentile(ttfts, q)) * 1000 for q in (50, 90, 99)}
                        if ttfts
                        else None
                    ),
                    "queue_depth": iv["queue_depth"],
                    "cache_hit_rate": iv["cache_hit_rate"],
                    "drift": iv["drift"],
                    "alerts": iv["alerts"],
                }
            )
        self._closed = last
        for index in [i for i in self._intervals if i <= last]:
            del self._intervals[index]


def _empty_interval() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors": 0,
        "tokens_out": 0,
        "ttfts": [],
        "alerts": 0,
        "queue_depth": {},
        "cache_hit_rate": {},
        "drift": {},
    }
