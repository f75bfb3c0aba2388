"""Prefix-cache routing where the caches cannot hold it all: affinity, round robin, oracle.

Workload (issue 22): ``AGENTS`` agents, each with its own system prompt of about
``SYSTEM_TOKENS`` tokens (distinct from the first block on). Two shapes, each measured for
every routing:

- ``conversations`` (the top-level keys): ``CONVERSATIONS_PER_AGENT`` conversations per
  agent of ``TURNS`` turns; a conversation's next turn starts when its previous answer is
  complete and carries the whole history, as chat clients send it.
- ``agent_calls``: a graph node's calls, one turn each (its system prompt and a question).

Conversations come in a seeded random order over the agents (each agent equally often),
``CONCURRENCY`` at a time, below the replicas' slots, so the router has a choice. Each
agent's first conversation is served before the counting starts (``WARM_START``): a
running service has served every agent before, so the figures are the steady state;
``hit_rate_from_cold`` counts from the first request as well.

Each replica's KV cache (vLLM's ``num_gpu_blocks_override``, blocks of ``BLOCK`` tokens;
the CPU backend's default block is 128 tokens, which would make the cache 8x the size
meant) holds about ``CACHE_SHARE`` of the agents' system prompts together, plus room for
the running requests' histories: larger than one replica's cache, smaller than both.

The routings (``ROUTINGS``):

- ``affinity``: the scheduler's chained 16-token block hashes steer a prompt to the replica
  that served its longest prefix, unless it is loaded beyond the margin; what each replica
  holds is the router's own estimate (``prefix_cache_view: estimate``).
- ``round_robin``: every request to the next replica, whatever it holds.
- ``oracle``: affinity routing on what the engines report they hold, read from vLLM's KV
  cache events (``prefix_cache_view: engine``, airi's default): every block stored and
  evicted.

Each routing runs ``ROUNDS`` passes in one process, taking turns going first, each pass
on a redeployment with that routing and with prompt texts of its own (no pass can hit
blocks another cached); switching the cache view starts new engines, which a pass that is
not counted warms. Reported per routing: vLLM's own prefix-cache hit rate (hit tokens /
queried tokens, summed over the replicas), TTFT p50/p99, output tokens/s, and the KV cache
events the replicas read.

    python benchmarks/prefix_routing.py [--smoke]

Writes ``benchmarks/results/prefix_routing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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
CONVERSATIONS_PER_AGENT = 3  # counted, after each agent's first one (``WARM_START``)
WARM_START = True
# Agent calls: a graph node's call, its system prompt and one question; (turns, per agent).
AGENT_CALLS = (1, 6)
ROUNDS = 2  # passes per routing, alternating which goes first
TURNS = 3
SYSTEM_TOKENS = 600
ANSWER_TOKENS = 32
SLOTS = 4  # per replica
REPLICAS = 2  # --replicas
LOAD_MARGIN = 0.25  # --load-margin: the scheduler's prefix_load_margin (its default)
CONCURRENCY = 6  # conversations at a time (3 per replica), below the replicas' slots
BLOCK = 32  # tokens per KV block: the engines' block_size (the CPU backend's default is 128)
CACHE_SHARE = 0.6  # of all the agents' system prompts, per replica: 1.2 / REPLICAS
MAX_MODEL_LEN = 1024
# A conversation's turns after its system prompt, at the most: questions, answers, template.
HISTORY_TOKENS = 192


def kv_blocks(cache_share: float) -> int:
    """The blocks a replica holds: ``cache_share`` of the prompts, and room for the
    histories of the requests running on it (their blocks are in use; the cache keeps what
    is left over)."""
    return int(cache_share * AGENTS * SYSTEM_TOKENS / BLOCK) + SLOTS * HISTORY_TOKENS // BLOCK


KV_BLOCKS = kv_blocks(CACHE_SHARE)


# The run's own usage log, conversations and drift windows: none of an earlier run's.
STATE = tempfile.mkdtemp(prefix="airi-prefix-routing-bench-")


# Each routing compared: the scheduler's routing, and what it knows of the replicas'
# caches (``prefix_cache_view``). The oracle routes by what the engines report they hold.
ROUTINGS = {
    "affinity": ("affinity", "estimate"),
    "round_robin": ("round_robin", "estimate"),
    "oracle": ("affinity", "engine"),
}


def spec(model_dir: str, name: str) -> dict[str, Any]:
    routing, view = ROUTINGS[name]
    return {
        "name": "prefix-routing",
        "models": [
            {
                "name": "tiny-chat",
                "model": model_dir,
                "replicas": REPLICAS,
                "num_cpus": 1.0 / REPLICAS,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "max_concurrency": SLOTS,
                "prefix_cache_view": view,
                "engine": {
                    "dtype": "float32",
                    "max_model_len": MAX_MODEL_LEN,
                    "enforce_eager": True,
                    "num_gpu_blocks_override": KV_BLOCKS,
                    "block_size": BLOCK,
                },
            }
        ],
        "storage": {"uri": STATE},  # a run reads no state of the runs before it
        "tenants": [{"name": "bench", "api_keys": [KEY]}],
        "scheduler": {"routing": routing, "prefix_load_margin": LOAD_MARGIN},
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
    client: Any, system: str, i: int, turns: int, ttfts: list[float], tokens: list[int]
) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn].format(i=i)})
        g = await client.chat_generation(
            "tiny-chat", messages, max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True
        )
        answer = await g.text()
        ttfts.append(g.usage.ttft_s or 0.0)
        tokens.append(g.usage.completion_tokens)
        messages.append({"role": "assistant", "content": answer})


async def replica_stats() -> list[dict[str, Any]]:
    from airi_ray.runtime import names

    controller = names.get_actor(names.CONTROLLER_NAME)
    status = await controller.status.remote()
    return [
        await names.get_actor(r["replica_id"]).stats.remote()
        for r in status["replicas"]
        if r["state"] == "ready"
    ]


async def cache_counters() -> tuple[int, int]:
    stats = await replica_stats()
    return sum(s["prefix_cache_hits"] for s in stats), sum(s["prefix_cache_queries"] for s in stats)


async def run(tag: str, agents: int, per_agent: int, turns: int) -> dict[str, Any]:
    """One pass of the workload, with prompt texts of its own (``tag``): what it measured."""
    from airi_ray.client import AsyncClient

    client = AsyncClient(api_key=KEY)
    await client.warm()
    tokenizer = client.backend._path._models["tiny-chat"].tokenizer
    prompts = [system_prompt(tokenizer, tag, a) for a in range(agents)]

    async def serve(first: int, n: int, ttfts: list[float], tokens: list[int]) -> float:
        """Conversations ``first..first+n``; the seconds they took."""
        # Each agent as often as the others, in an order of the run's own (seeded): a
        # fixed cycle would let round robin split the agents by parity on its own.
        who = [k % agents for k in range(first, first + n)]
        random.Random(f"{tag} {first}").shuffle(who)
        todo = [(prompts[a], k) for a, k in zip(who, range(first, first + n), strict=True)]

        async def worker() -> None:
            while todo:
                system, k = todo.pop(0)
                await conversation(client, system, k, turns, ttfts, tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # the engines' last stats reach the replicas each step
        return wall

    # Each agent's first conversation (not counted): a running service has served every
    # agent before, so the counted ones measure the steady state, not the cold start.
    hc, qc = await cache_counters()
    await serve(0, agents if WARM_START else 0, [], [])
    h0, q0 = await cache_counters()
    ttfts: list[float] = []
    tokens: list[int] = []
    wall = await serve(agents, agents * per_agent, ttfts, tokens)
    h1, q1 = await cache_counters()
    return {
        "hits": h1 - h0,
        "queries": q1 - q0,
        "hits_from_cold": h1 - hc,
        "queries_from_cold": q1 - qc,
        "ttfts": ttfts,
        "tokens": sum(tokens),
        "wall_s": wall,
        "prompt_tokens": [len(tokenizer(p)["input_ids"]) for p in prompts],
        # KV cache events the replicas have read so far (the oracle's; 0 for the others).
        "kv_events": sum(s.get("kv_events", 0) for s in await replica_stats()),
    }


def summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One routing's passes together: hit rate over all their tokens, TTFTs pooled."""
    hits, queries = sum(p["hits"] for p in passes), sum(p["queries"] for p in passes)
    ttfts = [t for p in passes for t in p["ttfts"]]
    wall = sum(p["wall_s"] for p in passes)
    prompt_tokens = [n for p in passes for n in p["prompt_tokens"]]
    cold = sum(p["hits_from_cold"] for p in passes) / max(
        sum(p["queries_from_cold"] for p in passes), 1
    )
    return {
        "hit_rate": round(hits / max(queries, 1), 3),
        "hit_rate_from_cold": round(cold, 3),
        "hit_tokens": hits,
        "queried_tokens": queries,
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "tokens_per_s": round(sum(p["tokens"] for p in passes) / wall, 1),
        "requests": len(ttfts),
        "wall_s": round(wall, 1),
        "pass_hit_rates": [round(p["hits"] / max(p["queries"], 1), 3) for p in passes],
        "kv_events_read": max(p["kv_events"] for p in passes),
        "system_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens)),
    }


