"""What one scheduling decision of the pure core costs, with 10,000 requests queued.

Workload: one model with 4 replicas (64 slots and 200,000 KV tokens each), 100 tenants
(weights 1 to 3), 10,000 requests queued; every request carries the block hashes of one of
20 shared system prompts (prefix routing does real work) and half carry a session id.

Two decisions, each timed over many repetitions in steady state:

- ``backlog``: a lease is released (timed apart as ``release``), then one new request is
  enqueued and ``dispatch`` grants exactly one lease from the 10,000 waiting. The decision
  is enqueue + dispatch: the fair choice among 100 tenants, admission and routing.
- ``room``: the same 10,000 stay queued for that model, and a second model with free
  replicas gets one request: enqueue + dispatch grants it at once. This is the common
  path when capacity is free, measured with a large backlog elsewhere.

``decision_us_p50`` is the backlog case (the harder one). Target: under 50 us. No Ray, no
I/O: the core object only. Writes ``benchmarks/results/scheduler_core.json``.

    python benchmarks/scheduler_core.py [--samples 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airi_ray.core.scheduling import (  # noqa: E402
    AcquireRequest,
    ReplicaView,
    Scheduler,
    block_hashes,
)

RESULTS = ROOT / "benchmarks" / "results" / "scheduler_core.json"
TARGET_US = 50.0
QUEUED = 10_000
TENANTS = 100
REPLICAS = 4
SLOTS = 64
KV_TOKENS = 200_000
PROMPTS = 20
PROMPT_TOKENS = 256  # 16 blocks of 16 tokens: the shared system prompt


class Workload:
    """Requests with a fixed random stream, so runs are comparable."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.prefixes = [
            block_hashes([p * 100_000 + t for t in range(PROMPT_TOKENS)]) for p in range(PROMPTS)
        ]

    def request(self, model: str = "m") -> AcquireRequest:
        rng = self.rng
        self.n += 1
        tenant = f"tenant-{rng.randrange(TENANTS):03d}"
        return AcquireRequest(
            f"r{self.n}",
            model,
            tenant,
            prompt_tokens=rng.randint(64, 1024),
            max_tokens=rng.randint(16, 512),
            priority="batch" if rng.random() < 0.2 else "interactive",
            deadline_s=rng.choice([None, 5.0, 30.0]),
            session_id=f"s{rng.randrange(5000)}" if rng.random() < 0.5 else None,
            prefix_hashes=rng.choice(self.prefixes),
        )


def build() -> tuple[Scheduler, Workload, list[str]]:
    """A scheduler with every replica full and ``QUEUED`` requests waiting."""
    s = Scheduler(max_queue_per_model=QUEUED * 2, max_queued_per_tenant=QUEUED)
    s.set_tenants({f"tenant-{i:03d}": 1.0 + i % 3 for i in range(TENANTS)})
    s.set_replicas(
        "m",
        [
            ReplicaView(
                f"m-{i}", "m", SLOTS, "L4" if i % 2 else "CPU", kv_capacity_tokens=KV_TOKENS
            )
            for i in range(REPLICAS)
        ],
    )
    s.set_preferred_accelerators("m", ["L4"])
    s.set_replicas("n", [ReplicaView(f"n-{i}", "n", SLOTS) for i in range(REPLICAS)])
    w = Workload()
    now = 0.0
    leased: list[str] = []
    while s.queue_depth("m") < QUEUED:
        now += 0.001
        s.enqueue(w.request(), now)
        leased += [lease.request_id for lease in s.dispatch(now)]
    return s, w, leased


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def measure(samples: int, warmup: int) -> dict[str, dict[str, float]]:
    s, w, leased = build()
    clock = time.perf_counter_ns
    times: dict[str, list[float]] = {"backlog": [], "release": [], "room": []}
    now = 1000.0
    rng = random.Random(1)
    for i in range(warmup + samples):
        now += 0.001
        # backlog: free one slot, then one enqueue + dispatch grants one lease
        victim = leased.pop(rng.randrange(len(leased)))
        t0 = clock()
        s.release(victim, rng.randint(1, 512), now)
        t1 = clock()
        s.enqueue(w.request(), now)
        granted = s.dispatch(now)
        t2 = clock()
        assert s.queue_depth("m") >= QUEUED - 1, "the backlog must stay full"
        leased += [lease.request_id for lease in granted]
        # room: a model with free replicas, while "m" keeps its backlog
        r = w.request("n")
        t3 = clock()
        s.enqueue(r, now)
        [lease] = s.dispatch(now)
        t4 = clock()
        s.release(lease.request_id, 1, now)
        if i >= warmup:
            times["release"].append((t1 - t0) / 1000)
            times["backlog"].append((t2 - t1) / 1000)
            times["room"].append((t4 - t3) / 1000)
    return {
        name: {
            "p50_us": round(percentile(v, 0.50), 2),
            "p99_us": round(percentile(v, 0.99), 2),
            "mean_us": round(statistics.fmean(v), 2),
        }
        for name, v in times.items()
    }


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.samples, args.warmup = 500, 50
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    results = measure(args.samples, args.warmup)
    print(f"{'operation':<36}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    labels = {
        "backlog": "enqueue + dispatch (from backlog)",
        "room": "enqueue + dispatch (free replica)",
        "release": "release (charge output)",
    }
    for name, label in labels.items():
        r = results[name]
        print(f"{label:<36}{r['p50_us']:>10}{r['p99_us']:>10}{r['mean_us']:>10}")
    p50 = results["backlog"]["p50_us"]
    print(
        f"\ndecision p50 {p50} us, target < {TARGET_US:g} us: {'met' if p50 < TARGET_US else 'MISSED'}"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "decision_us_p50": p50,
                "decision_us_p99": results["backlog"]["p99_us"],
                "target_us_p50": TARGET_US,
                "meets_target": p50 < TARGET_US,
                "operations": results,
                "workload": {
                    "queued": QUEUED,
                    "tenants": TENANTS,
                    "replicas": REPLICAS,
                    "slots_per_replica": SLOTS,
                    "kv_tokens_per_replica": KV_TOKENS,
                    "shared_prompts": PROMPTS,
                    "prefix_blocks_per_request": PROMPT_TOKENS // 16,
                    "samples": args.samples,
                    "warmup": args.warmup,
                },
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
