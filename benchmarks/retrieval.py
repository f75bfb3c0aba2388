"""Retrieval on 100,000 vectors: ingest rate, ANN recall@10 and query latency vs exact NumPy.

Two workloads of 100,000 seeded 384-dim normalised vectors, measured in the same run:

- ``uniform`` (the top-level keys of the JSON): vectors drawn i.i.d. uniform on the sphere
  (standard normal, then normalised); the queries are fresh draws of the same kind, not
  copies of stored vectors: the issue's workload.
- ``clustered`` (the ``clustered`` section): a mixture of 1,000 Gaussian clusters (a centre
  plus isotropic noise); half the queries are perturbed copies of stored vectors
  (near-duplicate lookups), half fresh draws from the mixture (a new text on a known topic).

Both are reported because they bound the problem from two sides. Uniform random 384-dim
vectors have almost no neighbourhood structure: the 10th nearest neighbour has a cosine of
about 0.2 against about 0 for a typical vector, so IVF partitions and HNSW graphs say little
about where the neighbours are and an index must scan nearly everything to find them. Real
sentence embeddings are clustered, which is what ANN indexes exploit.

Steps, per workload:

1. ingest every vector as a one-chunk document through ``Collection.upsert`` (one tenant,
   10,000 documents per call, no index yet) -> ``ingest_vectors_per_s``;
2. exact top-10 by NumPy (one matrix product + argpartition per query) -> the ground truth;
3. the baseline: LanceDB's exact search (fewer queries) and its default index, built as
   every collection builds it (``Collection.optimize``: compact, ``DEFAULT_INDEX``, the
   tenant bitmap index), queried through ``Collection.search`` with the in-memory index off
   -> ``lancedb_default``;
4. the headline: the in-memory HNSW index (``airi_ray.data.ann``) built from the table as a
   collection builds it after a write (in the background; the benchmark waits for it), and
   queried through ``Collection.search`` (the manifest lookup, the version check, the
   tenant's graph, the exact rerank from the stored vectors). An ef sweep (one pass each)
   picks the smallest ef reaching recall 0.98 (the widest if none does), which is then
   measured over three passes -> recall@10 against the exact top-10, p50 and p99. NumPy's
   exact search is timed on the same queries, in alternating blocks of 50 (the machine is
   shared; both then see about the same load) -> ``numpy_exact_ms_p50``; ``load_1m`` is
   the machine's load average then. The ef is chosen on the same queries it is then
   measured on, so its recall is slightly optimistic;
5. ``ann_libraries``: hnswlib (the graph the collection built) and faiss-cpu's
   ``IndexHNSWFlat`` (built with the same M, ef_construction and threads), queried directly
   over the same ef values: what chose the library;
6. LanceDB's candidate indexes (IVF_PQ, IVF_SQ, IVF_HNSW_SQ, each rebuilt on the same
   table with a few query settings), measured as in 3: why the in-memory index exists.

Targets (issue 22): recall@10 >= 0.98 with ``query_ms_p50`` no more than a quarter of the
``numpy_exact_ms_p50`` timed next to it, on both workloads. On a shared machine both
latencies vary by 2x from one minute to the next; compare rows of one run, not runs.
Storage goes to a temp dir, deleted at the end. Writes ``benchmarks/results/retrieval.json``.

    python benchmarks/retrieval.py [--vectors 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airi_ray.core.chunking import Chunker  # noqa: E402
from airi_ray.data.ann import AnnSpec  # noqa: E402
from airi_ray.data.collections import (  # noqa: E402
    DEFAULT_INDEX,
    CollectionStore,
    Document,
    IndexSpec,
)

RESULTS = ROOT / "benchmarks" / "results" / "retrieval.json"
DIM = 384
CLUSTERS = 1_000
NOISE = 0.6  # per-dimension noise around a cluster centre of per-dimension scale 1
QUERY_NOISE = 0.02  # perturbation of a stored vector, per dimension
K = 10
TARGET_RECALL = 0.98
TARGET_SPEEDUP = 4  # query_ms_p50 <= numpy_exact_ms_p50 / 4
INGEST_BATCH = 10_000
EXACT_LANCE_QUERIES = 20
BLOCK = 50  # queries timed in a row by NumPy, then by LanceDB
WARMUP = 10  # queries of each run untimed before a measurement
HEADLINE_ROUNDS = 3  # passes over the queries for the headline (the default index)
TENANT = "bench"
# The in-memory index as collections build it, but with both cores for the build (nothing
# else runs then; a collection's background rebuild uses one and leaves one to queries).
ANN = replace(AnnSpec(), build_threads=2)
EF_SWEEP = [64, 128, 256, 512, 1024, 2048]  # query breadths tried on the built graphs
# Why airi_ray.data.ann uses hnswlib, from the run committed in results/retrieval.json.
LIBRARY_CHOICE = (
    "hnswlib. On the clustered set, where HNSW helps, both reach recall 1.0 from ef 64 and "
    "hnswlib answers in 0.37 ms against faiss-cpu's 0.52 ms at ef 64 (0.70 vs 1.16 at 128, "
    "faster at every ef), and builds 100k x 384 in 293 s against 328 s on the same 2 threads "
    "(334 vs 440 s on uniform). On uniform vectors faiss finds more per ef (0.985 vs 0.9645 "
    "at ef 2048), but both only at about the cost of an exact scan, so neither serves that "
    "workload. hnswlib also takes its thread count as an argument of each call, where "
    "faiss's is OpenMP's setting of the calling thread."
)
# Why the uniform workload misses the p50 target (stated in the JSON when it does).
UNIFORM_MISS = (
    "uniform random 384-dim vectors have no neighbourhood structure (the 10th neighbour's "
    "cosine is about 0.2 against 0 for any vector), so an HNSW walk must visit about as many "
    "vectors as an exact scan to reach recall 0.98: the widest ef tried is at or above NumPy's "
    "p50, in hnswlib and faiss-cpu alike"
)
MODEL = ("bench-embedder", "1")
ALL = -1  # nprobes: every partition of the index

# Each candidate index with the query settings tried on it, on both workloads. The cheap
# settings suit clustered data; the ones probing every partition (with an exact rerank of
# many candidates) are what uniform random data needs.
CANDIDATES: list[tuple[IndexSpec, list[dict[str, int]]]] = [
    (
        IndexSpec(kind="IVF_PQ", rows_per_partition=1_500, num_sub_vectors=48),
        [
            {"nprobes": 4, "refine_factor": 10},
            {"nprobes": 8, "refine_factor": 10},
            {"nprobes": ALL, "refine_factor": 50},
            {"nprobes": ALL, "refine_factor": 200},
        ],
    ),
    (
        IndexSpec(kind="IVF_SQ", rows_per_partition=6_250),
        [
            {"nprobes": 2, "refine_factor": 2},
            {"nprobes": ALL, "refine_factor": 1},
            {"nprobes": ALL, "refine_factor": 2},
        ],
    ),
    (
        IndexSpec(kind="IVF_HNSW_SQ", rows_per_partition=1_000_000, nprobes=1),
        [
            {"ef": 64, "refine_factor": 1},
            {"ef": 64, "refine_factor": 2},
            {"ef": 512, "refine_factor": 2},
            {"ef": 4096, "refine_factor": 2},
        ],
    ),
]


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_uniform(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` stored vectors and ``queries`` fresh queries, all i.i.d. uniform on the sphere."""
    rng = np.random.default_rng(seed)
    vectors = normalise(rng.standard_normal((n, DIM), dtype=np.float32))
    return vectors, normalise(rng.standard_normal((queries, DIM), dtype=np.float32))