def measure(model_dir: str, turns: int, per_agent: int, view: list[str | None]) -> dict[str, Any]:
    """Every routing's passes over one workload shape, and their comparison.

    ``view``: the ``prefix_cache_view`` the engines run with now (updated): switching it
    starts new engines, and a pass that warms them (not counted) follows each start.
    """
    import airi_ray as airi

    passes: dict[str, list[dict[str, Any]]] = {name: [] for name in ROUTINGS}
    # The routings take turns going first, so none gains from the order.
    for i in range(ROUNDS):
        order = ("affinity", "round_robin", "oracle")
        for name in order if i % 2 == 0 else order[::-1]:
            print(f"{turns}-turn, round {i + 1}/{ROUNDS}: routing {name} ...", flush=True)
            airi.deploy(spec(model_dir, name))
            if ROUTINGS[name][1] != view[0]:
                view[0] = ROUTINGS[name][1]
                asyncio.run(run(f"warm-up {turns} {i} {name}", min(AGENTS, 4), 1, turns))
            passes[name].append(asyncio.run(run(f"{name} {turns} {i}", AGENTS, per_agent, turns)))

    out = {routing: summary(p) for routing, p in passes.items()}
    a, r, o = out["affinity"], out["round_robin"], out["oracle"]
    return {
        "workload": {
            "agents": AGENTS,
            "conversations_per_agent": per_agent,
            "warm_start": WARM_START,
            "turns": turns,
            "answer_tokens": ANSWER_TOKENS,
            "concurrent_conversations": CONCURRENCY,
            "rounds": ROUNDS,
            "replicas": REPLICAS,
            "prefix_load_margin": LOAD_MARGIN,
            "slots_per_replica": SLOTS,
            "kv_blocks_per_replica": KV_BLOCKS,
            "block_size": BLOCK,
            "system_prompt_tokens": a["system_prompt_tokens"],
            "cache_share_of_prompts_per_replica": round(
                KV_BLOCKS * BLOCK / (AGENTS * a["system_prompt_tokens"]), 2
            ),
        },
        "affinity": a,
        "round_robin": r,
        "oracle": o,
        "hit_rate_ratio": round(a["hit_rate"] / max(r["hit_rate"], 1e-9), 2),
        "oracle_vs_round_robin": round(o["hit_rate"] / max(r["hit_rate"], 1e-9), 2),
        "affinity_vs_oracle": round(a["hit_rate"] / max(o["hit_rate"], 1e-9), 2),
        "targets": {
            "hit_rate_ratio": ">= 2",
            "affinity_vs_oracle": ">= 0.9",
            "ttft": "affinity's p50 and p99 lower than round_robin's",
        },
        "met": {
            "hit_rate_ratio": a["hit_rate"] >= 2 * r["hit_rate"],
            "affinity_vs_oracle": a["hit_rate"] >= 0.9 * o["hit_rate"],
            "ttft": a["ttft_p50_ms"] < r["ttft_p50_ms"] and a["ttft_p99_ms"] < r["ttft_p99_ms"],
        },
    }


