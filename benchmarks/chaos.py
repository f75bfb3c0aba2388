"""The fault matrix under load: what clients see when a part of airi dies.

One local Ray cluster of two nodes (``ray.cluster_utils.Cluster``): the head, with two
(fake) H100s, and a worker node with one (fake) A10G. ``tiny-chat`` runs two replicas that
prefer the A10G, so one of them lives on the worker node. Clients are the official
``openai`` client over HTTP (streams) and airi's Python client (graph runs, conversation
writes). Each fault is injected while its load runs:

  replica_sigkill       SIGKILL of the busier replica while 48 streams are under way
  replica_sigstop       SIGSTOP of a replica (a hang) while 16 streams are under way
  scheduler_kill        the scheduler actor killed (Ray restarts it) during 24 streams
  controller_kill       the controller actor killed (Ray restarts it) during 24 streams
  context_store_sigkill SIGKILL of the context store during 8 writers' appends
  executor_kill         SIGKILL of the graph executor mid-run, then 8 concurrent pollers
  worker_node_kill      the worker node removed while 24 streams run (it rejoins after)
  ingress_kill          SIGKILL of one HTTP ingress replica while 24 streams are under way

One row per fault: requests sent, completed, failed with an error, hung (neither within
``HUNG_S``), acknowledged writes lost, duplicates (writes stored twice, graph nodes run
twice), and seconds from the fault until the system is whole again (the replicas ready,
the actor answering, the run finished). Targets (issue 21): 0 hung, 0 lost, 0 duplicates,
every stream of a killed replica completed. Writes ``benchmarks/results/chaos.json``
(``--smoke``: the replica, scheduler and controller faults with less load, into
``benchmarks/results/smoke/chaos.json``).

    python benchmarks/chaos.py [--smoke] [--only replica_sigkill,executor_kill]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

ENGINE_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
os.environ.update(ENGINE_ENV)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "chaos.json"
SMOKE_RESULTS = HERE / "results" / "smoke" / "chaos.json"
PORT = 8127
KEY = "sk-airi-0c0000000001-benchChaosTenant0001"
TENANT = "tenant-chaos"
MODEL = "tiny-chat"
TOKENS = 96
HUNG_S = 150.0  # a request neither answered nor failed by then counts as hung
RECOVER_S = 240.0
PROMPT = "Tell me about the shipping options, in detail."
FAULTS = (
    "replica_sigkill",
    "replica_sigstop",
    "scheduler_kill",
    "controller_kill",
    "context_store_sigkill",
    "executor_kill",
    "worker_node_kill",
    "ingress_kill",
)
SMOKE_FAULTS = ("replica_sigkill", "scheduler_kill", "controller_kill")


def spec(model_dir: str, storage: str) -> dict[str, Any]:
    return {
        "name": "chaos",
        "models": [
            {
                "name": MODEL,
                "model": model_dir,
                "replicas": 2,
                "num_cpus": 0.5,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "max_concurrency": 8,
                # One replica on the worker node's A10G, the other on an H100 of the head.
                "placement": {"accelerator_types": ["A10G", "H100"]},
                "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
            }
        ],
        "tenants": [{"name": TENANT, "api_keys": [KEY]}],
        "ingress": {"port": PORT},
        "storage": {"uri": storage},
    }


# -- load -----------------------------------------------------------------------------------


class Outcomes:
    """What each request of a load came to."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def ok(self) -> None:
        with self.lock:
            self.completed += 1

    def error(self, e: BaseException | str) -> None:
        with self.lock:
            self.failed.append(str(e)[:200])


def stream_once(oai: Any, outcomes: Outcomes, started: threading.Event, seen: list[int]) -> None:
    try:
        chunks = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=TOKENS,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens = 0
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                with outcomes.lock:
                    seen[0] += 1
                started.set()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens != TOKENS:
            outcomes.error(f"the stream ended after {tokens} of {TOKENS} tokens")
        else:
            outcomes.ok()
    except Exception as e:  # an error event, a broken connection, a 5xx
        outcomes.error(f"{type(e).__name__}: {e}")


