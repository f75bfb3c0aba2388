"""Prefix-cache affinity against round-robin routing where the caches cannot hold it all.

Workload (issue 22): ``AGENTS`` agents, each with its own system prompt of about
``SYSTEM_TOKENS`` tokens (distinct from the first block on), each serving
``CONVERSATIONS_PER_AGENT`` conversations of ``TURNS`` turns; a conversation's next turn
starts when its previous answer is complete and carries the whole history, as chat clients
send it. Conversations are taken in turn across the agents (many agents active at once),
``CONCURRENCY`` at a time, below the two replicas' slots, so the router has a choice.

Each replica's KV cache (vLLM's ``num_gpu_blocks_override``) holds about ``CACHE_SHARE`` of
the agents' system prompts together: larger than one replica's cache, smaller than both.
Round robin sends every agent to both replicas, whose caches then cycle through more
prompts than they hold; affinity (the prompt's chained 16-token block hashes steer it to
the replica that served the longest matching prefix, unless that replica is loaded beyond
the margin) can split the agents between them. Both run in one process: a pass that warms
the engines (not counted), then ``ROUNDS`` rounds in which the two take turns going first,
each pass on a redeployment with that routing and with prompt texts of its own (no pass
can hit blocks another cached).

Reported per routing: vLLM's own prefix-cache hit rate (hit tokens / queried tokens,
summed over the replicas), TTFT p50/p99 and output tokens/s. The issue also asks for an
oracle that knows every replica's cache contents (from vLLM's KV cache events); it is not
built yet, so ``oracle`` is null.

    python benchmarks/prefix_routing.py [--smoke]

Writes ``benchmarks/results/prefix_routing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airi_ray.core.stats import percentile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_routing.json"
KEY = "sk-airi-9f0000000001-benchPrefixTenant0001"
AGENTS = 16
CONVERSATIONS_PER_AGENT = 3
ROUNDS = 2  # passes per routing, alternating which goes first
TURNS = 3
SYSTEM_TOKENS = 600
ANSWER_TOKENS = 32
SLOTS = 4  # per replica
CONCURRENCY = 6  # conversations at a time, below the 8 slots of the two replicas
BLOCK = 16
CACHE_SHARE = 0.6  # of all the agents' system prompts, per replica
MAX_MODEL_LEN = 1024
# A conversation's turns after its system prompt, at the most: questions, answers, template.
HISTORY_TOKENS = 192
# The blocks a replica holds: the share of the prompts, and room for the histories of the
# requests running on it (their blocks are in use; the cache keeps what is left over).
KV_BLOCKS = int(CACHE_SHARE * AGENTS * SYSTEM_TOKENS / BLOCK) + SLOTS * HISTORY_TOKENS // BLOCK


# The run's own usage log, conversations and drift windows: none of an earlier run's.
STATE = tempfile.mkdtemp(prefix="airi-prefix-routing-bench-")


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
                    "max_model_len": MAX_MODEL_LEN,
                    "enforce_eager": True,
                    "num_gpu_blocks_override": KV_BLOCKS,
                },
            }
        ],
        "storage": {"uri": STATE},  # a run reads no state of the runs before it
        "tenants": [{"name": "bench", "api_keys": [KEY]}],
        "scheduler": {"routing": routing},
        "ingress": {"enabled": False},
    }


FACTS = (
    "Returns are free within {d} days for unused items with the receipt.",
    "Refunds go to the original payment method within {d} business days.",
    "Standard shipping takes {d} days; express shipping takes one or two days.",
    "Members get free express shipping and early access to sales in week {d}.",
    "Warranty claims need a photo of the defect and order number {d}.",
    "Gift cards can be used online and in store for {d} years.",
)


def system_prompt(tokenizer: Any, run: str, agent: int) -> str:
    """Agent ``agent``'s system prompt for the run ``run``: about ``SYSTEM_TOKENS``
    tokens, its own from the first token (the tag comes first)."""
    head = f"[{run} agent {agent}] You are support assistant number {agent}. Policies:"
    text, i = head, 0
    while len(tokenizer(text)["input_ids"]) < SYSTEM_TOKENS:
        text += " " + FACTS[i % len(FACTS)].format(d=agent * 7 + i)
        i += 1
    return text


QUESTIONS = [
    "I ordered boots {i} days ago and they have not arrived. What can I do?",
    "Can I return the tent from order {i} if I used it once?",
    "How do I claim the warranty on jacket number {i}?",
]


async def conversation(
    client: Any, system: str, i: int, ttfts: list[float], tokens: list[int]
) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(TURNS):
        messages.append({"role": "user", "content": QUESTIONS[turn].format(i=i)})
        g = await client.chat_generation(
            "tiny-chat", messages, max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True
        )
        answer = await g.text()
        ttfts.append(g.usage.ttft_s or 0.0)
        tokens.append(g.usage.completion_tokens)
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


async def run(tag: str, agents: int, per_agent: int) -> dict[str, Any]:
    """One pass of the workload, with prompt texts of its own (``tag``): what it measured."""
    from airi_ray.client import AsyncClient

    client = AsyncClient(api_key=KEY)
    await client.warm()
    tokenizer = client.backend._path._models["tiny-chat"].tokenizer
    prompts = [system_prompt(tokenizer, tag, a) for a in range(agents)]
    # Taken in turn across the agents: conversation k is agent k % agents's.
    todo = [(prompts[k % agents], k) for k in range(agents * per_agent)]
    h0, q0 = await cache_counters()
    ttfts: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while todo:
            system, k = todo.pop(0)
            await conversation(client, system, k, ttfts, tokens)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # the engines' last stats reach the replicas each step
    h1, q1 = await cache_counters()
    return {
        "hits": h1 - h0,
        "queries": q1 - q0,
        "ttfts": ttfts,
        "tokens": sum(tokens),
        "wall_s": wall,
        "prompt_tokens": [len(tokenizer(p)["input_ids"]) for p in prompts],
    }


def summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One routing's passes together: hit rate over all their tokens, TTFTs pooled."""
    hits, queries = sum(p["hits"] for p in passes), sum(p["queries"] for p in passes)
    ttfts = [t for p in passes for t in p["ttfts"]]
    wall = sum(p["wall_s"] for p in passes)
    prompt_tokens = [n for p in passes for n in p["prompt_tokens"]]
    return {
        "hit_rate": round(hits / max(queries, 1), 3),
        "hit_tokens": hits,
        "queried_tokens": queries,
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "tokens_per_s": round(sum(p["tokens"] for p in passes) / wall, 1),
        "requests": len(ttfts),
        "wall_s": round(wall, 1),
        "pass_hit_rates": [round(p["hits"] / max(p["queries"], 1), 3) for p in passes],
        "system_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens)),
    }


