"""Observability on the session's engines: a graph run's trace, quality signals and
feedback per version, input drift after a change of topic (and none before it), a latency
anomaly on a slowed replica, `/metrics`, `airi alerts` and `airi report`."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

from airi_ray.core.errors import InvalidRequest, NotFound
from airi_ray.core.traces import build_tree, render_tree, summarize
from airi_ray.demo.traffic import SUPPORT, UNRELATED
from airi_ray.graphs import END, START, Field, StateGraph, chat, check, embed
from airi_ray.runtime import names
from tests.conftest import KEY, OTHER_KEY, wait_for

SHORT = {"max_tokens": 4, "temperature": 0.0}

# Small windows so the test needs hundreds of requests, not thousands; fewer PSI bins and
# higher thresholds keep such small samples quiet on unchanged traffic (see core/drift.py).
DRIFT = {
    "embedder": "minilm",
    "sample": 1.0,
    "reference_size": 150,
    "window_size": 80,
    "min_samples": 80,
    "check_every": 10,
    "bins": 5,
    "psi_warn": 0.2,
    "psi_alert": 0.35,
    "mean_shift_alert": 0.1,
    "length_psi_warn": 0.3,
    "length_psi_alert": 0.5,
}
STATIONARY = 300  # requests of unchanged traffic after the reference, counted for false alerts


def _chats(client: Any, prompts: list[str]) -> None:
    """Send the prompts to tiny-chat, eight at a time."""

    async def run() -> None:
        sem = asyncio.Semaphore(8)

        async def one(p: str) -> None:
            async with sem:
                await client.aio.chat("tiny-chat", [{"role": "user", "content": p}], **SHORT)

        await asyncio.gather(*(one(p) for p in prompts))

    client._run(run())


def _observer() -> Any:
    return names.get_actor("airi-observer")


def _alerts(client: Any, kind_prefix: str) -> list[dict[str, Any]]:
    return [a for a in client.alerts(limit=1000) if a["kind"].startswith(kind_prefix)]


def _observed() -> int:
    import ray

    return int(ray.get(_observer().stats.remote())["records"])


def test_a_graph_run_trace_has_every_node_and_model_call(client) -> None:
    fields = {"q": Field(), "clean": Field(), "vec": Field(), "draft": Field(), "final": Field()}
    g = StateGraph("traced", fields, inputs=["q"])
    g.add_node("guard", check("q", output="clean"), reads=["q"], writes=["clean"])
    g.add_node(
        "vectors",
        embed("minilm", lambda v: v["clean"], output="vec"),
        reads=["clean"],
        writes=["vec"],
    )
    g.add_node(
        "draft",
        chat("tiny-chat", lambda v: v["clean"], output="draft", **SHORT),
        reads=["clean"],
        writes=["draft"],
    )

    async def polish(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
        text = await ctx.chat("tiny-chat", [{"role": "user", "content": view["draft"]}], **SHORT)
        return {"final": text}

    g.add_node("polish", polish, reads=["draft"], writes=["final"])
    g.add_edge(START, "guard")
    g.add_edge("guard", "vectors").add_edge("guard", "draft")
    g.add_edge("draft", "polish").add_edge("polish", END).add_edge("vectors", END)
    client.register_graph(g.compile())
    run = client.run_graph("traced", {"q": "where is my parcel?"})
    assert run["status"] == "finished", run["error"]

    spans = wait_for(lambda: _trace_if_complete(client, run["run_id"]), 30, "the run's trace")
    roots = build_tree(spans)
    assert len(roots) == 1 and roots[0].name == "run traced"
    root = roots[0]
    nodes = {c.attributes["airi.node"]: c for c in root.children}
    assert set(nodes) == {"guard", "vectors", "draft", "polish"}
    calls = [n for n in root.walk() if n.kind == "model_call"]
    assert sorted(c.attributes["airi.model"] for c in calls) == ["minilm", "tiny-chat", "tiny-chat"]
    for c in calls:  # each call under its node, with its version, replica and tokens
        assert c.attributes["airi.version"] and c.attributes["airi.replica"]
        assert c.attributes["airi.prompt_tokens"] > 0
    assert [c.kind for c in nodes["vectors"].children] == ["model_call"]
    assert [c.kind for c in nodes["polish"].children] == ["model_call"]
    # Timings sum sensibly: children inside their parents, nodes within the run, and the
    # sequential chain guard -> draft -> polish no longer than the run.
    for node in root.walk():
        for child in node.children:
            assert node.start_ns <= child.start_ns and child.end_ns <= node.end_ns
    chain = sum(nodes[n].duration_ms for n in ("guard", "draft", "polish"))
    assert chain <= root.duration_ms
    assert nodes["draft"].start_ns >= nodes["guard"].end_ns
    assert summarize(spans)["tokens"]["completion"] == sum(
        c.attributes.get("airi.completion_tokens", 0) for c in calls
    )
    text = render_tree(spans)
    assert "run traced" in text and "node polish" in text and "tiny-chat" in text

    # Another tenant cannot read it.
    import airi_ray as airi

    other = airi.connect("auto", api_key=OTHER_KEY)
    try:
        with pytest.raises(NotFound):
            other.trace(run["run_id"])
    finally:
        other.close()


def _trace_if_complete(client: Any, run_id: str) -> list[dict[str, Any]] | None:
    try:
        spans = client.trace(run_id)
    except NotFound:
        return None
    return spans if any(s["name"] == "run traced" for s in spans) else None


def test_http_calls_have_traces_feedback_and_metrics(airi_app, oai) -> None:
    done = oai.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    base = airi_app.base_url
    trace = wait_for(
        lambda: (
            (r := httpx.get(f"{base}/v1/traces/{done.id}", headers=headers)).status_code == 200
            and r.json()
        ),
        30,
        "the call's trace",
    )
    [root] = build_tree(trace["spans"])
    assert root.kind == "model_call" and root.attributes["airi.model"] == "tiny-chat"

    # Feedback names the completion; it is credited to the version that answered.
    r = wait_for(
        lambda: (
            (
                r := httpx.post(
                    f"{base}/v1/feedback", headers=headers, json={"id": done.id, "rating": "up"}
                )
            ).status_code
            == 200
            and r
        ),
        30,
        "the observer to know the completion",
    )
    assert r.json()["model"] == "tiny-chat" and r.json()["score"] == 1.0
    bad = httpx.post(f"{base}/v1/feedback", headers=headers, json={"id": done.id, "score": 3})
    assert bad.status_code == 400 and "score" in bad.json()["error"]["message"]
    both = httpx.post(f"{base}/v1/feedback", headers=headers, json={"id": done.id})
    assert both.status_code == 400 and "either score" in both.json()["error"]["message"]
    unknown = httpx.post(
        f"{base}/v1/feedback", headers=headers, json={"id": "chatcmpl-x", "score": 1}
    )
    assert unknown.status_code == 404
    other = httpx.post(
        f"{base}/v1/feedback",
        headers={"Authorization": f"Bearer {OTHER_KEY}"},
        json={"id": done.id, "score": -1},
    )
    assert other.status_code == 404  # another tenant's completion is not found
    assert httpx.get(f"{base}/v1/traces/nope", headers=headers).status_code == 404
    assert httpx.get(f"{base}/v1/alerts?limit=x", headers=headers).status_code == 400
    assert httpx.get(f"{base}/v1/alerts?severity=huge", headers=headers).status_code == 400

    import ray

    quality = ray.get(_observer().quality.remote())
    q = next(iter(quality["tiny-chat"].values()))
    assert q["responses"] >= 1 and q["feedback_count"] >= 1
    metrics = httpx.get(f"{base}/metrics").text
    assert 'airi_feedback_total{model="tiny-chat"' in metrics
    assert 'airi_quality{model="tiny-chat"' in metrics


def test_retrieval_relevance_is_credited_to_the_embedder_version(client) -> None:
    name = "obs-kb"
    if name not in client.collections():
        client.create_collection(name, model="minilm")
    client.ingest(name, documents=[{"id": "tents", "text": "Our tents are waterproof."}])
    before = client.quality().get("minilm", {})
    hits = client.retrieve(name, "are the tents waterproof?", k=1)
    assert hits

    def counted() -> bool:
        after = client.quality().get("minilm", {})
        return any(
            v["relevance_count"] > before.get(k, {}).get("relevance_count", 0)
            for k, v in after.items()
        )

    wait_for(counted, 30, "the relevance signal")


def test_drift_alert_after_a_change_of_topic_and_none_before(airi_app, client) -> None:
    """Support questions fill the reference and then run unchanged for STATIONARY requests
    (alerts counted: the false positives); then the traffic turns to unrelated text and
    the input-embedding drift alert must come within 200 requests."""
    import ray

    import airi_ray as airi

    spec = {**airi_app.spec, "observability": {"drift": DRIFT}}
    airi.deploy(spec)
    try:
        rng = random.Random(7)
        before = {a["id"] for a in _alerts(client, "drift")}
        expected = _observed()

        def send(prompts: list[str]) -> None:
            nonlocal expected
            _chats(client, prompts)
            expected += len(prompts)
            wait_for(lambda: _observed() >= expected, 60, "the observer to take every request")

        def embeddings_judged() -> bool:
            scores = ray.get(_observer().drift.remote())
            return any("embedding_psi" in v for k, v in scores.items() if "tiny-chat" in k)

        # Callers see the new drift settings within their config refresh (5 s): until
        # then their prompts are not embedded. The reference fills from support questions
        # alone, however many that takes, before the unchanged traffic is counted.
        send([rng.choice(SUPPORT) for _ in range(DRIFT["reference_size"] + DRIFT["min_samples"])])
        for _ in range(20):
            if embeddings_judged():
                break
            send([rng.choice(SUPPORT) for _ in range(20)])
        assert embeddings_judged(), "support questions did not fill the embedding reference"
        send([rng.choice(SUPPORT) for _ in range(STATIONARY)])
        false_alerts = [a for a in _alerts(client, "drift") if a["id"] not in before]
        assert false_alerts == [], json.dumps(false_alerts, indent=1)

        sent = 0
        found: list[dict[str, Any]] = []
        while sent < 200 and not found:
            send([rng.choice(UNRELATED) for _ in range(20)])
            sent += 20
            found = [
                a
                for a in _alerts(client, "drift.embedding")
                if a["id"] not in before and a["severity"] != "info"
            ]
        scores = ray.get(_observer().drift.remote())
        assert found, f"no embedding drift alert after 200 requests of unrelated text: {scores}"
        alert = found[0]
        assert alert["model"] == "tiny-chat" and alert["evidence"]
        print(f"drift alert after {sent} unrelated requests; false alerts: {len(false_alerts)}")
    finally:
        airi.deploy(airi_app.spec)


def test_a_slowed_replica_raises_a_latency_anomaly(airi_app, client) -> None:
    """Fresh detectors (a deploy with new anomaly settings restarts them, and earlier tests'
    load spikes may have alerted within the default cooldown), baselines from 60 calls,
    then one replica holds every generation half a second."""
    import ray

    import airi_ray as airi

    airi.deploy({**airi_app.spec, "observability": {"anomaly": {"cooldown_s": 0}}})
    slow = ""
    try:
        replicas = [
            r["replica_id"]
            for r in client.status()["replicas"]
            if r["model"].startswith("tiny-chat") and r["state"] == "ready"
        ]
        slow = replicas[0]
        _chats(client, [f"warm up {i}" for i in range(60)])  # baselines for both replicas
        # Only what comes after the delay counts (a busy machine may alert during warm-up).
        before = {a["id"] for a in _alerts(client, "anomaly.latency")}
        ray.get(names.get_actor(slow).inject_delay.remote(0.5))

        def alerted() -> list[dict[str, Any]]:
            _chats(client, [f"slow {i}" for i in range(8)])
            return [
                a
                for a in _alerts(client, "anomaly.latency")
                if a["id"] not in before and a["replica"] == slow
            ]

        found = wait_for(alerted, 90, "a latency anomaly on the slowed replica")
    finally:
        if slow:
            ray.get(names.get_actor(slow).inject_delay.remote(0))
        airi.deploy(airi_app.spec)
    assert found[0]["severity"] in ("warning", "critical")
    assert max(a["evidence"]["ratio"] for a in found) > 2


def test_alerts_report_and_bad_input(client, tmp_path) -> None:
    with pytest.raises(InvalidRequest, match="severity"):
        client.alerts(severity="loud")
    with pytest.raises(InvalidRequest, match="score"):
        client.feedback("run-x", 2)
    from airi_ray.cli import main

    assert main(["alerts", "--address", "auto", "--api-key", KEY, "--limit", "5"]) == 0
    out = tmp_path / "report.html"
    pngs = tmp_path / "png"
    assert main(["report", "--out", str(out), "--png-dir", str(pngs), "--api-key", KEY]) == 0
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 5
    assert {p.name for p in pngs.iterdir()} >= {"throughput.png", "drift.png"}
