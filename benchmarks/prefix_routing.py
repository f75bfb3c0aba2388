"""Prefix-cache affinity against round-robin routing, on two replicas of the tiny model.

Workload: 32 conversations of 3 turns each (a conversation's next turn starts when its
previous answer is complete), every conversation starting with the same long system
prompt (several hundred tokens); each turn carries the whole history, as chat clients send
it. Conversations run ``CONCURRENCY`` at a time, below the 16 slots of the two replicas, so
the router has a choice; a second scenario runs all 32 at once, saturating the slots:
then a request goes to whichever replica frees a slot first, and routing cannot help
(reported as ``saturated``). The same workload runs twice in one run: with
``scheduler.routing: affinity`` (the prompt's chained 16-token block hashes steer it to the
replica that served the longest matching prefix, unless that replica is loaded beyond the
margin) and with ``round_robin``. Each run uses its own system prompt text, so the
second run cannot hit blocks the first one cached.

Each replica's KV cache is limited to ``KV_BLOCKS`` blocks of 16 tokens (vLLM's
``num_gpu_blocks_override``): a replica in production shares its cache with much other
traffic, and a conversation's earlier turns survive only where they are hot. Reported:
vLLM's own prefix-cache hit rate (hit tokens / queried tokens, summed over replicas) and
TTFT p50 per routing.

    python benchmarks/prefix_routing.py

Writes ``benchmarks/results/prefix_routing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airi_ray.core.stats import percentile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_routing.json"
KEY = "sk-airi-9f0000000001-benchPrefixTenant0001"
CONVERSATIONS = 32
TURNS = 3
ANSWER_TOKENS = 48
SLOTS = 8
CONCURRENCY = 12
KV_BLOCKS = 384  # 6,144 tokens per replica


def spec(model_dir: str, routing: str) -> dict[str, Any]:
    return {
        "name": "prefix-routing",
        "models": [
            {
                "name": "tiny-chat",
                "model": model_dir,
                "replicas": 2,
                "num_cpus": 0.5,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "max_concurrency": SLOTS,
                "engine": {
                    "dtype": "float32",
                    "max_model_len": 1024,
                    "enforce_eager": True,
                    "num_gpu_blocks_override": KV_BLOCKS,
                },
            }
        ],
        "tenants": [{"name": "bench", "api_keys": [KEY]}],
        "scheduler": {"routing": routing},
        "ingress": {"enabled": False},
    }


def system_prompt(tag: str) -> str:
    policies = (
        "Returns are free within 60 days for unused items with the receipt. "
        "Refunds go to the original payment method within 5 business days. "
        "Standard shipping takes 3 to 5 days; express shipping takes 1 to 2 days. "
        "Nimbus Plus members get free express shipping and early access to sales. "
        "Warranty claims need a photo of the defect and the order number. "
    )
    return f"[{tag}] You are the Nimbus Gear support assistant. Follow these policies. " + (
        policies * 4
    )


QUESTIONS = [
    "I ordered boots {i} days ago and they have not arrived. What can I do?",
    "Can I return the tent from order {i} if I used it once?",
    "How do I claim the warranty on jacket number {i}?",
]


async def conversation(client: Any, system: str, i: int, ttfts: list[float]) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(TURNS):
        messages.append({"role": "user", "content": QUESTIONS[turn].format(i=i)})
        g = await client.chat_generation(
            "tiny-chat", messages, max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True
        )
        answer = await g.text()
        ttfts.append(g.usage.ttft_s or 0.0)
        messages.append({"role": "assistant", "content": answer})


async def cache_counters() -> tuple[int, int]:
    from airi_ray.runtime import names

    controller = names.get_actor(names.CONTROLLER_NAME)
    status = await controller.status.remote()
    hits = queries = 0
    for r in status["replicas"]:
        if r["state"] == "ready":
            s = await names.get_actor(r["replica_id"]).stats.remote()
            hits += s["prefix_cache_hits"]
            queries += s["prefix_cache_queries"]
    return hits, queries


async def run(routing: str, concurrency: int) -> dict[str, Any]:
    from airi_ray.client import AsyncClient

    client = AsyncClient(api_key=KEY)
    await client.warm()
    h0, q0 = await cache_counters()
    ttfts: list[float] = []
    t0 = time.perf_counter()
    system = system_prompt(f"{routing} {concurrency}")
    todo = list(range(CONVERSATIONS))

    async def worker() -> None:
        while todo:
            await conversation(client, system, todo.pop(0), ttfts)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # the engines' last stats reach the replicas each step
    h1, q1 = await cache_counters()
    prompt_tokens = len(client.backend._path._models["tiny-chat"].tokenizer(system)["input_ids"])
    return {
        "hit_rate": round((h1 - h0) / max(q1 - q0, 1), 3),
        "hit_tokens": h1 - h0,
        "queried_tokens": q1 - q0,
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "wall_s": round(wall, 1),
        "system_prompt_tokens": prompt_tokens,
    }


def main() -> int:
    global RESULTS, CONVERSATIONS, TURNS, CONCURRENCY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        CONVERSATIONS, TURNS, CONCURRENCY = 2, 2, 2
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    out: dict[str, Any] = {}
    try:
        for concurrency in (CONCURRENCY, CONVERSATIONS):
            for routing in ("affinity", "round_robin"):
                print(f"routing {routing}, {concurrency} conversations at a time ...", flush=True)
                airi.deploy(spec(model_dir, routing))
                out[f"{routing}@{concurrency}"] = asyncio.run(run(routing, concurrency))
    finally:
        airi.shutdown()
        ray.shutdown()

    a, r = out[f"affinity@{CONCURRENCY}"], out[f"round_robin@{CONCURRENCY}"]
    sa, sr = out[f"affinity@{CONVERSATIONS}"], out[f"round_robin@{CONVERSATIONS}"]
    result = {
        "workload": {
            "conversations": CONVERSATIONS,
            "turns": TURNS,
            "answer_tokens": ANSWER_TOKENS,
            "concurrent_conversations": CONCURRENCY,
            "replicas": 2,
            "slots_per_replica": SLOTS,
            "kv_blocks_per_replica": KV_BLOCKS,
            "block_size": 16,
            "system_prompt_tokens": a["system_prompt_tokens"],
        },
        "affinity": a,
        "round_robin": r,
        "hit_rate_ratio": round(a["hit_rate"] / max(r["hit_rate"], 1e-9), 2),
        "saturated": {
            "concurrent_conversations": CONVERSATIONS,
            "affinity": sa,
            "round_robin": sr,
            "hit_rate_ratio": round(sa["hit_rate"] / max(sr["hit_rate"], 1e-9), 2),
        },
        "targets": {"hit_rate_ratio": ">= 2", "ttft_p50": "affinity lower than round_robin"},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'routing@concurrency':<20} {'hit rate':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'wall s':>7}"
    )
    for name, x in out.items():
        print(
            f"{name:<20} {x['hit_rate']:>9.3f} {x['ttft_p50_ms']:>12.1f} "
            f"{x['ttft_p99_ms']:>12.1f} {x['wall_s']:>7.1f}"
        )
    print(f"hit-rate ratio {result['hit_rate_ratio']} (target >= 2); wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