def main() -> int:
    global RESULTS, AGENTS, CONVERSATIONS_PER_AGENT, TURNS, CONCURRENCY, ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed (the cache keeps its size)
        AGENTS, CONVERSATIONS_PER_AGENT, TURNS, CONCURRENCY, ROUNDS = 2, 1, 2, 2, 1
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    passes: dict[str, list[dict[str, Any]]] = {"affinity": [], "round_robin": []}
    try:
        # A pass warms the engines first (not counted), then the routings take turns
        # going first, so neither gains from the order.
        airi.deploy(spec(model_dir, "round_robin"))
        asyncio.run(run("warm-up", min(AGENTS, 4), 1))
        for i in range(ROUNDS):
            order = ("affinity", "round_robin") if i % 2 == 0 else ("round_robin", "affinity")
            for routing in order:
                print(f"round {i + 1}/{ROUNDS}: routing {routing} ...", flush=True)
                airi.deploy(spec(model_dir, routing))
                passes[routing].append(
                    asyncio.run(run(f"{routing} {i}", AGENTS, CONVERSATIONS_PER_AGENT))
                )
    finally:
        airi.shutdown()
        ray.shutdown()

    out = {routing: summary(p) for routing, p in passes.items()}
    a, r = out["affinity"], out["round_robin"]
    result = {
        "workload": {
            "agents": AGENTS,
            "conversations_per_agent": CONVERSATIONS_PER_AGENT,
            "turns": TURNS,
            "answer_tokens": ANSWER_TOKENS,
            "concurrent_conversations": CONCURRENCY,
            "rounds": ROUNDS,
            "replicas": 2,
            "slots_per_replica": SLOTS,
            "kv_blocks_per_replica": KV_BLOCKS,
            "block_size": BLOCK,
            "system_prompt_tokens": a["system_prompt_tokens"],
            "cache_share_of_prompts_per_replica": round(
                KV_BLOCKS * BLOCK / (AGENTS * a["system_prompt_tokens"]), 2
            ),
            "smoke": args.smoke,
        },
        "affinity": a,
        "round_robin": r,
        "oracle": None,
        "hit_rate_ratio": round(a["hit_rate"] / max(r["hit_rate"], 1e-9), 2),
        "affinity_vs_oracle": None,
        "targets": {
            "hit_rate_ratio": ">= 2",
            "affinity_vs_oracle": ">= 0.9 (oracle not built)",
            "ttft": "affinity's p50 and p99 lower than round_robin's",
        },
        "met": {
            "hit_rate_ratio": a["hit_rate"] >= 2 * r["hit_rate"],
            "ttft": a["ttft_p50_ms"] < r["ttft_p50_ms"] and a["ttft_p99_ms"] < r["ttft_p99_ms"],
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'routing':<12} {'hit rate':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
        f"{'tok/s':>8} {'wall s':>7}"
    )
    for name, x in out.items():
        print(
            f"{name:<12} {x['hit_rate']:>9.3f} {x['ttft_p50_ms']:>12.1f} "
            f"{x['ttft_p99_ms']:>12.1f} {x['tokens_per_s']:>8.1f} {x['wall_s']:>7.1f}"
        )
    print(f"hit-rate ratio {result['hit_rate_ratio']} (target >= 2); wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
