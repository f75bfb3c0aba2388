"""The Nimbus Gear support assistant: one question becomes a graph of model calls.

    airi up --config deployments/support_assistant.yaml     # deploys it (models, KB, graph)
    airi chat --graph support_assistant                      # then talk to it
    ray job submit --working-dir . -- python -m deployments.support_assistant

The graph (``assistant_graph``), for each turn of a conversation:

1. ``memory``: the conversation's last turns from the context store;
2. ``intent``: the question embedded by MiniLM, classified by a logistic regression trained
   at deploy time on ``support_assistant/intents_train.jsonl`` (with its confidence);
3. ``retrieve``: the knowledge-base chunks closest to the query (the tenant's own copy of
   the KB; a follow-up question is searched together with the previous one);
4. ``answer``: the specialised model for the intent (``ROUTES``: ``orders-assistant`` or
   ``care-assistant``) answers from the retrieved chunks, in a prompt fitted to its context
   window (``ctx.fit``: the chunks, then the newest turns that still fit);
5. ``check``: retrieval relevance (best similarity) and grounding (similarity between the
   answer and the chunks it cites); when either is low, ``rewrite`` the query with the
   intent's vocabulary and retrieve again, at most ``MAX_RETRIEVALS`` times;
6. ``finish``: the answer with its citations, and both turns stored in the conversation
   (the question as the tenant's filters redact it).

Every model call of the run passes the runtime's policy (the tenant's ACL, limits and
filters: a card number is redacted before each call) and is traced (``airi trace RUN_ID``).

The two specialised models (``orders-assistant``, ``care-assistant``) are separate model
entries with their own versions, so each can be scaled, rolled out and rolled back on its
own; in this demo both serve the same tiny model trained on the knowledge base.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from airi_ray.graphs import END, START, BuildContext, Field, StateGraph, retrieve

SPEC = Path(__file__).with_suffix(".yaml")
DATA = Path(__file__).with_suffix("")  # deployments/support_assistant/
GRAPH = "support_assistant"
COLLECTION = "nimbus-kb"
EMBEDDER = "minilm"
ROUTES = {
    "orders": "orders-assistant",
    "returns": "orders-assistant",
    "account": "care-assistant",
    "product": "care-assistant",
}
HINTS = {  # what a rewritten query adds, by intent
    "orders": "order delivery shipping tracking parcel",
    "returns": "return refund exchange warranty damaged",
    "account": "account sign in payment membership card",
    "product": "gear care size store product",
}
MIN_RELEVANCE = 0.45  # best cosine similarity of a retrieved chunk
MIN_GROUNDING = 0.5  # similarity of the answer to the chunks it cites
MAX_RETRIEVALS = 3
HISTORY_TURNS = 6
ANSWER = {"max_tokens": 64, "temperature": 0.0}


def load_examples(name: str) -> list[dict[str, Any]]:
    """Lines of ``support_assistant/NAME.jsonl``."""
    lines = (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class IntentClassifier:
    """Logistic regression over sentence embeddings; travels pickled with the graph."""

    def __init__(self, vectors: list[list[float]], labels: list[str]) -> None:
        from sklearn.linear_model import LogisticRegression

        self._model = LogisticRegression(max_iter=2000, C=10.0).fit(np.asarray(vectors), labels)

    def predict(self, vector: list[float]) -> tuple[str, float]:
        """The intent and its probability."""
        p = self._model.predict_proba(np.asarray([vector]))[0]
        best = int(np.argmax(p))
        return str(self._model.classes_[best]), float(p[best])


def train_intents(ctx: BuildContext) -> IntentClassifier:
    examples = load_examples("intents_train")
    vectors = ctx.embed(EMBEDDER, [e["text"] for e in examples])
    return IntentClassifier(vectors, [e["intent"] for e in examples])


# -- nodes --------------------------------------------------------------------------------


async def memory(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
    conversation = view["conversation_id"]
    turns = await ctx.conversation(conversation, last=HISTORY_TURNS) if conversation else []
    return {"history": [{"role": t["role"], "content": t["content"]} for t in turns]}


def _query(view: dict[str, Any]) -> str:
    """The question, with the previous question when this one is a short follow-up."""
    question = view["question"]
    previous = [t["content"] for t in view["history"] if t["role"] == "user"]
    if previous and len(question.split()) < 10:
        return f"{previous[-1]} {question}"
    return question


def intent_node(classifier: IntentClassifier) -> Any:
    async def intent(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
        query = _query(view)
        [vector] = await ctx.embed(EMBEDDER, [query])
        name, confidence = classifier.predict(vector)
        return {"intent": name, "confidence": confidence, "query": query}

    return intent


async def answer(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The intent's specialised model answers from the retrieved sources, in a prompt that
    fits its context window: the sources always, then as much of the conversation as still
    fits, newest first (``ctx.fit``)."""
    model = ROUTES[view["intent"]]
    sources = "\n\n".join(f"[{h['id']}] {h['text']}" for h in view["hits"])
    turns = [*view["history"], {"role": "user", "content": view["question"]}]
    window = await ctx.fit(
        model,
        turns,
        system=f"Answer from these Nimbus Gear sources:\n{sources}",
        max_tokens=ANSWER["max_tokens"],
    )
    return {"model": model, "answer": await ctx.chat(model, list(window.messages), **ANSWER)}