def under_streams(
    n: int, fault: Callable[[], None], until_ready: Callable[[], bool], min_chunks: int = 8
) -> dict[str, Any]:
    """``n`` streams at once; ``fault`` once ``min_chunks`` chunks arrived. The row."""
    import openai

    oai = openai.OpenAI(
        base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=0, timeout=HUNG_S
    )
    outcomes, started, seen = Outcomes(), threading.Event(), [0]
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(stream_once, oai, outcomes, started, seen) for _ in range(n)]
    deadline = time.monotonic() + 120
    while seen[0] < min_chunks and time.monotonic() < deadline:
        time.sleep(0.02)
    t_fault = time.monotonic()
    fault()
    done, not_done = wait(futures, timeout=HUNG_S)
    recover_s = recovered(until_ready, t_fault)
    pool.shutdown(wait=False, cancel_futures=True)
    return {
        "sent": n,
        "completed": outcomes.completed,
        "failed": len(outcomes.failed),
        "hung": len(not_done),
        "lost_writes": 0,
        "duplicates": 0,
        "recover_s": recover_s,
        "errors": sorted(set(outcomes.failed))[:3],
    }


def recovered(ready: Callable[[], bool], since: float) -> float | None:
    deadline = since + RECOVER_S
    while time.monotonic() < deadline:
        try:
            if ready():
                return round(time.monotonic() - since, 1)
        except Exception:
            pass
        time.sleep(0.25)
    return None


# -- probes and faults ----------------------------------------------------------------------


def pid_of(handle: Any) -> int:
    import ray

    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10))


def ready_replicas(client: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in client.status()["replicas"]
        if r["model"].startswith(MODEL) and r["state"] == "ready"
    ]


def whole(client: Any) -> Callable[[], bool]:
    """Two ready replicas and a chat answered: the fleet is whole again."""

    def check() -> bool:
        return (
            len(ready_replicas(client)) == 2 and client.chat(MODEL, "hi", max_tokens=2) is not None
        )

    return check


def busiest_replica() -> str:
    import ray

    from airi_ray.runtime import names

    scheduler = names.get_actor(names.SCHEDULER_NAME)
    in_flight = ray.get(scheduler.replica_in_flight.remote(MODEL))
    return max(in_flight, key=in_flight.get)


def restart_actor(name: str) -> Callable[[], None]:
    def fault() -> None:
        import ray

        from airi_ray.runtime import names

        ray.kill(names.get_actor(name), no_restart=False)

    return fault


def answers(name: str, before: int) -> Callable[[], bool]:
    """The named actor answers from a new process."""

    def check() -> bool:
        from airi_ray.runtime import names

        return pid_of(names.get_actor(name)) != before

    return check


# -- the rows -------------------------------------------------------------------------------


def replica_sigkill(client: Any, n: int) -> dict[str, Any]:
    from airi_ray.runtime import names

    def fault() -> None:
        os.kill(pid_of(names.get_actor(busiest_replica())), signal.SIGKILL)

    return under_streams(n, fault, whole(client))


def replica_sigstop(client: Any, n: int) -> dict[str, Any]:
    from airi_ray.runtime import names

    stopped: list[int] = []

    def fault() -> None:
        pid = pid_of(names.get_actor(busiest_replica()))
        stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)  # the controller's probe must notice and replace it

    try:
        return under_streams(n, fault, whole(client))
    finally:
        for pid in stopped:  # if it still exists: let it die properly
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def actor_kill(client: Any, n: int, name: str) -> dict[str, Any]:
    from airi_ray.runtime import names

    before = pid_of(names.get_actor(name))
    served = whole(client)
    return under_streams(n, restart_actor(name), lambda: answers(name, before)() and served())


