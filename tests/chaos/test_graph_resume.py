"""The graph executor's process killed with SIGKILL mid-run, then eight concurrent pollers
(the Python client's ``wait_run`` and ``GET /v1/graphs/{name}/runs/{id}``): the run is
resumed once, every node after the crash runs exactly once (side effects counted in a
file, which outlives the executor), its model call is made once, and the run finishes."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray

from airi_ray.core.errors import ReplicaUnavailable
from airi_ray.core.runs import CHARGED
from airi_ray.graphs import END, START, Field, StateGraph, append
from airi_ray.runtime import names
from tests.conftest import KEY, wait_for

POLLERS = 8
GRAPH = "resume-8"
NODES = [f"n{i}" for i in range(1, 7)]
POLL_S = 120.0


def _node(path: str, name: str, gate: str | None, chat: bool) -> Any:
    """A node that appends its name to ``path`` each time it runs; with a gate, waits for
    the gate file before it finishes; with ``chat``, makes one model call."""

    async def node(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
        with open(path, "a") as f:
            f.write(name + "\n")
        while gate is not None and not os.path.exists(gate):
            await asyncio.sleep(0.05)
        if chat:
            await ctx.chat("tiny-chat", "Say hi.", max_tokens=4, temperature=0.0)
        return {"trace": [name]}

    return node


def _graph(calls: str, gate: str, name: str = GRAPH) -> Any:
    g = StateGraph(name, {"x": Field(), "trace": Field(reducer=append)}, inputs=["x"])
    prev = START
    for name in NODES:
        g.add_node(
            name,
            _node(calls, name, gate if name == "n3" else None, chat=name == "n4"),
            writes=["trace"],
        )
        g.add_edge(prev, name)
        prev = name
    g.add_edge(prev, END)
    return g.compile()


def _pid() -> int | None:
    try:
        executor = names.get_actor(names.GRAPH_EXECUTOR_NAME)
        return int(ray.get(executor.stats.remote(), timeout=5)["pid"])
    except Exception:
        return None


@dataclass
class _Killed:
    """A run whose executor was SIGKILLed while its node n3 waited at the gate."""

    run_id: str
    calls: Path  # one line per node execution
    gate: Path  # n3 waits until this file exists

    def record(self) -> dict[str, Any]:
        store = names.get_actor(names.CONTEXT_STORE_NAME)
        return ray.get(store.run.remote("tenant-a", self.run_id))

    def ran(self) -> list[str]:
        return self.calls.read_text().split() if self.calls.exists() else []


def _kill_in_n3(client, tmp_path: Path, graph: str) -> _Killed:
    """Start a run of a new graph ``graph``, kill the executor in n3 and wait for its
    restart (n3 stays gated)."""
    calls, gate = tmp_path / "calls.txt", tmp_path / "gate"
    client.register_graph(_graph(str(calls), str(gate), graph))
    run = _Killed(client.start_run(graph, {"x": 1}), calls, gate)
    wait_for(lambda: len(run.record()["checkpoints"]) == 2 and "n3" in run.ran(), what="n3 running")
    pid = _pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _pid() not in (None, pid), timeout=120, what="the executor to restart")
    return run


def test_eight_pollers_resume_a_killed_run_once(airi_app, client, tmp_path: Path) -> None:
    killed = _kill_in_n3(client, tmp_path, GRAPH)
    run_id, record, ran = killed.run_id, killed.record, killed.ran
    # Only once the old process is gone may n3 finish (in its new incarnation).
    killed.gate.touch()

    start = threading.Barrier(POLLERS)
    retries = {"n": 0}
    url = f"{airi_app.base_url}/v1/graphs/{GRAPH}/runs/{run_id}"
    headers = {"Authorization": f"Bearer {KEY}"}

    def by_client() -> dict[str, Any]:
        start.wait()
        deadline = time.monotonic() + POLL_S
        while True:  # a client retries a 503 while the executor comes back
            try:
                return client.wait_run(run_id)
            except ReplicaUnavailable:
                retries["n"] += 1
                assert time.monotonic() < deadline, "wait_run kept failing"

    def by_http() -> dict[str, Any]:
        start.wait()
        deadline = time.monotonic() + POLL_S
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                r = http.get(url, headers=headers)
                if r.status_code >= 500:
                    retries["n"] += 1
                elif r.json().get("status") != "running":
                    assert r.status_code == 200, r.text
                    return r.json()
                time.sleep(0.1)
        raise AssertionError(f"GET {url} did not see the run end in {POLL_S}s")

    with ThreadPoolExecutor(POLLERS) as pool:
        polls = [pool.submit(by_client if i % 2 else by_http) for i in range(POLLERS)]
        results = [p.result() for p in polls]

    for r in results:
        assert r["status"] == "finished", r
        assert r["state"]["trace"] == NODES, r
    counts = {n: ran().count(n) for n in NODES}
    # n1 and n2 were checkpointed before the kill: never again. n3 was running: once more.
    # Every node after the crash, once, however many pollers came.
    assert counts == {"n1": 1, "n2": 1, "n3": 2, "n4": 1, "n5": 1, "n6": 1}, counts
    got = record()
    statuses = [e["status"] for e in got["events"] if e["status"] != CHARGED]
    assert statuses == ["started", "resumed", "finished"], statuses
    assert got["token"] == 1  # one claim: one resume
    assert [e["model"] for e in got["events"] if e["status"] == CHARGED] == ["tiny-chat"]
    assert results[0]["usage"]["calls"] == 1 and results[0]["usage"]["tokens"] > 0
    assert sorted(c["node"] for c in got["checkpoints"]) == NODES


def test_cancelling_an_orphaned_run_ends_it_without_resuming_it(airi_app, client, tmp_path) -> None:
    """Before: a cancel of a run whose executor had died answered 404 (the new process did
    not hold it), and the next poller resumed it."""
    killed = _kill_in_n3(client, tmp_path, "cancel-orphan")
    run_id, record, ran = killed.run_id, killed.record, killed.ran
    cancelled = client.cancel_run(run_id)
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["error"]["code"] == "run_cancelled", cancelled
    assert cancelled["state"]["trace"] == ["n1", "n2"]  # as of its last checkpoint
    killed.gate.touch()
    assert client.wait_run(run_id)["status"] == "cancelled"  # not resumed by a poller
    assert client.get_run(run_id)["status"] == "cancelled"
    assert ran() == ["n1", "n2", "n3"]  # nothing ran after the kill
    statuses = [e["status"] for e in record()["events"] if e["status"] != CHARGED]
    assert statuses == ["started", "cancelled"], statuses