def make_clustered(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-mixture vectors; half the queries perturb stored ones, half are fresh draws."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        noise = rng.standard_normal((m, DIM)).astype(np.float32)
        return normalise(centres[rng.integers(0, CLUSTERS, m)] + NOISE * noise)

    vectors = draw(n)
    near = queries // 2
    copies = vectors[rng.integers(0, n, near)]
    perturbed = copies + QUERY_NOISE * rng.standard_normal((near, DIM)).astype(np.float32)
    return vectors, normalise(np.vstack([perturbed, draw(queries - near)]))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def numpy_exact(vectors: np.ndarray, queries: np.ndarray) -> tuple[list[set[int]], list[float]]:
    truth, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, K)[:K]
        times.append((time.perf_counter() - t0) * 1000)
        truth.append({int(i) for i in top})
    return truth, times


def ingest(store: CollectionStore, vectors: np.ndarray) -> float:
    """Vectors per second through ``Collection.upsert`` (one chunk per document)."""
    col = store.create("bench", model=MODEL[0], version=MODEL[1], dim=DIM)
    # The document text is its row number; the "tokenizer" and "embedder" map it back.
    chunker = Chunker(
        encode=lambda t: [int(t)], decode=lambda ids: str(ids[0]), max_tokens=1, overlap_tokens=0
    )

    def embed(texts: list[str]) -> list[np.ndarray]:
        return [vectors[int(t)] for t in texts]

    t0 = time.perf_counter()
    for start in range(0, len(vectors), INGEST_BATCH):
        docs = [
            Document(f"v{i}", str(i)) for i in range(start, min(start + INGEST_BATCH, len(vectors)))
        ]
        col.upsert(docs, tenant=TENANT, embed=embed, chunker=chunker, progress=False)
    return len(vectors) / (time.perf_counter() - t0)


