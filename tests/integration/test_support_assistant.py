"""The support assistant (deployments/support_assistant.py) on real engines: its spec's
models and graph builder deployed next to the session's app, then intent routing on the
held-out questions, citations, PII redaction on every call, the refinement loop and its
bound, and conversation memory."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from airi_ray.core.errors import NotFound
from airi_ray.core.traces import build_tree
from deployments import support_assistant as sa
from tests.conftest import wait_for

# Its two generators start for these tests (about 50 s on two cores): `make test-showcase`.
pytestmark = pytest.mark.showcase

CARD = "4111 1111 1111 1111"
_DIGITS = re.compile(r"4111[ -]?1111[ -]?1111[ -]?1111")


@pytest.fixture(scope="module")
def assistant(airi_app: Any) -> Iterator[Any]:
    """The session's app plus the assistant's two generators, its tenant and its graph
    (built by the spec's builder: KB ingested, classifier trained)."""
    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    own = yaml.safe_load(sa.SPEC.read_text())
    spec = copy.deepcopy(airi_app.spec)
    for m in own["models"]:
        if m["name"] != "minilm":
            spec["models"].append(m | {"model": str(ensure_tiny_model())})
    tenant = own["tenants"][0]
    spec["tenants"].append(tenant)
    spec["graphs"] = [*spec.get("graphs", []), *own["graphs"]]
    airi.deploy(spec)
    client = airi.connect("auto", api_key=tenant["api_keys"][0])
    try:
        yield client
    finally:
        client.close()
        airi.deploy(airi_app.spec)


def _ask(client: Any, question: str, conversation: str = "") -> dict[str, Any]:
    run = client.run_graph(sa.GRAPH, {"question": question, "conversation_id": conversation})
    assert run["status"] == "finished", run["error"]
    return run


def test_intents_of_held_out_questions_route_to_the_right_model(assistant) -> None:
    from airi_ray.config import parse_spec
    from airi_ray.graphs import BuildContext
    from airi_ray.runtime.backend import BackendThread

    ctx = BuildContext(parse_spec({}), BackendThread())
    try:
        classifier = sa.train_intents(ctx)
        held_out = sa.load_examples("intents_heldout")
        vectors = ctx.embed(sa.EMBEDDER, [e["text"] for e in held_out])
    finally:
        ctx.close()
    routed = [
        sa.ROUTES[classifier.predict(v)[0]] == sa.ROUTES[e["intent"]]
        for v, e in zip(vectors, held_out, strict=True)
    ]
    intents = [
        classifier.predict(v)[0] == e["intent"] for v, e in zip(vectors, held_out, strict=True)
    ]
    print(
        f"held-out: model routing {sum(routed)}/{len(routed)}, intents {sum(intents)}/{len(intents)}"
    )
    assert sum(routed) / len(routed) >= 0.9
    # And through the graph: the answer comes from the intent's model.
    run = _ask(assistant, held_out[0]["text"])
    expected = sa.ROUTES[run["state"]["intent"]]
    assert run["state"]["model"] == expected
    assert set(run["usage"]["per_model"]) == {"minilm", expected}


def test_answers_cite_the_document_that_answers(assistant) -> None:
    questions = sa.load_examples("retrieval_questions")
    cited = [q["doc"] in _ask(assistant, q["question"])["state"]["sources"] for q in questions]
    print(f"answering document cited for {sum(cited)}/{len(cited)} questions")
    assert sum(cited) >= len(cited) - 1, cited


def test_a_card_number_never_reaches_a_model(assistant) -> None:
    conversation = "pii-check"
    run = _ask(assistant, f"My card {CARD} was charged twice for my order, why?", conversation)

    def trace() -> list[dict[str, Any]] | None:
        try:
            spans = assistant.trace(run["run_id"])
        except NotFound:  # not stored yet
            return None
        return spans if any(x["name"].startswith("run ") for x in spans) else None

    spans = wait_for(trace, 30, "the run's trace")
    [root] = build_tree(spans)
    nodes = {n.attributes["airi.node"]: n for n in root.children if n.kind == "node"}
    # Each call that carried the question (the intent's and the retrieval's embeddings, the
    # answer) had its own input filter redact the card before it was tokenized.
    for node in ("intent", "retrieve", "answer"):
        calls = [n for n in nodes[node].walk() if n.kind == "model_call"]
        assert calls, node
        for call in calls:
            policy = [c for c in call.children if c.kind == "policy"]
            assert policy and "redact:card" in policy[0].attributes.get("airi.policy", ""), node
    stored = assistant.conversation(conversation)
    assert stored and not any(_DIGITS.search(t["content"]) for t in stored)


def test_a_vague_question_refines_until_the_bound(assistant) -> None:
    run = _ask(assistant, "hmm, that thing?")
    s = run["state"]
    assert s["retrievals"] == sa.MAX_RETRIEVALS
    assert [t[1] for t in run["trail"]].count("rewrite") == sa.MAX_RETRIEVALS - 1
    clear = _ask(assistant, "How do I reset my password if I forgot it?")
    assert 1 <= clear["state"]["retrievals"] <= sa.MAX_RETRIEVALS


def test_a_follow_up_is_answered_in_the_conversation_s_context(assistant) -> None:
    conversation = "memory-check"
    first = _ask(assistant, "How many days do I have to return an item?", conversation)
    assert "returns-policy" in first["state"]["sources"]
    follow = _ask(assistant, "And for Nimbus Plus members?", conversation)
    assert follow["state"]["history"], "the follow-up saw no earlier turns"
    assert "returns-policy" in follow["state"]["sources"], follow["state"]["sources"]
    alone = _ask(assistant, "And for Nimbus Plus members?")
    assert alone["state"]["history"] == []
    assert len(assistant.conversation(conversation)) == 4


def test_a_long_conversation_is_answered_within_the_window(assistant) -> None:
    """Six stored turns of 150 words each are more than the 1024-token window holds with
    the sources: the run finishes (the oldest turns are left out of the prompt; before the
    fit, the model call was refused with context_length_exceeded)."""
    conversation = "long-memory"
    said = "I ordered the trail boots and the rain shell last week and nothing came yet " * 10
    assistant.append_turns(
        conversation,
        [{"role": r, "content": said} for r in ["user", "assistant"] * (sa.HISTORY_TURNS // 2)],
    )
    run = _ask(assistant, "How long do I have to return a pair of boots?", conversation)
    assert len(run["state"]["history"]) == sa.HISTORY_TURNS
    assert run["state"]["citations"], "nothing was retrieved for the question"