async def check(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
    hits = view["hits"]
    relevance = max((h["score"] for h in hits), default=0.0)
    grounding = 0.0
    if hits and view["answer"].strip():
        vectors = np.asarray(
            await ctx.embed(EMBEDDER, [view["answer"], *[h["text"] for h in hits]])
        )
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        grounding = float(np.max(vectors[1:] @ vectors[0]))
        ctx.record_grounding(grounding)
    return {"relevance": relevance, "grounding": grounding, "retrievals": view["retrievals"] + 1}


def _again(view: dict[str, Any]) -> str:
    low = view["relevance"] < MIN_RELEVANCE or view["grounding"] < MIN_GROUNDING
    return "again" if low and view["retrievals"] < MAX_RETRIEVALS else "done"


def rewrite(view: dict[str, Any]) -> dict[str, Any]:
    """A broader query: the question with its intent's vocabulary (and, on the next
    attempt, the previous question of the conversation too)."""
    words = [view["question"], HINTS[view["intent"]]]
    previous = [t["content"] for t in view["history"] if t["role"] == "user"]
    if view["retrievals"] > 1 and previous:
        words.append(previous[-1])
    return {"query": " ".join(words)}


async def finish(view: dict[str, Any], ctx: Any) -> dict[str, Any]:
    citations = [h["id"] for h in view["hits"]]
    if view["conversation_id"]:
        question = await ctx.check_text(view["question"])  # stored as the filters redact it
        await ctx.append_turns(
            view["conversation_id"],
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": view["answer"]},
            ],
            request_id=ctx.run_id,  # a resumed run that runs this node again stores it once
        )
    return {"citations": citations, "sources": sorted({c.split("#")[0] for c in citations})}


def assistant_graph(classifier: IntentClassifier) -> Any:
    fields = {
        "question": Field(),
        "conversation_id": Field(default=""),
        "history": Field(default=[]),
        "intent": Field(),
        "confidence": Field(),
        "model": Field(),
        "query": Field(),
        "hits": Field(default=[]),
        "answer": Field(default=""),
        "relevance": Field(default=0.0),
        "grounding": Field(default=0.0),
        "retrievals": Field(default=0),
        "citations": Field(default=[]),
        "sources": Field(default=[]),
    }
    g = StateGraph(GRAPH, fields, inputs=["question", "conversation_id"])
    g.add_node("memory", memory, reads=["conversation_id"], writes=["history"])
    g.add_node(
        "intent",
        intent_node(classifier),
        reads=["question", "history"],
        writes=["intent", "confidence", "query"],
    )
    g.add_node(
        "retrieve",
        retrieve(COLLECTION, lambda v: v["query"], output="hits", k=3),
        reads=["query"],
        writes=["hits"],
    )
    g.add_node(
        "answer",
        answer,
        reads=["intent", "hits", "history", "question"],
        writes=["model", "answer"],
    )
    g.add_node(
        "check",
        check,
        reads=["hits", "answer", "retrievals"],
        writes=["relevance", "grounding", "retrievals"],
    )
    g.add_node(
        "rewrite", rewrite, reads=["question", "intent", "history", "retrievals"], writes=["query"]
    )
    g.add_node(
        "finish",
        finish,
        reads=["hits", "conversation_id", "question", "answer"],
        writes=["citations", "sources"],
    )
    g.add_edge(START, "memory").add_edge("memory", "intent").add_edge("intent", "retrieve")
    g.add_edge("retrieve", "answer").add_edge("answer", "check")
    g.add_conditional_edges(
        "check",
        _again,
        {"again": "rewrite", "done": "finish"},
        reads=["relevance", "grounding", "retrievals"],
        max_iterations=MAX_RETRIEVALS,
        exit="done",
    )
    g.add_edge("rewrite", "retrieve").add_edge("finish", END)
    return g.compile()


def build(ctx: BuildContext) -> Any:
    """The spec's graph builder (``graphs: [{builder: deployments.support_assistant:build}]``):
    the knowledge base ingested for every tenant, the intent classifier trained, the graph."""
    from airi_ray.demo.kb import kb_dir

    ctx.ingest(COLLECTION, EMBEDDER, kb_dir())
    return assistant_graph(train_intents(ctx))


# -- `ray job submit ... -- python -m deployments.support_assistant` ------------------------

CONVERSATION = [
    "How long do I have to return a pair of boots?",
    "And if I am a Nimbus Plus member?",
    "My card 4111 1111 1111 1111 was charged twice for order NG10935521, can you help?",
]


def main() -> int:
    """Deploy the spec on the cluster this runs in and hold a short scripted conversation."""
    import uuid

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    ensure_tiny_model()
    spec = airi.load_spec(SPEC)
    airi.deploy(spec)
    client = airi.connect("auto", api_key=spec.tenants[0].api_keys[0])
    conversation = f"job-{uuid.uuid4().hex[:8]}"
    for question in CONVERSATION:
        run = client.run_graph(GRAPH, {"question": question, "conversation_id": conversation})
        if run["status"] != "finished":
            print(f"run {run['run_id']} {run['status']}: {run['error']}", file=sys.stderr)
            return 1
        s = run["state"]
        print(f"Q: {question}")
        print(f"   intent {s['intent']} ({s['confidence']:.2f}), {s['retrievals']} retrieval(s)")
        print(f"A: {s['answer'].strip()}")
        print(f"   sources: {', '.join(s['sources'])}   (airi trace {run['run_id']})")
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
