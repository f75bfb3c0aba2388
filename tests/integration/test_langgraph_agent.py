"""``deployments/langgraph_agent.py`` on the session cluster: a LangGraph agent (intent,
retrieval, answer) whose process is SIGKILLed mid-run resumes from its checkpoint in
airi's context store without running its finished nodes again, keeps its token budget
across the two processes, and shows in ``airi trace`` as one run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from uuid import uuid4

import ray

from airi_ray import cli
from airi_ray.runtime import names
from airi_ray.runtime.backend import outside_run_key
from tests.conftest import KEY, App, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_agent_resumes_from_its_checkpoint(airi_app: App, tmp_path: Path, capsys) -> None:
    journal = tmp_path / "journal.jsonl"
    thread = f"agent-{uuid4().hex[:8]}"
    command = [sys.executable, "-m", "deployments.langgraph_agent", "--thread", thread]
    command += ["--api-key", KEY, "--journal", str(journal), "--answer-tokens", "400"]

    def events() -> list[dict]:
        if not journal.exists():
            return []
        return [json.loads(line) for line in journal.read_text().splitlines()]

    def traced() -> list[dict]:
        capsys.readouterr()
        if cli.main(["trace", thread, "--api-key", KEY, "--json"]) != 0:
            return []  # not stored yet: "no trace of ..."
        return json.loads(capsys.readouterr().out)

    first = subprocess.Popen(
        [*command, "Where is my parcel?"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Once the answer node starts, intent's and retrieve's checkpoints are committed
        # (durability="sync"); its 400 tokens take seconds, so the kill lands inside it.
        wait_for(
            lambda: (
                first.poll() is not None
                or ("answer", "start") in {(e["node"], e["event"]) for e in events()}
            ),
            timeout=180,
            what="the agent to reach its answer node",
        )
        assert first.poll() is None, first.communicate()[1][-3000:]
        # Traces are sent every 0.2 s: a process killed sooner loses its last spans.
        wait_for(lambda: "node intent" in span_names(traced()), timeout=30, what="intent's span")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert ("answer", "done") not in {(e["node"], e["event"]) for e in events()}

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout[second.stdout.index("{") :])
    assert result["resumed"] and result["thread"] == thread
    assert result["intent"] in ("orders", "returns", "account", "product")
    assert result["sources"] and result["answer"]

    done = Counter((e["node"], e["pid"]) for e in events() if e["event"] == "done")
    assert done == {
        ("intent", first.pid): 1,
        ("retrieve", first.pid): 1,
        ("answer", second_pid(events(), first.pid)): 1,
    }, events()
    assert {e["node"] for e in events() if e["pid"] != first.pid} == {"answer"}

    # The run's calls were recorded as they ended: the intent call by the first process,
    # the answer by the second, which went on from the first's count (seq 1, not 0 again).
    store = names.get_actor(names.CONTEXT_STORE_NAME)
    record = ray.get(store.run.remote("tenant-a", outside_run_key(thread)), timeout=30)
    charged = [e for e in record["events"] if e["status"] == "charged"]
    assert len(charged) == 2 and all(e["tokens"] > 0 for e in charged), charged
    assert charged[1]["tokens"] > 400  # the answer's prompt and its 400 tokens

    # `airi trace THREAD`: both processes' calls, one trace.
    def answered() -> list[dict] | None:
        spans = traced()
        return spans if "node answer" in span_names(spans) else None

    spans = wait_for(answered, timeout=30, what="the resumed run's spans")
    assert len({s["trace_id"] for s in spans}) == 1
    nodes = Counter(s["name"] for s in spans if s["name"].startswith("node "))
    assert nodes["node intent"] == 1, nodes
    assert nodes["node answer"] >= 1, nodes
    assert all(s["attributes"].get("airi.run_id") == thread for s in spans if s["name"] in nodes)


def second_pid(events: list[dict], first: int) -> int:
    pids = {e["pid"] for e in events} - {first}
    assert len(pids) == 1, events
    return pids.pop()


def span_names(spans: list[dict]) -> list[str]:
    return [s["name"] for s in spans]