def measure(
    store: CollectionStore,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: list[set[int]],
    rounds: int = 1,
) -> dict[str, float]:
    """Recall@10 and latency through ``Collection.search``, NumPy timed in the same blocks."""
    col = store.open("bench")

    def search(q: np.ndarray) -> set[int]:
        return {int(h.doc_id[1:]) for h in col.search(q, K, tenant=TENANT, embedder=MODEL)}

    return measure_fn(search, vectors, queries, truth, rounds)


def measure_fn(
    search: Callable[[np.ndarray], set[int]],
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: list[set[int]],
    rounds: int = 1,
) -> dict[str, float]:
    """Recall@10 and latency of ``search`` (query -> row numbers), NumPy timed beside it.

    ``rounds`` passes over the queries: more samples of both, spread over more time.
    """
    # Blocks of queries, not one NumPy query before each searched one: OpenBLAS threads keep
    # spinning after a call and, on 2 cores, doubled LanceDB's latency when interleaved.
    # Alternating blocks keep both under the same load when the machine's load drifts.
    # Unmeasured warm-up of both (caches, NumPy's threads), after the index build's writes
    # have reached the disk so that write-back does not slow either.
    os.sync()
    numpy_exact(vectors, queries[:WARMUP])
    for q in queries[:WARMUP]:
        search(q)
    recalls, times, numpy_times = [], [], []
    for start in list(range(0, len(queries), BLOCK)) * rounds:
        block = slice(start, start + BLOCK)
        numpy_times += numpy_exact(vectors, queries[block])[1]
        for q, want in zip(queries[block], truth[block], strict=True):
            t0 = time.perf_counter()
            found = search(q)
            times.append((time.perf_counter() - t0) * 1000)
            recalls.append(len(found & want) / K)
    return {
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "query_ms_p50": round(percentile(times, 0.50), 2),
        "query_ms_p99": round(percentile(times, 0.99), 2),
        "numpy_exact_ms_p50": round(percentile(numpy_times, 0.50), 2),
        "load_1m": round(os.getloadavg()[0], 2),  # the machine's, other users included
    }


def meets(row: dict[str, Any]) -> bool:
    return (
        row["recall_at_10"] >= TARGET_RECALL
        and row["query_ms_p50"] <= row["numpy_exact_ms_p50"] / TARGET_SPEEDUP
    )


