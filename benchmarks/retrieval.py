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
4. the headline: the in-memory index (``airi_ray.data.ann``: per tenant, 4-bit product-
   quantisation codes scanned by faiss's ``IndexPQFastScan``, the best 40 x k rows reranked
   by exact cosine from the stored vectors) built from the table as a collection builds it
   after a write (in the background, on one thread; the benchmark waits for it) and queried
   through ``Collection.search`` (the manifest lookup, the version check, the tenant's
   codes, the rerank, the hits). Its settings are the defaults every collection gets,
   measured over three passes -> recall@10 against the exact top-10, p50 and p99, and
   ``index_build_s`` (reading the table included). NumPy's exact search is timed on the
   same queries, in alternating blocks of 50 (the machine is shared; both then see about
   the same load) -> ``numpy_exact_ms_p50``; ``load_1m`` is the machine's load average
   then. A sweep of the candidates reranked per hit (one pass each) shows the margin;
5. ``approaches``: the index kinds the choice was made between, each queried directly (one
   query per call, one thread) with the same exact rerank from the stored vectors and its
   build time: the collection's PQ fast-scan codes over several candidate counts; an 8-bit
   scalar-quantised flat scan (faiss ``IndexScalarQuantizer``); sign-bit codes with a
   Hamming scan (faiss ``IndexBinaryFlat``); an HNSW graph (hnswlib, 2 build threads) over
   an ef sweep;
6. LanceDB's candidate indexes (IVF_PQ and IVF_SQ by default, IVF_HNSW_SQ with ``--kinds``:
   it builds for 5-8 minutes), each rebuilt on the same table with a few query settings,
   measured as in 3: why the in-memory index exists.

