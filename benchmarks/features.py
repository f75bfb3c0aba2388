"""Feature server: event ingest rate and online lookup latency, on LanceDB in a temp dir.

Workload: one view keyed by ``user_id`` with a float and a string field and 12 features
(count, sum, mean and max of ``amount`` over 5 minutes, 1 hour and 1 day). 100 entities get
1,000 events each, round robin over the last 2 days in time order with up to 300 s of
jitter (so some arrive out of order), pushed in batches of 1,000 events.

- ``events_per_s``: events over the whole ingest wall time, which includes validation, one
  LanceDB commit per batch and the in-memory index update.
- ``lookup_ms_p50`` / ``lookup_ms_p99``: ``get_features`` for all 100 entities at once, as
  of now, 200 times. No Ray and no network: the library call an actor makes.
- ``load_s``: opening a new store over the same folder (the restart path: read and index
  all 100,000 events).

Writes ``benchmarks/results/features.json``.

    python benchmarks/features.py [--lookups 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airi_ray.core.features import Aggregation, FeatureView  # noqa: E402
from airi_ray.data.features import FeatureStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "features.json"
TARGET_LOOKUP_MS_P50 = 10.0
ENTITIES = 100
EVENTS_PER_ENTITY = 1_000
BATCH = 1_000
SPAN_S = 2 * 86_400.0
JITTER_S = 300.0  # more than the 172.8 s between two events of one entity
NOW = 1_700_000_000.0
WINDOWS = {"5m": 300.0, "1h": 3_600.0, "1d": 86_400.0}
FNS = ("count", "sum", "mean", "max")

VIEW = FeatureView(
    name="purchases",
    entity_key="user_id",
    fields={"amount": "float", "page": "str"},
    aggregations=[
        Aggregation(f"amount_{fn}_{w}", "amount", fn, s) for w, s in WINDOWS.items() for fn in FNS
    ],
    ttl_s=86_400.0,
)


def events(seed: int = 0) -> list[dict[str, object]]:
    """All events in arrival order: time order, each time jittered by up to ``JITTER_S``."""
    rng = random.Random(seed)
    total = ENTITIES * EVENTS_PER_ENTITY
    step = SPAN_S / total
    return [
        {
            "user_id": f"user-{i % ENTITIES:03d}",
            "ts": min(NOW - SPAN_S + i * step + rng.uniform(-JITTER_S, JITTER_S), NOW),
            "amount": round(rng.uniform(1.0, 200.0), 2),
            "page": rng.choice(["/", "/cart", "/checkout", "/search"]),
        }
        for i in range(total)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


TENANT = "bench"  # one tenant's events (a view without tenants: keeps each tenant's apart)


def measure(lookups: int, folder: str) -> dict[str, float]:
    stream = events()
    store = FeatureStore(folder, [VIEW], clock=lambda: NOW)
    t0 = time.perf_counter()
    for i in range(0, len(stream), BATCH):
        store.push(VIEW.name, stream[i : i + BATCH], tenant=TENANT)
    ingest_s = time.perf_counter() - t0
    total = len(stream)
    del stream  # an actor does not keep the pushed events: lookups run without them

    ids = [f"user-{i:03d}" for i in range(ENTITIES)]
    times = []
    for _ in range(lookups):
        t = time.perf_counter()
        got = store.get_features(VIEW.name, ids, tenant=TENANT)
        times.append((time.perf_counter() - t) * 1000)
    assert len(got) == ENTITIES and all(len(f) == len(VIEW.aggregations) for f in got.values())

    t = time.perf_counter()
    again = FeatureStore(folder, [VIEW], clock=lambda: NOW)
    load_s = time.perf_counter() - t
    assert again.get_features(VIEW.name, ids, tenant=TENANT) == got, (
        "a restart must serve the same features"
    )
    return {
        "events": total,
        "ingest_s": round(ingest_s, 3),
        "events_per_s": round(total / ingest_s),
        "lookup_ms_p50": round(percentile(times, 0.50), 3),
        "lookup_ms_p99": round(percentile(times, 0.99), 3),
        "lookup_ms_mean": round(statistics.fmean(times), 3),
        "load_s": round(load_s, 3),
        "events_in_memory": again.stats(VIEW.name)["events"],
    }


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.lookups = 10
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    with tempfile.TemporaryDirectory(prefix="airi-features-") as folder:
        r = measure(args.lookups, folder)
    rows = [
        (f"ingest ({r['events']:,} events, batches of {BATCH:,})", f"{r['events_per_s']:,} ev/s"),
        (
            f"lookup {ENTITIES} entities x {len(VIEW.aggregations)} features p50",
            f"{r['lookup_ms_p50']} ms",
        ),
        (
            f"lookup {ENTITIES} entities x {len(VIEW.aggregations)} features p99",
            f"{r['lookup_ms_p99']} ms",
        ),
        ("restart (load and index every event)", f"{r['load_s']} s"),
    ]
    print(f"{'operation':<52}{'result':>16}")
    for label, value in rows:
        print(f"{label:<52}{value:>16}")
    met = r["lookup_ms_p50"] < TARGET_LOOKUP_MS_P50
    print(
        f"\nlookup p50 {r['lookup_ms_p50']} ms, target < {TARGET_LOOKUP_MS_P50:g} ms: "
        f"{'met' if met else 'MISSED'}"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "events_per_s": r["events_per_s"],
                "lookup_ms_p50": r["lookup_ms_p50"],
                "lookup_ms_p99": r["lookup_ms_p99"],
                "target_lookup_ms_p50": TARGET_LOOKUP_MS_P50,
                "meets_target": met,
                "results": r,
                "workload": {
                    "entities": ENTITIES,
                    "events_per_entity": EVENTS_PER_ENTITY,
                    "batch": BATCH,
                    "span_s": SPAN_S,
                    "windows_s": WINDOWS,
                    "aggregations": list(FNS),
                    "lookups": args.lookups,
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