def run_workload(
    root: str, vectors: np.ndarray, queries: np.ndarray, kinds: list[str]
) -> dict[str, Any]:
    """Ingest; LanceDB exact and its default index; the in-memory index (the headline) with
    an ef sweep; the two HNSW libraries side by side; then LanceDB's candidate indexes."""
    truth = numpy_exact(vectors, queries)[0]
    rows: list[dict[str, Any]] = []
    # No in-memory index while LanceDB's rows are measured: they are the baseline.
    store = CollectionStore(root, index_min_rows=len(vectors) + 1, progress=False, ann=None)
    ingest_rate = ingest(store, vectors)
    col = store.open("bench")

    n = min(EXACT_LANCE_QUERIES, len(queries))
    exact = measure(store, vectors, queries[:n], truth[:n])
    rows.append({"index": "LanceDB, none (exact)", "params": {}, "build_s": 0.0, **exact})

    # What every collection gets: the write that reaches index_min_rows compacts the
    # table and builds DEFAULT_INDEX (and the tenant bitmap index).
    store.index_min_rows = len(vectors)
    t0 = time.perf_counter()
    col.optimize(*MODEL)
    lance_default = {
        "index": f"LanceDB {DEFAULT_INDEX.kind} (default)",
        "params": index_params(DEFAULT_INDEX, DEFAULT_INDEX.config(len(vectors), DIM)),
        "build_s": round(time.perf_counter() - t0, 1),
        **measure(store, vectors, queries, truth),
        "spec": asdict(DEFAULT_INDEX),
    }
    rows.append(lance_default)

    # The in-memory index, built from the table as a collection builds it after a write.
    store.ann = ANN
    t0 = time.perf_counter()
    if not col.wait_for_ann(*MODEL):
        raise RuntimeError("the in-memory index was not built; see the log")
    ann_build_s = round(time.perf_counter() - t0, 1)
    table = col.table_for(*MODEL)
    ann = store._anns[table.name]
    graph_build_s = round(ann.graph_build_s(), 1)
    sweep = []
    for ef in EF_SWEEP:
        ann.set_ef(ef)
        sweep.append(
            {
                "index": "in-memory HNSW (hnswlib)",
                "params": {"m": ANN.m, "ef_construction": ANN.ef_construction, "ef": ef},
                "build_s": ann_build_s,
                **measure(store, vectors, queries, truth),
            }
        )
    # The headline: the smallest ef of the sweep that reaches the recall target (the
    # widest if none does), measured again over more passes.
    chosen = next((r for r in sweep if r["recall_at_10"] >= TARGET_RECALL), sweep[-1])
    ef = chosen["params"]["ef"]
    ann.set_ef(ef)
    headline = {
        **chosen,
        "index": "in-memory HNSW (hnswlib), headline",
        **measure(store, vectors, queries, truth, rounds=HEADLINE_ROUNDS),
    }
    if ann.view().index_version != table.version:
        raise RuntimeError("the table changed during the measurement")
    rows += [*sweep, headline]

    libraries = compare_libraries(ann, vectors, queries, truth, graph_build_s)
    store.ann = None

    for spec, settings in CANDIDATES:
        if spec.kind not in kinds:
            continue
        config = spec.config(len(vectors), DIM)
        t0 = time.perf_counter()
        table.create_index("vector", config=config, replace=True)
        build_s = round(time.perf_counter() - t0, 1)
        for setting in settings:
            if "nprobes" in setting:
                wanted = setting["nprobes"]
                nprobes = config.num_partitions if wanted == ALL else wanted
                setting = {**setting, "nprobes": min(nprobes, config.num_partitions)}
            store.index = replace(spec, **setting)
            rows.append(
                {
                    "index": f"LanceDB {spec.kind}",
                    "params": index_params(store.index, config),
                    "build_s": build_s,
                    **measure(store, vectors, queries, truth),
                    "spec": asdict(store.index),
                }
            )
    store.index = DEFAULT_INDEX

    return {
        "ingest_vectors_per_s": round(ingest_rate),
        "recall_at_10": headline["recall_at_10"],
        "query_ms_p50": headline["query_ms_p50"],
        "query_ms_p99": headline["query_ms_p99"],
        "numpy_exact_ms_p50": headline["numpy_exact_ms_p50"],
        "speedup_vs_numpy": round(headline["numpy_exact_ms_p50"] / headline["query_ms_p50"], 2),
        "load_1m": headline["load_1m"],
        "index_kind": "in-memory HNSW (hnswlib), one graph per tenant, exact rerank",
        "index_params": {**headline["params"], "build_threads": ANN.build_threads},
        "index_build_s": ann_build_s,
        "meets_target": meets(headline),
        "lancedb_default": {
            k: lance_default[k]
            for k in ("index", "params", "recall_at_10", "query_ms_p50", "numpy_exact_ms_p50")
        },
        "candidates": rows,
        "ann_libraries": libraries,
    }


