"""What the inference fabric costs: a graph hop, and durable context writes.

Three measurements on a local Ray cluster with the airi app deployed (no models: the graph's
nodes are no-op Python functions, so only the fabric is measured):

- ``ray_call_ms``: a sequential call to a no-op method of an async Ray actor (the unit a
  distributed runtime cannot go below);
- ``hop_ms``: the cost of one more node in a run. Runs of a 1-node and a 5-node chain of
  no-op Python nodes go through the Python client (``AsyncClient.run_graph``: start, which
  commits the run's start to the context store, then wait); ``hop_ms`` is
  ``(run5_ms - run1_ms) / 4`` on the medians. Each node's checkpoint is sent to the store as
  the node finishes; the run answers once they are all durable. Target:
  ``hop_ms <= 2 * ray_call_ms``. ``run5_ms / 5`` is reported too, with the fixed costs in;
- ``context_writes_per_s``: 16 concurrent writers appending turns (each acknowledged only
  after its LanceDB commit) to 16 conversations, for ``--seconds``; ``single_writer_per_s``
  is one writer alone, for comparison (grouped commits are what the 16 gain).

Writes ``benchmarks/results/fabric.json``.

    python benchmarks/fabric.py [--runs 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
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

import ray  # noqa: E402

import airi_ray as airi  # noqa: E402
from airi_ray.client import AsyncClient  # noqa: E402
from airi_ray.graphs import END, START, Field, StateGraph  # noqa: E402
from airi_ray.runtime import names  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fabric.json"
KEY = "sk-airi-fab000000001-fabricBenchTenant01"
WRITERS = 16


def noop(view: dict[str, Any]) -> dict[str, Any]:
    return {}


def chain(name: str, n: int) -> Any:
    g = StateGraph(name, {"x": Field()}, inputs=["x"])
    prev = START
    for i in range(n):
        g.add_node(f"n{i}", noop)
        g.add_edge(prev, f"n{i}")
        prev = f"n{i}"
    g.add_edge(prev, END)
    return g.compile()


class Echo:
    async def ping(self) -> int:
        return 1


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50": round(statistics.median(s) * 1000, 3),
        "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 3),
    }


async def ray_call(n: int) -> list[float]:
    echo = ray.remote(Echo).options(num_cpus=0).remote()
    await echo.ping.remote()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await echo.ping.remote()
        out.append(time.perf_counter() - t)
    ray.kill(echo)
    return out


async def graph_runs(client: AsyncClient, graph: str, n: int) -> list[float]:
    await client.run_graph(graph, {"x": 0})  # warm
    out = []
    for i in range(n):
        t = time.perf_counter()
        result = await client.run_graph(graph, {"x": i})
        out.append(time.perf_counter() - t)
        assert result["status"] == "finished", result
    return out


async def writes(writers: int, seconds: float) -> float:
    store = names.get_actor(names.CONTEXT_STORE_NAME)
    stop = time.perf_counter() + seconds
    counts = [0] * writers
    tag = time.time_ns()

    async def writer(w: int) -> None:
        while time.perf_counter() < stop:
            turn = {"role": "user", "content": f"turn {counts[w]}", "seq": counts[w]}
            await store.append_turns.remote("bench", f"bench-{tag}-{w}", [turn])
            counts[w] += 1

    start = time.perf_counter()
    await asyncio.gather(*[writer(w) for w in range(writers)])
    return sum(counts) / (time.perf_counter() - start)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    client = AsyncClient(api_key=KEY)
    for n in (1, 5):
        await client.register_graph(chain(f"chain{n}", n))
    call = await ray_call(args.runs * 5)
    run1, run5 = [], []
    for _ in range(4):  # interleaved rounds, so drift on a shared machine hits both alike
        run1 += await graph_runs(client, "chain1", args.runs // 4)
        run5 += await graph_runs(client, "chain5", args.runs // 4)
    single = await writes(1, args.seconds)
    many = await writes(WRITERS, args.seconds)
    await client.close()
    r1, r5, rc = _ms(run1), _ms(run5), _ms(call)
    hop = (r5["p50"] - r1["p50"]) / 4
    return {
        "hop_ms": round(hop, 3),
        "ray_call_ms": rc["p50"],
        "hop_target": "hop_ms <= 2 * ray_call_ms",
        "hop_meets_target": hop <= 2 * rc["p50"],
        "run1_ms": r1,
        "run5_ms": r5,
        "run5_per_node_ms": round(r5["p50"] / 5, 3),
        "ray_call_ms_p99": rc["p99"],
        "context_writes_per_s": round(many, 1),
        "single_writer_per_s": round(single, 1),
        "writers": WRITERS,
    }


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.runs, args.seconds = 10, 0.5
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    state = tempfile.mkdtemp(prefix="airi-fabric-")
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    try:
        airi.deploy(
            {
                "name": "fabric",
                "tenants": [{"name": "bench", "api_keys": [KEY]}],
                "ingress": {"enabled": False},
                "storage": {"uri": state},
            }
        )
        result = asyncio.run(measure(args))
    finally:
        airi.shutdown()
        ray.shutdown()
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(f"{'measure':<28}{'value':>12}")
    for key in ("ray_call_ms", "hop_ms", "run5_per_node_ms", "context_writes_per_s"):
        print(f"{key:<28}{result[key]:>12}")
    print(f"{'run1_ms p50/p99':<28}{result['run1_ms']['p50']:>6} / {result['run1_ms']['p99']}")
    print(f"{'run5_ms p50/p99':<28}{result['run5_ms']['p50']:>6} / {result['run5_ms']['p99']}")
    print(f"{'single_writer_per_s':<28}{result['single_writer_per_s']:>12}")
    verdict = "meets" if result["hop_meets_target"] else "MISSES"
    print(
        f"hop_ms {result['hop_ms']} {verdict} the target of 2 x ray_call_ms = {2 * result['ray_call_ms']:.3f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
