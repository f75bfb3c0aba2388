"""airi over HTTP against vLLM's own server, in interleaved pairs of rounds.

``overhead.py`` measures (c), airi over HTTP, and (f), vLLM's own OpenAI server, minutes
apart, and this machine's speed drifts by more than the target's margin in that time: three
runs of the same code gave c/f 0.79, 1.47 and 1.05. Here both servers are up at once (each
idle while the other is measured), and the rounds alternate c, f, f, c, c, f, ...: each
pair is measured under the same conditions, and the order within a pair alternates so
that a drift favours neither. Same workload, engine arguments and client as
``overhead.py``; vLLM's server runs at Ray's worker niceness, as airi's processes do.

Per pair: tokens/s of each and their ratio. Reported: the median of the pairs' ratios
(``ratio_http_vs_vllm_server``, target >= 1.0), their min and max, and TTFT p50/p99 of
each server over all measured requests (target: (c)'s p50 no higher than (f)'s). Writes
``benchmarks/results/http_pairs.json`` (``--smoke``: 1 pair of 8 streams x 8 tokens,
``benchmarks/results/smoke/http_pairs.json``).

    python benchmarks/http_pairs.py [--pairs 7] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import overhead  # noqa: E402  (a sibling script: its workload, servers and clients)

RESULTS = HERE / "results" / "http_pairs.json"
SMOKE_RESULTS = HERE / "results" / "smoke" / "http_pairs.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="1 pair, 8 streams x 8 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, overhead.CONCURRENCY, overhead.OUTPUT_TOKENS = 1, 8, 8
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")

    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model())
    streams = {
        "c": overhead.openai_stream(f"http://127.0.0.1:{overhead.HTTP_PORT}/v1", "tiny-chat"),
        "f": overhead.openai_stream(f"http://127.0.0.1:{overhead.VLLM_PORT}/v1", "tiny-chat"),
    }
    pairs: list[dict[str, Any]] = []
    ttfts: dict[str, list[float]] = {"c": [], "f": []}
    print("vLLM's own OpenAI server ...", flush=True)
    server = overhead.start_vllm_server(model_dir)
    try:
        ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
        try:
            print("airi (its defaults for the front door) ...", flush=True)
            airi.deploy(overhead.airi_spec(model_dir))

            async def run() -> None:
                for way in ("c", "f"):  # warm-up
                    await overhead.one_round(streams[way])
                for i in range(args.pairs):
                    pair: dict[str, Any] = {"order": "cf" if i % 2 == 0 else "fc"}
                    for way in pair["order"]:
                        r = await overhead.one_round(streams[way])
                        pair[f"{way}_tokens_per_s"] = round(r["tokens"] / r["wall_s"], 1)
                        pair[f"{way}_ttft_p50_ms"] = overhead.ttft_ms(r["ttfts"], 50)
                        ttfts[way] += r["ttfts"]
                    pair["ratio"] = round(pair["c_tokens_per_s"] / pair["f_tokens_per_s"], 3)
                    pairs.append(pair)
                    print(
                        f"pair {i + 1}/{args.pairs} ({pair['order']}): c {pair['c_tokens_per_s']}"
                        f" tok/s, f {pair['f_tokens_per_s']} tok/s, c/f {pair['ratio']}",
                        flush=True,
                    )

            asyncio.run(run())
            airi.shutdown()
        finally:
            ray.shutdown()
    finally:
        overhead.stop_group(server)

    ratios = [p["ratio"] for p in pairs]
    ttft = {
        way: {
            "ttft_p50_ms": overhead.ttft_ms(ts, 50),
            "ttft_p99_ms": overhead.ttft_ms(ts, 99),
        }
        for way, ts in ttfts.items()
    }
    median = round(statistics.median(ratios), 3)
    met_ratio = median >= 1.0
    met_ttft = ttft["c"]["ttft_p50_ms"] <= ttft["f"]["ttft_p50_ms"]
    result = {
        "workload": {
            "pairs": args.pairs,
            "concurrency": overhead.CONCURRENCY,
            "output_tokens": overhead.OUTPUT_TOKENS,
            "api": "streamed /v1/completions, ignore_eos, greedy",
            "engine": overhead.engine_kwargs("<tiny>"),
            "env": overhead.ENGINE_ENV,
            "vllm_server_niceness": overhead.RAY_WORKER_NICENESS,
            "smoke": args.smoke,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "pairs": pairs,
        "ratio_http_vs_vllm_server": median,
        "ratio_http_vs_vllm_server_min": min(ratios),
        "ratio_http_vs_vllm_server_max": max(ratios),
        "c_airi_http": ttft["c"],
        "f_vllm_server_http": ttft["f"],
        "targets": {"ratio_http_vs_vllm_server": 1.0, "ttft_p50": "c no higher than f"},
        "met": {"ratio_http_vs_vllm_server": met_ratio, "ttft_p50": met_ttft},
    }
    path = SMOKE_RESULTS if args.smoke else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'pair':>4} {'order':>5} {'c tok/s':>8} {'f tok/s':>8} {'c/f':>6}")
    for i, p in enumerate(pairs, 1):
        print(
            f"{i:>4} {p['order']:>5} {p['c_tokens_per_s']:>8.0f} {p['f_tokens_per_s']:>8.0f} "
            f"{p['ratio']:>6.3f}"
        )
    print(
        f"\nc/f median {median} (min {min(ratios)}, max {max(ratios)}; target >= 1.0: "
        f"{'met' if met_ratio else 'MISSED'})\nTTFT p50: airi HTTP {ttft['c']['ttft_p50_ms']} "
        f"ms, vLLM's server {ttft['f']['ttft_p50_ms']} ms (target: no higher: "
        f"{'met' if met_ttft else 'MISSED'})\nwrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