def context_store_sigkill(client: Any, writers: int) -> dict[str, Any]:
    """Writers append turns (each with a request id) as fast as they are acknowledged; the
    store is SIGKILLed mid-burst. Every acknowledged turn must be there after, once."""
    from airi_ray.core.errors import AiriError
    from airi_ray.runtime import names

    acked: dict[str, list[str]] = {}
    sent = [0]
    failed: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        conv = f"chaos-{w}-{time.time_ns()}"
        acked[conv] = []
        i = 0
        while not stop.is_set():
            rid = f"{conv}-{i}"
            with lock:
                sent[0] += 1
            try:
                client.append_turns(conv, [{"role": "user", "content": rid}], request_id=rid)
                acked[conv].append(rid)
            except (AiriError, Exception) as e:  # the store is down: retry this one
                with lock:
                    failed.append(type(e).__name__)
                time.sleep(0.1)
                continue
            i += 1

    store = names.get_actor(names.CONTEXT_STORE_NAME)
    before = pid_of(store)
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    time.sleep(3)
    t_fault = time.monotonic()
    os.kill(before, signal.SIGKILL)
    recover_s = recovered(
        lambda: (
            answers(names.CONTEXT_STORE_NAME, before)()
            and bool(client.append_turns("chaos-probe", [{"role": "user", "content": "p"}]))
        ),
        t_fault,
    )
    time.sleep(3)  # writes go on against the restarted store
    stop.set()
    for t in threads:
        t.join(timeout=HUNG_S)
    hung = sum(t.is_alive() for t in threads)
    lost = duplicates = 0
    for conv, rids in acked.items():
        stored = [t["content"] for t in client.conversation(conv)]
        lost += len(set(rids) - set(stored))
        duplicates += len(stored) - len(set(stored))
    return {
        "sent": sent[0],
        "completed": sum(len(r) for r in acked.values()),
        "failed": len(failed),  # refused while the store was down; retried by the writer
        "hung": hung,
        "lost_writes": lost,
        "duplicates": duplicates,
        "recover_s": recover_s,
        "errors": sorted(set(failed))[:3],
    }


