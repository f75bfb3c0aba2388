"""Fairness under contention: virtual token counters against first-come-first-served.

Two tenants of equal weight share one replica of the tiny model. Tenant A sends 8 times
B's request rate; B alone already asks for more than half of what the replica serves, so
both stay backlogged for the whole measured window. The same workload runs once with
``scheduler.policy: vtc`` and once with ``fcfs``, in one run, through the Python client
(the real scheduler, replica and engine; no HTTP in the way).

Service is weighted as the scheduler weighs it: 1 per input token, ``output_weight`` (2)
per output token, counted by the client as tokens arrive. Reported per policy: each
tenant's share of served service, B's TTFT p50/p99, and the largest gap between the two
tenants' service accumulated since the window began, at any time in the window. The
bound is the paper's (Sheng et al., OSDI 2024, Theorem 4.4): 2 * max(w_p * L_input,
w_q * M), with M the tokens one running batch holds.

    python benchmarks/fairness.py [--seconds 60]

Writes ``benchmarks/results/fairness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airi_ray.core.stats import percentile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fairness.json"
KEYS = {
    "A": "sk-airi-fa0000000001-benchFairnessTenantA1",
    "B": "sk-airi-fb0000000001-benchFairnessTenantB1",
}
OUTPUT_TOKENS = 64
OUTPUT_WEIGHT = 2.0
SLOTS = 8
RATE_RATIO = 8


# The run's own usage log, conversations and drift windows: none of an earlier run's.
STATE = tempfile.mkdtemp(prefix="airi-fairness-bench-")


def spec(model_dir: str, policy: str) -> dict[str, Any]:
    return {
        "name": "fairness",
        "models": [
            {
                "name": "tiny-chat",
                "model": model_dir,
                "replicas": 1,
                "num_cpus": 1,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "max_concurrency": SLOTS,
                "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
            }
        ],
        "storage": {"uri": STATE},  # a run reads no state of the runs before it
        "tenants": [
            {"name": "A", "api_keys": [KEYS["A"]]},
            {"name": "B", "api_keys": [KEYS["B"]]},
        ],
        # Queues deep enough that nothing is refused: the point is the order of service.
        "scheduler": {
            "policy": policy,
            "output_weight": OUTPUT_WEIGHT,
            "max_queue_per_model": 100_000,
            "max_queued_per_tenant": 50_000,
            "queue_timeout_s": 600,
        },
        "ingress": {"enabled": False},
    }


PROMPTS = [f"Order {i}: can I return hiking boots after 30 days at Nimbus Gear?" for i in range(50)]


class Tenant:
    def __init__(self, name: str, client: Any) -> None:
        self.name = name
        self.client = client
        self.events: list[tuple[float, float]] = []  # (time, weighted service)
        self.ttfts: list[tuple[float, float]] = []  # (first-token time, ttft)
        self.max_prompt_tokens = 0

    async def one(self, i: int) -> None:
        t0 = time.perf_counter()
        g = await self.client.completion_generation(
            "tiny-chat", PROMPTS[i % len(PROMPTS)], max_tokens=OUTPUT_TOKENS, ignore_eos=True
        )
        first = True
        async for _, n, _ in g:
            now = time.perf_counter()
            w = OUTPUT_WEIGHT * n
            if first and n:
                first = False
                self.ttfts.append((now, now - t0))
                w += g.usage.prompt_tokens
                self.max_prompt_tokens = max(self.max_prompt_tokens, g.usage.prompt_tokens)
            self.events.append((now, w))


async def open_loop(tenant: Tenant, rate: float, until: float, tasks: set[Any]) -> None:
    """Issue requests at ``rate`` per second until ``until`` (no waiting for answers)."""
    i, start = 0, time.perf_counter()
    while (now := time.perf_counter()) < until:
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.ensure_future(tenant.one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1


async def capacity(clients: dict[str, Any], seconds: float) -> float:
    """Requests per second the replica completes when kept full (both tenants)."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(c: Any) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await c.complete("tiny-chat", PROMPTS[0], max_tokens=OUTPUT_TOKENS, ignore_eos=True)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(clients["AB"[k % 2]]) for k in range(SLOTS * 2)))
    return done / (time.perf_counter() - t0)


