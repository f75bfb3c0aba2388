"""What the control plane's decisions cost: one function per measurement.

``pack``: the pure packer places 1,000 replicas of 20 models over 100 nodes (60 with
8 x H100, 40 with 4 x L4; 640 devices) from an empty cluster, in one ``place`` call:
100 tensor-parallel replicas (2 devices, H100 then L4), 300 whole-device replicas (L4
first for half the models, H100 first for the other half) and 600 fractional ones (1/4 or
1/8 of a device, with memory). The demand is 612.5 devices, so the pools end nearly full
and the packing order matters. ``pack_1000_ms`` is the median over repetitions; target:
well under a second. No Ray, no I/O: the core object only.

Results are merged into ``benchmarks/results/control_plane.json``: keys written by other
measurements (e.g. a runtime ``rollout_s``) are kept. To add a measurement, write a
function returning its keys and add it to ``MEASUREMENTS``.

    python benchmarks/control_plane.py [--only pack] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


MEASUREMENTS: dict[str, Callable[[int], dict[str, Any]]] = {"pack": measure_pack}


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), action="append")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.only or list(MEASUREMENTS):
        results.update(MEASUREMENTS[name](args.repeats))
    write(results)


if __name__ == "__main__":
    main()