Targets (issue 22): recall@10 >= 0.98 with ``query_ms_p50`` no more than a quarter of the
``numpy_exact_ms_p50`` timed next to it, on both workloads. On a shared machine both
latencies vary by 2x from one minute to the next; compare rows of one run, not runs.
Storage goes to a temp dir, deleted at the end. Writes ``benchmarks/results/retrieval.json``.
A full run takes about 4 minutes on 2 cores.

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
# The in-memory index exactly as collections build it (one build thread, the default query
# settings); the sweep reranks this many candidates per hit asked for (no floor).
ANN = AnnSpec()
PER_HIT_SWEEP = [5, 10, 20, 40, 80]
# The other approaches, queried directly: candidates reranked (of K asked for), ef tried.
SQ8_CANDIDATES = [50, 400]
BINARY_CANDIDATES = [400, 2_000, 10_000]
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_THREADS = 16, 100, 2
EF_SWEEP = [64, 256, 1024, 2048]
# Why airi_ray.data.ann scans PQ codes, from the rows of `approaches` in results/.
CHOICE = (
    "PQ fast scan (faiss IndexPQFastScan, one 4-bit code per 2 dimensions, 96 B a row) with "
    "an exact rerank of 40 x k candidates, for every collection. It is the only kind tried "
    "that meets the target on the uniform set: an HNSW graph (hnswlib) cannot, since those "
    "vectors have no neighbourhood structure (recall 0.78 at ef 2048, already slower than "
    "the codes); an 8-bit scalar-quantised scan is exact enough but decodes each dimension "
    "and ends as slow as NumPy's float32 scan; sign bits are too coarse (0.96 only at 10,000 "
    "candidates, slower than NumPy). On the clustered set the graph answers about 3x faster "
    "(ef 64: recall 1.0), but the codes meet the target there too, build in 2 s on one thread "
    "against 12-17 s for the graph on two (minutes at M 32, ef_construction 200), take 96 B a "
    "row against a second float32 copy plus links, and need no guess of the data's structure "
    "at build time; so one kind serves every collection."
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
    a sweep of its candidates; the approaches side by side; then LanceDB's candidate
    indexes."""
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
    snapshot = ann.snapshot()
    label = "in-memory PQ fast scan + exact rerank"
    params = {
        "dims_per_code": ANN.dims_per_code,
        "candidates_per_hit": ANN.candidates_per_hit,
        "min_candidates": ANN.min_candidates,
    }
    sweep = []
    for per_hit in PER_HIT_SWEEP:
        ann.tune(candidates_per_hit=per_hit, min_candidates=1)
        sweep.append(
            {
                "index": label,
                "params": {"dims_per_code": ANN.dims_per_code, "candidates_per_hit": per_hit},
                "build_s": ann_build_s,
                **measure(store, vectors, queries, truth),
            }
        )
    # The headline: the defaults, over more passes.
    ann.tune(candidates_per_hit=ANN.candidates_per_hit, min_candidates=ANN.min_candidates)
    headline = {
        "index": f"{label} (defaults)",
        "params": params,
        "build_s": ann_build_s,
        **measure(store, vectors, queries, truth, rounds=HEADLINE_ROUNDS),
    }
    if ann.view().index_version != table.version:
        raise RuntimeError("the table changed during the measurement")
    rows += [*sweep, headline]

    approaches = compare_approaches(snapshot, vectors, queries, truth)
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
        "index_kind": "in-memory PQ fast scan (faiss IndexPQFastScan) per tenant, exact rerank",
        "index_params": {**params, "build_threads": ANN.build_threads},
        "index_build_s": ann_build_s,
        "index_build_detail_s": {
            "train_codebook": round(snapshot.train_s, 2),
            "encode": round(snapshot.encode_s, 2),
            "whole_build": round(snapshot.build_s, 2),
        },
        "index_memory_bytes_per_row": {
            "codes": snapshot.tenants[TENANT].codes.code_size,
            "stored_vectors": DIM * 4,
        },
        "meets_target": meets(headline),
        "lancedb_default": {
            k: lance_default[k]
            for k in ("index", "params", "recall_at_10", "query_ms_p50", "numpy_exact_ms_p50")
        },
        "candidates": rows,
        "approaches": approaches,
    }


def compare_approaches(
    snapshot: Any, vectors: np.ndarray, queries: np.ndarray, truth: list[set[int]]
) -> dict[str, Any]:
    """The index kinds the collection's was chosen from, each queried directly (one query
    per call, one thread) and reranked exactly from the stored vectors as a collection
    reranks: what chose the kind."""
    import faiss  # noqa: PLC0415
    import hnswlib  # noqa: PLC0415 (a benchmark-only dependency)

    rows = snapshot.tenants[TENANT]
    stored = rows.vectors
    # Row numbers of the snapshot (the table's order) -> the benchmark's (the truth's).
    number = np.array([int(i.split("#")[0][1:]) for i in rows.ids])
    unit = normalise(stored)
    faiss.omp_set_num_threads(1)
    out: list[dict[str, Any]] = []

    def scan(name: str, build_s: float, search: Callable[[np.ndarray, int], Any], r: int) -> None:
        def answer(q: np.ndarray) -> set[int]:
            found = rows.rerank(np.asarray(search(q, r)), q, K)[0]
            return {int(i) for i in number[found]}

        out.append(
            {
                "approach": name,
                "candidates": r,
                "build_s": round(build_s, 2),
                **measure_fn(answer, vectors, queries, truth),
            }
        )

    codes = rows.codes
    pq_build = snapshot.train_s + snapshot.encode_s
    for per_hit in PER_HIT_SWEEP:
        scan(
            f"PQ fast scan (faiss, {codes.code_size} B codes; the collection's)",
            pq_build,
            lambda q, r: codes.search(q[None], r)[1][0],
            per_hit * K,
        )

    t0 = time.perf_counter()
    sq8 = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq8.train(unit)
    sq8.add(unit)
    sq8_build = time.perf_counter() - t0
    for r in SQ8_CANDIDATES:
        scan(
            f"SQ8 flat scan (faiss, {DIM} B codes)",
            sq8_build,
            lambda q, r: sq8.search(q[None], r)[1][0],
            r,
        )

    t0 = time.perf_counter()
    binary = faiss.IndexBinaryFlat(DIM)
    binary.add(np.packbits(unit > 0, axis=1))
    binary_build = time.perf_counter() - t0
    for r in BINARY_CANDIDATES:
        scan(
            f"sign bits, Hamming scan (faiss, {DIM // 8} B codes)",
            binary_build,
            lambda q, r: binary.search(np.packbits(q > 0)[None], r)[1][0],
            r,
        )

    graph = hnswlib.Index(space="cosine", dim=DIM)
    graph.init_index(
        max_elements=len(stored), ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=0
    )
    t0 = time.perf_counter()
    graph.add_items(stored, np.arange(len(stored)), num_threads=HNSW_THREADS)
    graph_build = time.perf_counter() - t0
    for ef in EF_SWEEP:
        graph.set_ef(ef)
        scan(
            f"HNSW (hnswlib, M {HNSW_M}, ef_construction {HNSW_EF_CONSTRUCTION}), ef {ef}",
            graph_build,
            lambda q, r: graph.knn_query(q, k=r, num_threads=1)[0][0],
            K,
        )
    return {"choice": CHOICE, "hnsw_build_threads": HNSW_THREADS, "rows": out}


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
        f"{'index':<48}{'params':<66}{'build s':>8}{'recall@10':>10}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'numpy p50':>10}{'load':>6}"
    )
    for r in result["candidates"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(
            f"{r['index']:<48}{params:<66}{r['build_s']:>8}{r['recall_at_10']:>10}"
            f"{r['query_ms_p50']:>8}{r['query_ms_p99']:>8}{r['numpy_exact_ms_p50']:>10}"
            f"{r['load_1m']:>6}"
        )
    print("approaches, queried directly and reranked exactly from the stored vectors:")
    print(
        f"{'approach':<58}{'cand.':>7}{'build s':>9}{'recall@10':>10}{'p50 ms':>8}{'numpy p50':>10}"
    )
    for r in result["approaches"]["rows"]:
        print(
            f"{r['approach']:<58}{r['candidates']:>7}{r['build_s']:>9}{r['recall_at_10']:>10}"
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
        default="IVF_PQ,IVF_SQ",
        help="LanceDB index kinds to try, comma-separated (also IVF_HNSW_SQ: 5-8 min to build)",
    )
    args = parser.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.vectors, args.queries, args.kinds = 3_000, 10, "IVF_SQ"
        PER_HIT_SWEEP[:], EF_SWEEP[:] = PER_HIT_SWEEP[-2:], EF_SWEEP[:1]
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
