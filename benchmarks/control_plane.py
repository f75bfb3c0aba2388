"""What the control plane's decisions cost: one function per measurement.

``pack``: the pure packer places 1,000 replicas of 20 models over 100 nodes (60 with
8 x H100, 40 with 4 x L4; 640 devices) from an empty cluster, in one ``place`` call:
100 tensor-parallel replicas (2 devices, H100 then L4), 300 whole-device replicas (L4
first for half the models, H100 first for the other half) and 600 fractional ones (1/4 or
1/8 of a device, with memory). The demand is 612.5 devices, so the pools end nearly full
and the packing order matters. ``pack_1000_ms`` is the median over repetitions; target:
well under a second. No Ray, no I/O: the core object only.

``rollout``: on a real local Ray cluster, the tiny demo model serves v1 (one replica)
under steady load (two clients calling it back to back); ``client.rollout`` moves it to
v2, first blue-green, then back to v1 as a canary (steps 50, 100, each held 1 s and judged
on 10 requests). ``rollout_s`` is the blue-green time from the rollout call to the moment
the new version takes all traffic, split into ``candidate_load_s`` (the new replica's
engine start: the floor no rollout can beat here) and ``switch_s`` (ready to 100%, the
control plane's own share). The canary back to v1 starts while v1 still drains, so v1 is
warm (it comes back to ready at once): ``canary_rollout_s`` is the control plane's steps
alone (two steps, each held 1 s and judged on 10 requests). Failed client requests during
both are counted: the target is zero.

Results are merged into ``benchmarks/results/control_plane.json``: keys written by other
measurements are kept. To add a measurement, write a function returning its keys and add
it to ``MEASUREMENTS``.

    python benchmarks/control_plane.py [--only pack] [--only rollout] [--repeats 7]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airi_ray.core.placement import (  # noqa: E402
    NodeCapacity,
    Packer,
    ReplicaNeeds,
    ReplicaRequest,
)

RESULTS = ROOT / "benchmarks" / "results" / "control_plane.json"
PACK_TARGET_MS = 1000.0
H100_NODES, H100_DEVICES = 60, 8
L4_NODES, L4_DEVICES = 40, 4


def cluster() -> list[NodeCapacity]:
    return [NodeCapacity(f"h{i:03d}", "H100", H100_DEVICES, 80.0) for i in range(H100_NODES)] + [
        NodeCapacity(f"l{i:03d}", "L4", L4_DEVICES, 24.0) for i in range(L4_NODES)
    ]


def replicas() -> list[ReplicaRequest]:
    """1,000 replicas of 20 models, interleaved by model as a controller would ask."""
    models: list[tuple[str, ReplicaNeeds, int]] = []
    for m in range(4):
        models.append((f"tp{m}", ReplicaNeeds(f"tp{m}", ("H100", "L4"), devices=2), 25))
    for m in range(6):
        types = ("L4", "H100") if m % 2 else ("H100", "L4")
        models.append((f"w{m}", ReplicaNeeds(f"w{m}", types, memory_gib=16.0), 50))
    for m in range(10):
        fraction = 0.25 if m % 2 else 0.125
        needs = ReplicaNeeds(f"f{m}", ("L4", "H100"), fraction=fraction, memory_gib=2.0 + m)
        models.append((f"f{m}", needs, 60))
    out: list[ReplicaRequest] = []
    for i in range(max(count for _, _, count in models)):
        out += [ReplicaRequest(f"{name}-{i}", needs) for name, needs, count in models if i < count]
    assert len(out) == 1000
    return out


def measure_pack(repeats: int) -> dict[str, Any]:
    """Time one ``place`` of 1,000 replicas on an empty 100-node cluster."""
    nodes, requests = cluster(), replicas()
    times: list[float] = []
    for _ in range(repeats):
        packer = Packer(nodes)
        t0 = time.perf_counter()
        result = packer.place(requests)
        times.append((time.perf_counter() - t0) * 1000)
    ms = statistics.median(times)
    pools = {
        t: {
            "capacity_devices": r.capacity_devices,
            "used_devices": r.used_devices,
            "free_whole_devices": r.free_whole_devices,
            "largest_free_block": r.largest_free_block,
            "fragmentation": r.fragmentation,
            "leases": r.leases,
        }
        for t, r in packer.reports().items()
    }
    print(f"{'pool':<8}{'devices':>10}{'used':>10}{'leases':>10}{'frag':>10}")
    for t, p in pools.items():
        print(
            f"{t:<8}{p['capacity_devices']:>10}{p['used_devices']:>10.2f}"
            f"{p['leases']:>10}{p['fragmentation']:>10.3f}"
        )
    print(
        f"\npack 1,000 replicas over 100 nodes: {ms:.1f} ms (median of {repeats}), "
        f"{len(result.leases)} placed, {len(result.pending)} pending; "
        f"target < {PACK_TARGET_MS:g} ms: {'met' if ms < PACK_TARGET_MS else 'MISSED'}\n"
    )
    return {
        "pack_1000_ms": round(ms, 1),
        "pack_target_ms": PACK_TARGET_MS,
        "pack_meets_target": ms < PACK_TARGET_MS,
        "pack": {
            "placed": len(result.leases),
            "pending": len(result.pending),
            "repeats": repeats,
            "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1),
            "pools": pools,
            "workload": {
                "nodes": H100_NODES + L4_NODES,
                "devices": H100_NODES * H100_DEVICES + L4_NODES * L4_DEVICES,
                "replicas": len(requests),
                "models": 20,
                "demand_devices": sum(r.needs.devices * r.needs.fraction for r in requests),
            },
        },
    }


def _timed_rollout(client: Any, version: str, strategy: str) -> tuple[float, float]:
    """Seconds from ``client.rollout`` to the candidate being ready, and to 100% of traffic
    on it (polled every 50 ms)."""
    t0 = time.perf_counter()
    client.rollout("tiny", version, strategy=strategy)
    ready_at = None
    while True:
        m = next(m for m in client.status()["models"] if m["name"] == "tiny")
        v = {x["version"]: x for x in m["versions"]}[version]
        if ready_at is None and v["state"] == "ready":
            ready_at = time.perf_counter() - t0
        if v["traffic"] == 1.0:
            done = time.perf_counter() - t0
            return ready_at if ready_at is not None else done, done
        if (m["rollout"] or {}).get("outcome") == "rolled_back":
            raise RuntimeError(f"the rollout rolled back: {m['rollout']['reason']}")
        time.sleep(0.05)


def measure_rollout(repeats: int) -> dict[str, Any]:
    """A blue-green and a canary rollout of the tiny model under steady load."""
    import threading

    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    engine = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}
    spec = {
        "name": "bench-rollout",
        "ingress": {"enabled": False, "auth": "none"},
        "storage": {"uri": tempfile.mkdtemp(prefix="airi-bench-rollout-")},
        "models": [
            {
                "name": "tiny",
                "version": "v1",
                "model": str(ensure_tiny_model()),
                "num_cpus": 0.5,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "engine": engine,
                "versions": {"v2": {}},
                "rollout": {"steps": [50, 100], "step_hold_s": 1, "min_requests_per_step": 10},
            }
        ],
    }
    ray.init(num_cpus=4, namespace="airi", include_dashboard=False, log_to_driver=False)
    try:
        airi.deploy(spec)
        client = airi.connect("auto")
        ok, failed, stop = [0], [0], threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    client.chat("tiny", "Hello there, how are you?", max_tokens=4)
                    ok[0] += 1
                except Exception:
                    failed[0] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        load_s, rollout_s = _timed_rollout(client, "v2", "blue-green")
        canary_load_s, canary_s = _timed_rollout(client, "v1", "canary")
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        airi.shutdown()
        ray.shutdown()
    print(f"{'rollout':<12}{'total s':>10}{'load s':>10}{'switch s':>10}")
    print(f"{'blue-green':<12}{rollout_s:>10.2f}{load_s:>10.2f}{rollout_s - load_s:>10.2f}")
    print(f"{'canary':<12}{canary_s:>10.2f}{canary_load_s:>10.2f}{canary_s - canary_load_s:>10.2f}")
    print(f"\nrequests under load: {ok[0]} served, {failed[0]} failed (target: 0 failed)\n")
    return {
        "rollout_s": round(rollout_s, 2),
        "candidate_load_s": round(load_s, 2),
        "switch_s": round(rollout_s - load_s, 2),
        "canary_rollout_s": round(canary_s, 2),
        "canary_steps": [50, 100],
        "requests_served": ok[0],
        "requests_failed": failed[0],
    }


MEASUREMENTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "pack": measure_pack,
    "rollout": measure_rollout,
}


def write(results: dict[str, Any]) -> None:
    """Merge ``results`` into the JSON file, keeping keys other measurements wrote."""
    merged: dict[str, Any] = {}
    if RESULTS.exists():
        merged = json.loads(RESULTS.read_text())
    merged.update(results)
    merged["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), action="append")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.repeats = 1
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    results: dict[str, Any] = {}
    for name in args.only or list(MEASUREMENTS):
        results.update(MEASUREMENTS[name](args.repeats))
    write(results)


if __name__ == "__main__":
    main()
