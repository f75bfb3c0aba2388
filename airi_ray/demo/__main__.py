"""``make demo``: a local Ray cluster, the quickstart app, real requests, a metrics table.

    python -m airi_ray.demo [--config deployments/quickstart.yaml] [--port 8000] [--keep]

Starts a local Ray head (unless one runs), deploys the spec, sends chats and embeddings
through the Python client and over HTTP with the ``openai`` client, runs a short burst of
concurrent streams, prints TTFT p50/p99, tokens/s and the prefix-cache hit rate, then
turns its traffic from support questions to unrelated text and shows the drift alert, a
call's trace and an HTML report (``airi report``), and shuts everything down (``--keep``
leaves it running for ``airi chat`` and curl).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request

import airi_ray as airi
from airi_ray import cli
from airi_ray.config import load_spec
from airi_ray.core.stats import percentile
from airi_ray.demo.traffic import SUPPORT, UNRELATED
from airi_ray.models.tiny import ensure_tiny_model

QUESTIONS = [
    "How do I return an item?",
    "How long does shipping take?",
    "What does Nimbus Plus include?",
]
BURST = 32
BURST_TOKENS = 48


async def burst(api_key: str, model: str) -> tuple[list[float], float, int]:
    """``BURST`` concurrent streams through the async client: TTFTs, wall time, tokens."""
    client = airi.AsyncClient(api_key=api_key)

    async def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        g = await client.chat_generation(
            model, f"{QUESTIONS[i % 3]} (order {i})", max_tokens=BURST_TOKENS, ignore_eos=True
        )
        ttft, n = None, 0
        async for _, k, _ in g:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            n += k
        return ttft or 0.0, n

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(BURST)))
    wall = time.perf_counter() - t0
    await client.close()
    return [t for t, _ in results], wall, sum(n for _, n in results)


async def drift_traffic(api_key: str, model: str, prompts: list[str]) -> None:
    """Short answers to ``prompts``, eight at a time."""
    client = airi.AsyncClient(api_key=api_key)
    sem = asyncio.Semaphore(8)

    async def one(p: str) -> None:
        async with sem:
            await client.chat(model, [{"role": "user", "content": p}], max_tokens=4)

    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()


def prefix_hit_rate(metrics_text: str, model: str) -> float | None:
    m = re.search(
        rf'airi_prefix_cache_hit_rate{{model="{re.escape(model)}"}} ([0-9.eE+-]+)', metrics_text
    )
    return float(m.group(1)) if m else None


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airi_ray.demo", description="airi quickstart demo"
    )
    parser.add_argument("--config", default="deployments/quickstart.yaml")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the spec's)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster and app running")
    parser.add_argument("--report", default="airi-report.html", help="where to write the report")
    parser.add_argument("--report-png", default=None, help="also write the report's plots here")
    args = parser.parse_args()

    import openai

    ensure_tiny_model()
    up = ["up", "--config", args.config] + (["--port", str(args.port)] if args.port else [])
    if cli.main(up) != 0:
        return 1
    spec = load_spec(args.config)
    port = args.port or spec.ingress.port
    key = spec.tenants[0].api_keys[0]
    chat_model = next(m.name for m in spec.models if m.task == "generate")
    embed_model = next((m.name for m in spec.models if m.task == "embed"), None)
    try:
        client = airi.connect("auto", api_key=key)
        print("\n== Python client ==")
        for q in QUESTIONS:
            r = client.chat(chat_model, q, max_tokens=48, temperature=0)
            print(
                f"Q: {q}\nA: {r.text.strip()}\n   ({r.usage.completion_tokens} tokens, TTFT {1000 * r.usage.ttft_s:.0f} ms)"
            )
        print("streamed: ", end="", flush=True)
        for piece in client.chat(
            chat_model, "Can I cancel my order?", max_tokens=40, stream=True, temperature=0
        ):
            print(piece, end="", flush=True)
        print()
        if embed_model:
            docs = [
                "Returns are free within 30 days.",
                "Tents need to dry before storage.",
                "We ship to Canada.",
            ]
            vectors = client.embed(embed_model, ["Can I send my jacket back?", *docs])
            scores = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
            best = max(range(len(docs)), key=lambda i: scores[i])
            print(
                f"embeddings: {len(vectors)} x {len(vectors[0])}; closest to 'Can I send my jacket back?': {docs[best]!r}"
            )

        print("\n== HTTP (openai client) ==")
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        print("models:", [m.id for m in oai.models.list().data])
        r = oai.chat.completions.create(
            model=chat_model,
            messages=[{"role": "user", "content": "Do you price match?"}],
            max_tokens=40,
            temperature=0,
        )
        print(f"Q: Do you price match?\nA: {r.choices[0].message.content.strip()}")
        print("streamed: ", end="", flush=True)
        for chunk in oai.chat.completions.create(
            model=chat_model,
            messages=[{"role": "user", "content": "Where is my order?"}],
            max_tokens=40,
            temperature=0,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        if embed_model:
            e = oai.embeddings.create(model=embed_model, input="warranty for boots")
            print(f"embedding over HTTP: {len(e.data[0].embedding)} dimensions")

        print(
            f"\n== burst: {BURST} concurrent streams x {BURST_TOKENS} tokens through the Python client =="
        )
        ttfts, wall, tokens = asyncio.run(burst(key, chat_model))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        rate = prefix_hit_rate(metrics, chat_model)
        print(f"{'TTFT p50':<22}{1000 * percentile(ttfts, 50):>10.0f} ms")
        print(f"{'TTFT p99':<22}{1000 * percentile(ttfts, 99):>10.0f} ms")
        print(f"{'tokens/s':<22}{tokens / wall:>10.0f}")
        print(
            f"{'prefix-cache hit rate':<22}{100 * rate if rate is not None else float('nan'):>10.1f} %"
        )
        print(f"(full metrics: curl http://127.0.0.1:{port}/metrics)")
        client.close()

        print("\n== observability: the trace of the HTTP call above ==")
        cli.main(["trace", r.id, "--api-key", key])
        if spec.observability.drift.embedder:
            n = spec.observability.drift.reference_size + spec.observability.drift.window_size
            print(f"\n== drift: {n} support questions, then 120 lines of unrelated text ==")
            asyncio.run(
                drift_traffic(key, chat_model, [SUPPORT[i % len(SUPPORT)] for i in range(n)])
            )
            asyncio.run(drift_traffic(key, chat_model, [UNRELATED[i % 30] for i in range(120)]))
            watcher = airi.connect("auto", api_key=key)
            deadline = time.monotonic() + 30  # the observer takes calls in batches
            while time.monotonic() < deadline and not any(
                a["kind"] == "drift.embedding" for a in watcher.alerts()
            ):
                time.sleep(0.5)
            watcher.close()
            cli.main(["alerts", "--api-key", key, "--limit", "4"])
        time.sleep(2 * spec.observability.sample_interval_s)  # the last sample
        report = ["report", "--out", args.report, "--window", "10", "--api-key", key]
        cli.main(report + (["--png-dir", args.report_png] if args.report_png else []))
    finally:
        if args.keep:
            print(
                f"\nstill running: http://127.0.0.1:{port}/v1 (key {key}); `airi chat`, `airi status`; stop with `airi down`"
            )
        else:
            print()
            cli.main(["down"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
