"""The observer's bookkeeping without Ray: quality per version, drift and latency alerts
from call records, feedback, and the timeline's intervals by each call's own end time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.runtime.observer import Observer


def _record(i: int, vector: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "task": "embed" if vector is not None else "generate",
        "model": "m",
        "version": "1",
        "replica": "m-1-a",
        "tenant": "t",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "ttft_s": 0.02,
        "service_s": 0.02,
        "finish_reason": "stop",
        "error": None,
        "refused": False,
        "filtered": False,
        "text": None,
        "vector": vector,
        "at": time.time(),
    } | extra


def _observer(**drift: Any) -> Observer:
    o = Observer()
    o.configure(
        {
            "drift": {
                "reference_size": 100,
                "window_size": 50,
                "min_samples": 50,
                "check_every": 10,
                "bins": 5,
                "psi_warn": 0.2,
                "psi_alert": 0.35,
            }
            | drift
        }
    )
    return o


def _feed(o: Observer, records: list[dict[str, Any]]) -> None:
    async def run() -> None:
        await o.record(records)
        assert o._worker is not None
        await o._worker
        if o._sampler is not None:
            o._sampler.cancel()

    asyncio.run(run())


def test_a_shift_of_input_embeddings_raises_a_drift_alert() -> None:
    o = _observer()
    rng = np.random.default_rng(0)
    base = rng.normal(size=32)
    same = [list(base + rng.normal(scale=0.5, size=32)) for _ in range(200)]
    _feed(o, [_record(i, v) for i, v in enumerate(same)])
    assert o.alerts() == []
    other = rng.normal(size=32)
    moved = [list(other + rng.normal(scale=0.5, size=32)) for _ in range(60)]
    _feed(o, [_record(1000 + i, v) for i, v in enumerate(moved)])
    kinds = {a["kind"] for a in o.alerts()}
    assert "drift.embedding" in kinds
    assert o.drift()["m@1"]["embedding_psi"] > 0.35


def test_a_slow_replica_raises_a_latency_anomaly() -> None:
    o = _observer()
    _feed(o, [_record(i, service_s=0.02 * (1 + 0.1 * (i % 3))) for i in range(40)])
    _feed(o, [_record(100 + i, service_s=0.5) for i in range(3)])
    [alert] = o.alerts()
    assert alert["kind"] == "anomaly.latency" and alert["replica"] == "m-1-a"


def test_quality_and_feedback_per_version() -> None:
    o = _observer()
    _feed(o, [_record(0, refused=True), _record(1, error="InvalidRequest")])
    q = o.quality()["m"]["1"]
    assert q["responses"] == 2 and q["refusal_rate"] == 0.5 and q["error_rate"] == 0.5
    assert o.feedback("t", "req-0", 1)["version"] == "1"
    assert o.quality()["m"]["1"]["feedback_mean"] == 1.0
    with pytest.raises(NotFound):
        o.feedback("other-tenant", "req-0", 1)  # not the tenant's
    with pytest.raises(NotFound):
        o.feedback("t", "req-unknown", 1)
    with pytest.raises(InvalidRequest, match="score"):
        o.feedback("t", "req-0", 1.5)
    with pytest.raises(InvalidRequest, match="severity"):
        o.alerts(severity="loud")
    with pytest.raises(InvalidRequest, match="limit"):
        o.alerts(limit=0)
    o.record_nodes(
        [
            {
                "graph": "g",
                "node": None,
                "ms": 5.0,
                "status": "finished",
                "run_id": "run-1",
                "tenant": "t",
                "model": "m",
                "version": "1",
            }
        ]
    )
    assert o.feedback("t", "run-1", -1)["model"] == "m"  # a run is credited to its answer
    assert b"airi_quality" in o.metrics_text()


def test_timeline_counts_calls_in_the_interval_they_ended() -> None:
    o = _observer()
    interval = o.config.sample_interval_s
    now = time.time()
    old = now - 4 * interval  # two calls that ended a while ago, processed only now
    _feed(o, [_record(0, at=old), _record(1, at=old), _record(2, at=now)])
    o._close_intervals()
    samples = o.timeline()
    assert sum(s["requests"] for s in samples) == 2  # the recent one's interval is still open
    counted = [s for s in samples if s["requests"]]
    assert len(counted) == 1 and counted[0]["at"] - interval <= old < counted[0]["at"]
    assert all(s["queue_depth"] == {} for s in samples)