def compare_libraries(
    ann: Any,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: list[set[int]],
    hnswlib_build_s: float,
) -> dict[str, Any]:
    """hnswlib (the graph the collection built) and faiss-cpu's ``IndexHNSWFlat`` (built
    here with the same M, ef_construction and threads), each queried directly, one query
    per call, over the same ef values: what chose the library."""
    import faiss  # noqa: PLC0415 (a benchmark-only dependency)

    [rows] = ann._snapshot.tenants.values()
    graph = rows.graph
    out: list[dict[str, Any]] = []
    for ef in EF_SWEEP:
        graph.set_ef(ef)
        out.append(
            {
                "library": "hnswlib",
                "ef": ef,
                "build_s": hnswlib_build_s,
                **measure_fn(
                    lambda q: {int(i) for i in graph.knn_query(q, k=K, num_threads=1)[0][0]},
                    vectors,
                    queries,
                    truth,
                ),
            }
        )
    index = faiss.IndexHNSWFlat(DIM, ANN.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ANN.ef_construction
    faiss.omp_set_num_threads(ANN.build_threads)
    t0 = time.perf_counter()
    index.add(normalise(vectors))
    faiss_build_s = round(time.perf_counter() - t0, 1)
    faiss.omp_set_num_threads(1)
    for ef in EF_SWEEP:
        index.hnsw.efSearch = ef
        out.append(
            {
                "library": "faiss-cpu IndexHNSWFlat",
                "ef": ef,
                "build_s": faiss_build_s,
                **measure_fn(
                    lambda q: {int(i) for i in index.search(q[None], K)[1][0]},
                    vectors,
                    queries,
                    truth,
                ),
            }
        )
    return {
        "m": ANN.m,
        "ef_construction": ANN.ef_construction,
        "threads": ANN.build_threads,
        "choice": LIBRARY_CHOICE,
        "rows": out,
    }


def index_params(spec: IndexSpec, config: Any) -> dict[str, int]:
    params = {"num_partitions": config.num_partitions}
    if spec.kind == "IVF_PQ":
        params["num_sub_vectors"] = config.num_sub_vectors
    params |= {"nprobes": spec.nprobes, "refine_factor": spec.refine_factor}
    if spec.kind == "IVF_HNSW_SQ":
        params["ef"] = spec.ef
    return params


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: ingest {result['ingest_vectors_per_s']} vectors/s")
    print(
        f"{'index':<38}{'params':<66}{'build s':>8}{'recall@10':>10}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'numpy p50':>10}{'load':>6}"
    )
    for r in result["candidates"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(
            f"{r['index']:<38}{params:<66}{r['build_s']:>8}{r['recall_at_10']:>10}"
            f"{r['query_ms_p50']:>8}{r['query_ms_p99']:>8}{r['numpy_exact_ms_p50']:>10}"
            f"{r['load_1m']:>6}"
        )
    libs = result["ann_libraries"]
    print(
        f"HNSW libraries, queried directly (M={libs['m']}, ef_construction="
        f"{libs['ef_construction']}, {libs['threads']} build threads):"
    )
    print(f"{'library':<26}{'ef':>6}{'build s':>9}{'recall@10':>10}{'p50 ms':>8}{'numpy p50':>10}")
    for r in libs["rows"]:
        print(
            f"{r['library']:<26}{r['ef']:>6}{r['build_s']:>9}{r['recall_at_10']:>10}"
            f"{r['query_ms_p50']:>8}{r['numpy_exact_ms_p50']:>10}"
        )
    print(
        f"headline {result['index_kind']} {result['index_params']}: recall@10 "
        f"{result['recall_at_10']}, p50 {result['query_ms_p50']} ms vs numpy exact "
        f"{result['numpy_exact_ms_p50']} ms (x{result['speedup_vs_numpy']}); targets (recall >= "
        f"{TARGET_RECALL}, p50 <= numpy / {TARGET_SPEEDUP}): "
        f"{'met' if result['meets_target'] else 'MISSED'}"
    )


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--kinds",
        default="IVF_PQ,IVF_SQ,IVF_HNSW_SQ",
        help="index kinds to try, comma-separated (IVF_HNSW_SQ takes the longest to build)",
    )
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.vectors, args.queries, args.kinds = 3_000, 10, "IVF_SQ"
        EF_SWEEP[:] = EF_SWEEP[:2]
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name
    kinds = args.kinds.split(",")
    started = time.perf_counter()

    results = {}
    with tempfile.TemporaryDirectory(prefix="airi-retrieval-") as tmp:
        for name, make in (("uniform", make_uniform), ("clustered", make_clustered)):
            vectors, queries = make(args.vectors, args.queries)
            results[name] = run_workload(os.path.join(tmp, name), vectors, queries, kinds)
            print_table(name, results[name])
            del vectors, queries
    workload = {
        "vectors": args.vectors,
        "dim": DIM,
        "queries": args.queries,
        "tenant_filter": "every query is scoped to the one tenant holding all rows",
        "exact_lancedb_queries": EXACT_LANCE_QUERIES,
        "numpy_timing": f"timed again on the same queries, in alternating blocks of {BLOCK}",
    }
    uniform = {
        **results["uniform"],
        "workload": {
            **workload,
            "distribution": "i.i.d. standard normal, normalised (uniform on the sphere)",
            "query_mix": "fresh draws from the same distribution",
        },
    }
    if not uniform["meets_target"]:
        uniform["miss_cause"] = UNIFORM_MISS
    clustered = {
        **results["clustered"],
        "workload": {
            **workload,
            "distribution": f"mixture of {CLUSTERS} Gaussian clusters, noise {NOISE}, normalised",
            "query_mix": f"{args.queries // 2} stored vectors perturbed by noise "
            f"{QUERY_NOISE} per dimension, {args.queries - args.queries // 2} fresh "
            "draws from the mixture",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                **uniform,
                "clustered": clustered,
                "target": {
                    "recall_at_10": TARGET_RECALL,
                    "query_ms_p50": f"<= numpy_exact_ms_p50 / {TARGET_SPEEDUP}",
                },
                "runtime_s": round(time.perf_counter() - started, 1),
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
    print(f"wrote {RESULTS.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
