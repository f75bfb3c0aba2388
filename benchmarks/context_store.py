"""Context store at scale: start-up, memory and cold reads over 1M stored turns, and write
acknowledgements while a compaction runs. On LanceDB in a temp dir; no Ray.

Workload: 1,000,000 turns spread over 50,000 conversations (20 turns each, bodies of about
150 characters), written straight into the record log's LanceDB table in batches of 100,000
rows (ten large files), then the indexes the log builds at its first compaction (``index``:
a B-tree on ``key``, a bitmap on ``kind``).

- ``startup_s`` / ``rss_mb``: a new ``ContextStore`` over the table, in a fresh interpreter
  (resident memory once started, ``VmRSS``; ``rss_mb_peak`` is ``ru_maxrss`` after the cold
  reads: LanceDB's ``open_table`` reaches it, transiently, before any read; ``rss_mb_imports``
  is the interpreter with the modules imported, before the store). ``startup_s_full_load`` /
  ``rss_mb_full_load``: what the store's start did before it held a bounded hot set, in the
  same kind of interpreter: ``log.load()`` of every record into ``Record`` objects, then its
  index by identity and by conversation (the old ``_index`` of a turn).
  ``startup_s_no_index``: a new store before the indexes are built (its start-up read of the
  traces then scans ``kind``).
- ``cold_read_ms_p50`` / ``_p99``: ``conversation()`` of a conversation not held (a by-key
  read from the log), with the indexes and without them (``_no_index``).
- ``ack_p99_ms_baseline``: ``append_turns`` of one new turn, ``WRITERS`` concurrent writers
  each on its own (held) conversation; ``ack_p99_ms_during_compaction``: the same while the
  store's background compaction (``_compact``: merging the ten files and the small ones the
  writes left, folding new rows into the index) runs; ``compaction_s`` is how long it took,
  which is what an ack queued behind it waited when the commit loop awaited it.

Writes ``benchmarks/results/context_store.json``.

    python benchmarks/context_store.py [--turns 1000000] [--conversations 50000] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from airi_ray.data.records import SCHEMA, LanceRecordLog, Record  # noqa: E402
from airi_ray.runtime.context_store import ContextStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "context_store.json"
TENANT = "bench"
BATCH = 100_000
WRITERS = 8
COLD_READS = 200
WORDS = ("the", "order", "shipped", "on", "monday", "and", "should", "arrive", "in", "two", "days")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def conversation_id(c: int) -> str:
    return f"conv-{c:07d}"


def fill(uri: str, turns: int, conversations: int) -> float:
    """Write ``turns`` turns round robin over ``conversations``, in batches of ``BATCH``."""
    log = LanceRecordLog(uri)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for start in range(0, turns, BATCH):
        n = min(BATCH, turns - start)
        cols: dict[str, list[Any]] = defaultdict(list)
        for i in range(start, start + n):
            c, seq = i % conversations, i // conversations
            text = " ".join(rng.choices(WORDS, k=25))
            cols["kind"].append("turn")
            cols["tenant"].append(TENANT)
            cols["key"].append(conversation_id(c))
            cols["seq"].append(seq)
            cols["name"].append("user" if seq % 2 == 0 else "assistant")
            cols["body"].append(json.dumps({"content": text}))
            cols["at"].append(1_700_000_000.0 + i)
        log._table.add(pa.table(dict(cols), schema=SCHEMA))
    return time.perf_counter() - t0


def rss_mb() -> float:
    """Resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_start(uri: str, conversations: int) -> dict[str, float]:
    """In a fresh interpreter: start a store, then read cold conversations."""
    import lancedb  # noqa: F401  (the log imports it on first use: an import, not the start)

    imports_mb = rss_mb()
    t0 = time.perf_counter()
    store = ContextStore(uri)
    startup_s = time.perf_counter() - t0
    started_mb = rss_mb()
    rng = random.Random(1)
    times = []

    async def reads() -> None:
        for c in rng.sample(range(conversations), min(COLD_READS, conversations)):
            t = time.perf_counter()
            turns = await store.conversation(TENANT, conversation_id(c))
            times.append((time.perf_counter() - t) * 1000)
            assert turns and turns[0]["seq"] == 0

    asyncio.run(reads())
    return {
        "startup_s": startup_s,
        "rss_mb": started_mb,
        "rss_mb_peak": peak_rss_mb(),
        "rss_mb_imports": imports_mb,
        "rss_mb_after_reads": rss_mb(),
        "cold_read_ms_p50": percentile(times, 0.5),
        "cold_read_ms_p99": percentile(times, 0.99),
    }


def child_full(uri: str) -> dict[str, float]:
    """In a fresh interpreter: the old start, every record loaded and indexed."""
    import lancedb  # noqa: F401

    t0 = time.perf_counter()
    records = LanceRecordLog(uri).load()
    load_s = time.perf_counter() - t0
    by_identity: dict[tuple[str, str, str, int, str], Record] = {}
    turns: dict[tuple[str, str], dict[int, Record]] = defaultdict(dict)
    for r in records:  # the old ``ContextStore._index`` of a turn
        by_identity[r.identity] = r
        turns[(r.tenant, r.key)][r.seq] = r
        json.loads(r.body).get("request_id")
    return {
        "startup_s_full_load": time.perf_counter() - t0,
        "full_load_read_s": load_s,
        "rss_mb_full_load": rss_mb(),
        "rss_mb_peak_full_load": peak_rss_mb(),
        "records": len(by_identity),
    }


