"""The support assistant under load: 16 concurrent conversations of 3 turns each.

A local Ray cluster runs ``deployments/support_assistant.yaml`` (MiniLM, the two
specialised generators, the graph built by its builder). Sixteen conversations run at once
through the Python client, each turn a graph run (memory, intent, retrieval, answer,
relevance and grounding check, maybe a rewrite and another retrieval, memory write).

- ``runs_per_s``: graph runs finished per second of wall time;
- ``e2e_ms_p50``, ``e2e_ms_p99``: a run's latency as its client sees it;
- ``overhead_share``: from each run's trace, the share of the run's time spent outside
  the engines, retrieval and embedding: the run's span minus the union of its model-call
  and retrieval spans, plus the time model calls waited in the scheduler's queue (inside
  their spans but not in an engine). Summed over runs, divided by the runs' total time.
  ``outside_calls_share`` leaves the queue waits out (only the time between calls).

No baseline is named for it; the engines' share is the floor on two CPU cores.
Writes ``benchmarks/results/assistant.json``.

    python benchmarks/assistant.py [--conversations 16] [--turns 3]
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

RESULTS = ROOT / "benchmarks" / "results" / "assistant.json"
FOLLOW_UPS = ["And for Nimbus Plus members?", "How long does that usually take?"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def turns(i: int, n: int) -> list[str]:
    from deployments import support_assistant as sa

    held_out = sa.load_examples("intents_heldout")
    retrieval = sa.load_examples("retrieval_questions")
    out = [held_out[i % len(held_out)]["text"], FOLLOW_UPS[i % len(FOLLOW_UPS)]]
    out.append(retrieval[i % len(retrieval)]["question"])
    return out[:n]


async def conversation(client: Any, i: int, n: int) -> list[tuple[str, float]]:
    from deployments import support_assistant as sa

    done = []
    for question in turns(i, n):
        t0 = time.perf_counter()
        run = await client.run_graph(
            sa.GRAPH, {"question": question, "conversation_id": f"bench-{i}"}
        )
        if run["status"] != "finished":
            raise RuntimeError(f"run {run['run_id']} {run['status']}: {run['error']}")
        done.append((run["run_id"], (time.perf_counter() - t0) * 1000))
    return done


def shares(spans: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(run ms, ms outside calls and retrievals, ms model calls waited in queues)."""
    from airi_ray.core.traces import time_outside

    total, outside = time_outside(spans, kinds=("model_call", "retrieval"))
    queued = sum(
        float(s["attributes"].get("airi.queue_ms", 0.0))
        for s in spans
        if s["attributes"].get("airi.kind") == "model_call"
    )
    return total, outside, queued


def main() -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.conversations, args.turns = 2, 1
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    import ray

    import airi_ray as airi
    from airi_ray.core.errors import NotFound
    from airi_ray.models.tiny import ensure_tiny_model
    from deployments import support_assistant as sa

    ensure_tiny_model()
    spec = airi.load_spec(sa.SPEC)
    # The run's own state (conversations, usage log, drift windows): the stored turns of an
    # earlier run would be the next run's memory.
    state = tempfile.mkdtemp(prefix="airi-assistant-bench-")
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": state})})
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    try:
        airi.deploy(spec)
        client = airi.connect("auto", api_key=spec.tenants[0].api_keys[0])

        async def load() -> tuple[list[tuple[str, float]], float]:
            await asyncio.gather(*(conversation(client.aio, -1 - i, 1) for i in range(2)))
            t0 = time.perf_counter()
            runs = await asyncio.gather(
                *(conversation(client.aio, i, args.turns) for i in range(args.conversations))
            )
            return [r for c in runs for r in c], time.perf_counter() - t0

        runs, wall = client._run(load())
        traced: list[tuple[float, float, float]] = []
        deadline = time.monotonic() + 60
        for run_id, _ in runs:
            while True:
                try:
                    spans = client.trace(run_id)
                    if any(s["name"].startswith("run ") for s in spans):
                        traced.append(shares(spans))
                        break
                except NotFound:
                    pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        client.close()
    finally:
        airi.shutdown()
        ray.shutdown()

    e2e = [ms for _, ms in runs]
    total = sum(t for t, _, _ in traced)
    result = {
        "runs_per_s": round(len(runs) / wall, 3),
        "e2e_ms_p50": round(statistics.median(e2e), 1),
        "e2e_ms_p99": round(pct(e2e, 99), 1),
        "overhead_share": round(sum(o + q for _, o, q in traced) / total, 4),
        "outside_calls_share": round(sum(o for _, o, _ in traced) / total, 4),
        "runs": len(runs),
        "traced_runs": len(traced),
        "conversations": args.conversations,
        "turns": args.turns,
        "wall_s": round(wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(f"{'measure':<28}{'value':>12}")
    for key in (
        "runs_per_s",
        "e2e_ms_p50",
        "e2e_ms_p99",
        "overhead_share",
        "outside_calls_share",
        "runs",
        "traced_runs",
        "wall_s",
    ):
        print(f"{key:<28}{result[key]:>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