def executor_kill(client: Any, pollers: int, workdir: Path) -> dict[str, Any]:
    """A six-node graph whose nodes log each run to a file; the executor is SIGKILLed
    while the third runs, then ``pollers`` clients wait for the run at once."""
    from airi_ray.core.errors import ReplicaUnavailable
    from airi_ray.graphs import END, START, Field, StateGraph, append
    from airi_ray.runtime import names

    calls, gate = str(workdir / "calls.txt"), str(workdir / "gate")
    nodes = [f"n{i}" for i in range(1, 7)]

    def node(name: str) -> Any:
        async def run(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
            with open(calls, "a") as f:
                f.write(name + "\n")
            while name == "n3" and not os.path.exists(gate):
                await asyncio.sleep(0.05)
            if name == "n4":
                await ctx.chat(MODEL, "Say hi.", max_tokens=4, temperature=0.0)
            return {"trace": [name]}

        return run

    g = StateGraph("chaos-run", {"x": Field(), "trace": Field(reducer=append)}, inputs=["x"])
    prev = START
    for name in nodes:
        g.add_node(name, node(name), writes=["trace"])
        g.add_edge(prev, name)
        prev = name
    g.add_edge(prev, END)
    client.register_graph(g.compile())

    def ran() -> list[str]:
        return Path(calls).read_text().split() if Path(calls).exists() else []

    run_id = client.start_run("chaos-run", {"x": 1})
    deadline = time.monotonic() + 60
    while "n3" not in ran() and time.monotonic() < deadline:
        time.sleep(0.05)
    executor = names.get_actor(names.GRAPH_EXECUTOR_NAME)
    before = pid_of(executor)
    t_fault = time.monotonic()
    os.kill(before, signal.SIGKILL)
    recovered(answers(names.GRAPH_EXECUTOR_NAME, before), t_fault)
    Path(gate).touch()
    results: list[Any] = []
    errors: list[str] = []

    def poll() -> None:
        end = time.monotonic() + HUNG_S
        while time.monotonic() < end:
            try:
                results.append(client.wait_run(run_id))
                return
            except ReplicaUnavailable:
                time.sleep(0.2)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                return

    threads = [threading.Thread(target=poll) for _ in range(pollers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HUNG_S)
    recover_s = round(time.monotonic() - t_fault, 1)
    counts = {n: ran().count(n) for n in nodes}
    # n1, n2 checkpointed before the kill; n3 was running (it runs once more by design).
    twice = sum(c - 1 for n, c in counts.items() if n != "n3" and c > 1) + max(counts["n3"] - 2, 0)
    finished = [r for r in results if r.get("status") == "finished"]
    return {
        "sent": pollers,
        "completed": len(finished),
        "failed": len(errors) + len(results) - len(finished),
        "hung": sum(t.is_alive() for t in threads),
        "lost_writes": 0,
        "duplicates": twice,
        "recover_s": recover_s,
        "errors": errors[:3],
        "node_runs": counts,
    }


def worker_node_kill(client: Any, n: int, cluster: Any, worker: list[Any]) -> dict[str, Any]:
    """Streams under way when the worker node (with the A10G replica) is removed; then it
    rejoins. ``rejoined_replicas``: replicas on the A10G a while after it came back."""

    def fault() -> None:
        cluster.remove_node(worker[0], allow_graceful=False)

    row = under_streams(n, fault, whole(client))
    worker[0] = cluster.add_node(num_cpus=2, resources={"accelerator_type:A10G": 1})
    deadline = time.monotonic() + 90
    back = 0
    while time.monotonic() < deadline:
        back = sum(1 for r in ready_replicas(client) if r.get("accelerator") == "A10G")
        if back:
            break
        time.sleep(1)
    row["rejoined_replicas"] = back
    return row


def _is_ingress_replica(name: str) -> bool:
    """A Serve replica actor of airi's ingress deployment (``SERVE_REPLICA::app#dep#id``)."""
    return name.startswith("SERVE_REPLICA::") and "#airi-ingress#" in name


def ingress_kill(client: Any, n: int) -> dict[str, Any]:
    import ray

    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if _is_ingress_replica(a["name"])
    ]
    if not replicas:
        raise RuntimeError("no ingress replica found among the named actors")

    def fault() -> None:
        handle = ray.get_actor(replicas[0], namespace="serve")
        os.kill(pid_of(handle), signal.SIGKILL)

    def served() -> bool:
        names_now = {
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if _is_ingress_replica(a["name"])
        }
        return len(names_now) >= len(replicas) and whole(client)()

    row = under_streams(n, fault, served)
    row["ingress_replicas"] = len(replicas)
    return row


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="three faults, less load")
    parser.add_argument("--only", default="", help="comma-separated faults to run")
    args = parser.parse_args()
    faults = SMOKE_FAULTS if args.smoke else FAULTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(FAULTS))
        if unknown:
            parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
        faults = tuple(f for f in FAULTS if f in wanted)
    streams = 16 if args.smoke else 48

    import ray
    from ray.cluster_utils import Cluster

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model
    from airi_ray.runtime import names

    model_dir = str(ensure_tiny_model())
    work = Path(tempfile.mkdtemp(prefix="airi-chaos-"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {"accelerator_type:H100": 2},
            "include_dashboard": False,
        },
    )
    worker = [cluster.add_node(num_cpus=2, resources={"accelerator_type:A10G": 1})]
    ray.init(address=cluster.address, namespace="airi", log_to_driver=False)
    rows: dict[str, Any] = {}
    try:
        airi.deploy(spec(model_dir, str(work / "state")))
        client = airi.connect("auto", api_key=KEY)
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "replica_sigkill": lambda: replica_sigkill(client, streams),
            "replica_sigstop": lambda: replica_sigstop(client, 16),
            "scheduler_kill": lambda: actor_kill(client, streams // 2, names.SCHEDULER_NAME),
            "controller_kill": lambda: actor_kill(client, streams // 2, names.CONTROLLER_NAME),
            "context_store_sigkill": lambda: context_store_sigkill(client, 8),
            "executor_kill": lambda: executor_kill(client, 8, work),
            "worker_node_kill": lambda: worker_node_kill(client, streams // 2, cluster, worker),
            "ingress_kill": lambda: ingress_kill(client, streams // 2),
        }
        for fault in faults:
            t0 = time.perf_counter()
            try:
                rows[fault] = runs[fault]()
            except Exception as e:  # a fault the harness could not inject is a row too
                rows[fault] = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows[fault]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(fault, json.dumps(rows[fault]), flush=True)
        client.close()
    finally:
        airi.shutdown()
        ray.shutdown()
        cluster.shutdown()

    cols = ("sent", "completed", "failed", "hung", "lost_writes", "duplicates", "recover_s")
    print(f"\n{'fault':<24}" + "".join(f"{c:>13}" for c in cols))
    for fault, row in rows.items():
        print(f"{fault:<24}" + "".join(f"{str(row.get(c, '-')):>13}" for c in cols))
    targets = {
        "hung": 0,
        "lost_writes": 0,
        "duplicates": 0,
        "killed_replica_streams_completed": "every one",
    }
    met = all(
        "error" not in r and r["hung"] == 0 and r["lost_writes"] == 0 and r["duplicates"] == 0
        for r in rows.values()
    ) and all(rows[f]["failed"] == 0 for f in ("replica_sigkill", "worker_node_kill") if f in rows)
    out = {
        "benchmark": "chaos",
        "smoke": args.smoke,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "faults": rows,
        "targets": targets,
        "targets_met": met,
    }
    path = SMOKE_RESULTS if args.smoke else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\ntargets met: {met}; wrote {path}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