def in_child(mode: str, uri: str, conversations: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--uri",
            uri,
            "--conversations",
            str(conversations),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def acks(uri: str, per_writer: int) -> dict[str, float]:
    """Ack latencies of new turns, without and then during a background compaction."""
    store = ContextStore(uri)
    counters = [20_000 + w for w in range(WRITERS)]

    async def write(w: int, times: list[float]) -> None:
        t = time.perf_counter()
        await store.append_turns(TENANT, conversation_id(w), [{"role": "user", "content": "x"}])
        times.append((time.perf_counter() - t) * 1000)
        counters[w] += 1

    async def writer(w: int, times: list[float], n: int | None) -> None:
        i = 0
        while (n is not None and i < n) or (n is None and store.stats()["compacting"]):
            await write(w, times)
            i += 1

    warm: list[float] = []
    await asyncio.gather(*[write(w, warm) for w in range(WRITERS)])  # read the keys once
    baseline: list[float] = []
    await asyncio.gather(*[writer(w, baseline, per_writer) for w in range(WRITERS)])
    t0 = time.perf_counter()
    store._start_compaction()
    during: list[float] = []
    await asyncio.gather(*[writer(w, during, None) for w in range(WRITERS)])
    compaction_s = time.perf_counter() - t0
    assert during, "no write was acknowledged during the compaction"
    return {
        "ack_p50_ms_baseline": percentile(baseline, 0.5),
        "ack_p99_ms_baseline": percentile(baseline, 0.99),
        "ack_p50_ms_during_compaction": percentile(during, 0.5),
        "ack_p99_ms_during_compaction": percentile(during, 0.99),
        "ack_max_ms_during_compaction": max(during),
        "acks_baseline": len(baseline),
        "acks_during_compaction": len(during),
        "compaction_s": compaction_s,
    }


def measure(turns: int, conversations: int, per_writer: int, folder: str) -> dict[str, Any]:
    uri = str(Path(folder) / "state")
    fill_s = fill(uri, turns, conversations)
    no_index = in_child("start", uri, conversations)
    t0 = time.perf_counter()
    LanceRecordLog(uri).index()
    index_s = time.perf_counter() - t0
    start = in_child("start", uri, conversations)
    full = in_child("full", uri, conversations)
    assert full["records"] == turns
    r: dict[str, Any] = {
        "turns": turns,
        "conversations": conversations,
        "fill_s": fill_s,
        "index_s": index_s,
        **start,
        "startup_s_no_index": no_index["startup_s"],
        "cold_read_ms_p50_no_index": no_index["cold_read_ms_p50"],
        "cold_read_ms_p99_no_index": no_index["cold_read_ms_p99"],
        **full,
        **asyncio.run(acks(uri, per_writer)),
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--acks", type=int, default=50, help="baseline acks per writer")
    parser.add_argument("--child", choices=["start", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = child_start(args.uri, args.conversations) if args.child == "start" else None
        print(json.dumps(fn if fn is not None else child_full(args.uri)))
        return
    if args.smoke:  # checks the path works, not its speed
        args.turns, args.conversations, args.acks = 20_000, 1_000, 10
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    with tempfile.TemporaryDirectory(prefix="airi-context-store-") as folder:
        r = measure(args.turns, args.conversations, args.acks, folder)
    rows = [
        (f"fill ({r['turns']:,} turns, {r['conversations']:,} conversations)", f"{r['fill_s']} s"),
        ("build the indexes (key, kind)", f"{r['index_s']} s"),
        ("start-up, bounded hot set", f"{r['startup_s']} s"),
        ("start-up, bounded hot set, no index", f"{r['startup_s_no_index']} s"),
        ("start-up, full load (before)", f"{r['startup_s_full_load']} s"),
        ("RSS after start-up, bounded", f"{r['rss_mb']:.0f} MB"),
        ("RSS after start-up, full load (before)", f"{r['rss_mb_full_load']:.0f} MB"),
        ("RSS of the interpreter and imports", f"{r['rss_mb_imports']:.0f} MB"),
        (
            "peak RSS, bounded / full load",
            (f"{r['rss_mb_peak']:.0f} / {r['rss_mb_peak_full_load']:.0f} MB"),
        ),
        (
            "cold conversation read p50 / p99, key index",
            (f"{r['cold_read_ms_p50']} / {r['cold_read_ms_p99']} ms"),
        ),
        (
            "cold conversation read p50 / p99, no index",
            (f"{r['cold_read_ms_p50_no_index']} / {r['cold_read_ms_p99_no_index']} ms"),
        ),
        (f"write ack p99, {WRITERS} writers", f"{r['ack_p99_ms_baseline']} ms"),
        ("write ack p99 during a compaction", f"{r['ack_p99_ms_during_compaction']} ms"),
        ("compaction (an inline one held acks this long)", f"{r['compaction_s']} s"),
    ]
    print(f"{'measure':<52}{'result':>24}")
    for label, value in rows:
        print(f"{label:<52}{value:>24}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    keys = (
        "startup_s",
        "startup_s_full_load",
        "rss_mb",
        "rss_mb_full_load",
        "ack_p99_ms_during_compaction",
        "ack_p99_ms_baseline",
        "turns",
    )
    RESULTS.write_text(
        json.dumps(
            {
                **{k: r[k] for k in keys},
                "results": r,
                "workload": {
                    "turns": args.turns,
                    "conversations": args.conversations,
                    "batch": BATCH,
                    "writers": WRITERS,
                    "baseline_acks_per_writer": args.acks,
                    "cold_reads": COLD_READS,
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