def table(title: str, result: dict[str, Any]) -> None:
    print(
        f"\n{title}\n{'routing':<12} {'hit rate':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
        f"{'tok/s':>8} {'wall s':>7}"
    )
    for name in ROUTINGS:
        x = result[name]
        print(
            f"{name:<12} {x['hit_rate']:>9.3f} {x['ttft_p50_ms']:>12.1f} "
            f"{x['ttft_p99_ms']:>12.1f} {x['tokens_per_s']:>8.1f} {x['wall_s']:>7.1f}"
        )
    print(
        f"hit-rate ratio {result['hit_rate_ratio']} (target >= 2; the oracle's "
        f"{result['oracle_vs_round_robin']}), affinity/oracle {result['affinity_vs_oracle']} "
        "(target >= 0.9)"
    )


def main() -> int:
    global RESULTS, AGENTS, CONCURRENCY, ROUNDS, REPLICAS, CACHE_SHARE, KV_BLOCKS, LOAD_MARGIN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=REPLICAS,
        help="replicas of the model; their caches hold 1.2x the prompts together, and 3 "
        "conversations per replica run at once (writes prefix_routing_rN.json unless 2)",
    )
    parser.add_argument(
        "--load-margin",
        type=float,
        default=LOAD_MARGIN,
        help="the scheduler's prefix_load_margin: how much busier (a fraction of a "
        "replica's slots) the replica holding a prefix may be and still get the request",
    )
    args = parser.parse_args()
    LOAD_MARGIN = args.load_margin
    if args.replicas < 2:
        parser.error("--replicas must be 2 or more: with one there is nothing to route")
    if args.replicas != REPLICAS:
        REPLICAS, CONCURRENCY = args.replicas, 3 * args.replicas
        CACHE_SHARE = 1.2 / REPLICAS
        KV_BLOCKS = kv_blocks(CACHE_SHARE)
        RESULTS = RESULTS.with_name(f"prefix_routing_r{REPLICAS}.json")
    shapes = {"conversations": (TURNS, CONVERSATIONS_PER_AGENT), "agent_calls": AGENT_CALLS}
    if args.smoke:  # checks the path works, not its speed (the cache keeps its size)
        AGENTS, CONCURRENCY, ROUNDS = 2, 2, 1
        shapes = {"conversations": (2, 1)}  # the oracle's engines start once
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    view: list[str | None] = [None]
    try:
        measured = {
            shape: measure(model_dir, turns, per_agent, view)
            for shape, (turns, per_agent) in shapes.items()
        }
    finally:
        airi.shutdown()
        ray.shutdown()

    # The shape (multi-turn conversations) at the top level, as before; the
    # agent calls (a graph's nodes, one turn each) beside it.
    result = {**measured["conversations"], "agent_calls": measured.get("agent_calls")}
    result["workload"]["smoke"] = args.smoke
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table(f"conversations of {shapes['conversations'][0]} turns", measured["conversations"])
    if "agent_calls" in measured:
        table("agent calls (one turn each)", measured["agent_calls"])
    print(f"wrote {RESULTS}")
    unread = [shape for shape, m in measured.items() if not m["oracle"]["kv_events_read"]]
    if unread:  # the oracle routed on nothing the engines said: not an oracle
        print(f"error: the oracle's replicas read no KV cache events ({', '.join(unread)})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