async def run_policy(clients: dict[str, Any], rate_b: float, seconds: float) -> dict[str, Any]:
    from airi_ray.runtime import names

    scheduler = names.get_actor(names.SCHEDULER_NAME)
    tenants = {k: Tenant(k, c) for k, c in clients.items()}
    tasks: set[Any] = set()
    warmup = 5.0
    t_start = time.perf_counter()
    window = (t_start + warmup, t_start + warmup + seconds)
    depths: list[dict[str, int]] = []

    async def sample_queues() -> None:
        while time.perf_counter() < window[1]:
            await asyncio.sleep(1.0)
            if time.perf_counter() >= window[0]:
                snap = await scheduler.metrics_text.remote()
                depths.append(_tenant_depths(snap.decode()))

    await asyncio.gather(
        open_loop(tenants["A"], RATE_RATIO * rate_b, window[1], tasks),
        open_loop(tenants["B"], rate_b, window[1], tasks),
        sample_queues(),
    )
    for task in list(tasks):  # what is still queued or running is not measured
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks, return_exceptions=True)
    await _wait_idle(scheduler)

    # Weighted service per tenant within the window, merged in time order.
    merged = sorted(
        (t, k, w) for k, ten in tenants.items() for t, w in ten.events if window[0] <= t < window[1]
    )
    served = {"A": 0.0, "B": 0.0}
    gap = 0.0
    for _, k, w in merged:
        served[k] += w
        gap = max(gap, abs(served["A"] - served["B"]))
    total = sum(served.values()) or 1.0
    # B's requests that got their first token within the window (wherever they were issued).
    ttft_b = [d for t, d in tenants["B"].ttfts if window[0] <= t < window[1]]
    return {
        "share_a": round(served["A"] / total, 3),
        "share_b": round(served["B"] / total, 3),
        "served_weighted_tokens": {k: round(v) for k, v in served.items()},
        "max_service_gap_tokens": round(gap),
        "b_ttft_p50_ms": round(1000 * percentile(ttft_b, 50), 1) if ttft_b else None,
        "b_ttft_p99_ms": round(1000 * percentile(ttft_b, 99), 1) if ttft_b else None,
        "max_prompt_tokens": max(t.max_prompt_tokens for t in tenants.values()),
        "min_queue_depth": {k: min((d.get(k, 0) for d in depths), default=0) for k in ("A", "B")},
        "median_queue_depth": {
            k: statistics.median([d.get(k, 0) for d in depths]) if depths else 0 for k in ("A", "B")
        },
    }


def _tenant_depths(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith('airi_queue_depth{model="tiny-chat",tenant="'):
            tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
            out[tenant] = int(float(line.rsplit(" ", 1)[1]))
    return out


async def _wait_idle(scheduler: Any) -> None:
    for _ in range(600):
        snap = await scheduler.snapshot.remote()
        m = snap.get("tiny-chat", {})
        if not m.get("queue_depth") and not m.get("in_flight"):
            return
        await asyncio.sleep(0.1)


async def measure(model_dir: str, seconds: float) -> dict[str, Any]:
    import airi_ray as airi
    from airi_ray.client import AsyncClient

    results: dict[str, Any] = {}
    clients = {k: AsyncClient(api_key=key) for k, key in KEYS.items()}
    for c in clients.values():
        await c.warm()
    cap = await capacity(clients, 10.0)
    rate_b = 0.75 * cap  # B alone wants 75% of the replica: backlogged under any fair share
    results["capacity_rps"] = round(cap, 2)
    results["rate_b_rps"] = round(rate_b, 2)
    results["rate_a_rps"] = round(RATE_RATIO * rate_b, 2)
    for policy in ("vtc", "fcfs"):
        print(f"policy {policy}: {seconds:.0f}s backlogged ...", flush=True)
        await asyncio.to_thread(airi.deploy, spec(model_dir, policy))
        results[policy] = await run_policy(clients, rate_b, seconds)
    return results


def main() -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.seconds = 3.0
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    try:
        airi.deploy(spec(model_dir, "vtc"))
        out = asyncio.run(measure(model_dir, args.seconds))
    finally:
        airi.shutdown()
        ray.shutdown()

    prompt_tokens = max(out[p]["max_prompt_tokens"] for p in ("vtc", "fcfs"))
    batch_tokens = SLOTS * (prompt_tokens + OUTPUT_TOKENS)
    bound = 2 * max(1 * prompt_tokens, OUTPUT_WEIGHT * batch_tokens)
    result = {
        "workload": {
            "tenants": {"A": {"weight": 1}, "B": {"weight": 1}},
            "rate_ratio_a_to_b": RATE_RATIO,
            "output_tokens": OUTPUT_TOKENS,
            "output_weight": OUTPUT_WEIGHT,
            "replica_slots": SLOTS,
            "seconds": args.seconds,
            "capacity_rps": out["capacity_rps"],
            "rate_a_rps": out["rate_a_rps"],
            "rate_b_rps": out["rate_b_rps"],
        },
        "vtc": out["vtc"],
        "fcfs": out["fcfs"],
        "vtc_bound_tokens": bound,
        "vtc_bound_formula": "2 * max(w_p * L_input, w_q * M), M = slots * (L_input + max_tokens)",
        "targets": {"vtc.share_b": [0.45, 0.55], "vtc.max_service_gap_tokens": f"< {bound}"},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'policy':<8} {'share A':>8} {'share B':>8} {'max gap':>9} {'B TTFT p50':>11} {'p99':>9}"
    )
    for p in ("vtc", "fcfs"):
        r = out[p]
        print(
            f"{p:<8} {r['share_a']:>8.3f} {r['share_b']:>8.3f} {r['max_service_gap_tokens']:>9} "
            f"{r['b_ttft_p50_ms']:>11} {r['b_ttft_p99_ms']:>9}"
        )
    print(f"VTC bound: {bound} weighted tokens; target share_b 0.45-0.55")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
