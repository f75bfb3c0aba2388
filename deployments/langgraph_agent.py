"""A LangGraph agent on airi: the graph is LangGraph's; its model calls, retrieval and
checkpoints are airi's.

    airi up --config deployments/quickstart.yaml           # a chat model and an embedder
    python -m deployments.langgraph_agent --thread order-7 "Where is my parcel?"
    python -m deployments.langgraph_agent --thread order-7  # resumes order-7 if it stopped
    airi trace order-7                                      # its model calls, one trace

The graph, a LangGraph ``StateGraph`` over ``AgentState``:

1. ``intent``: ``AiriChatModel`` with structured output picks one of ``INTENTS`` (the
   engine keeps the answer to the schema);
2. ``retrieve``: airi's retrieval over ``COLLECTION`` (the tenant's copy of ``DOCS``,
   ingested on the first run), the query widened with the intent's words;
3. ``answer``: ``AiriChatModel`` answers from the retrieved passages, citing them.

Every model call takes airi's call path as the key's tenant (fair scheduling, ACLs, rate
limits, budgets, filters, traces), under the run's identity: the thread id is the run id
(``airi trace THREAD``), and the thread's token budget holds across a resume. The
checkpoints live in airi's context store (``AiriCheckpointSaver``), written with
``durability="sync"``: a node's checkpoint is committed before the next node starts. So a
process killed mid-run loses only the node it was in: run the same thread again and the
graph goes on from its last checkpoint, without running the nodes before it again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel

from airi_ray.langgraph import AiriChatModel, AiriCheckpointSaver

COLLECTION = "agent-kb"
INTENTS = ("orders", "returns", "account", "product")
HINTS = {  # what the retrieval query adds, by intent
    "orders": "order delivery shipping tracking parcel",
    "returns": "return refund exchange warranty",
    "account": "account sign in payment membership",
    "product": "gear care size product",
}
DOCS = [
    {
        "id": "shipping",
        "text": "Orders ship within two working days. Every parcel has a "
        "tracking link in the confirmation email; delivery takes three to five days.",
    },
    {
        "id": "returns",
        "text": "Unworn gear can be returned within 30 days for a full refund. "
        "Start a return from the order page; the refund reaches the card in five days.",
    },
    {
        "id": "warranty",
        "text": "Boots and jackets carry a two-year warranty against "
        "manufacturing faults. Send a photo of the fault to claim an exchange.",
    },
    {
        "id": "account",
        "text": "Reset a forgotten password from the sign-in page. Members "
        "see saved cards and their order history under Account, Payments.",
    },
    {
        "id": "care",
        "text": "Wash waxed jackets by hand in cold water and re-wax them each "
        "season. Leather boots need a conditioner every few months.",
    },
    {
        "id": "sizes",
        "text": "Our boots run half a size large: order half a size down. The "
        "size guide on each product page lists foot lengths in centimetres.",
    },
]


class Intent(BaseModel):
    """The intent of a customer's question."""

    intent: Literal["orders", "returns", "account", "product"]


class AgentState(TypedDict, total=False):
    question: str
    intent: str
    passages: list[dict[str, Any]]
    answer: str


class Journal:
    """One JSON line per node event (``start``/``done``, with this process's pid) appended
    to a file: what ran where, for an operator or a test. Off without a path."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def __call__(self, node: str, event: str, thread: str) -> None:
        if self.path is None:
            return
        line = {"node": node, "event": event, "pid": os.getpid(), "thread": thread}
        with self.path.open("a") as f:  # one short append: whole lines, in order
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def build_graph(
    llm: AiriChatModel,
    retrieve: Any,
    saver: AiriCheckpointSaver,
    journal: Journal,
    answer_tokens: int,
) -> Any:
    """The compiled agent: ``retrieve(query, k)`` is airi's retrieval (an async callable)."""
    pick = llm.with_structured_output(Intent)

    async def intent(state: AgentState, config: RunnableConfig) -> AgentState:
        thread = config["configurable"]["thread_id"]
        journal("intent", "start", thread)
        prompt = (
            f"Classify the customer's question as one of {', '.join(INTENTS)}.\n"
            f"Question: {state['question']}"
        )
        found: Intent = await pick.ainvoke(prompt, max_tokens=24)
        journal("intent", "done", thread)
        return {"intent": found.intent}

    async def find(state: AgentState, config: RunnableConfig) -> AgentState:
        thread = config["configurable"]["thread_id"]
        journal("retrieve", "start", thread)
        query = f"{state['question']} {HINTS[state['intent']]}"
        hits = await retrieve(query, 3)
        journal("retrieve", "done", thread)
        return {"passages": [{"id": h["doc_id"], "text": h["text"]} for h in hits]}

    async def answer(state: AgentState, config: RunnableConfig) -> AgentState:
        thread = config["configurable"]["thread_id"]
        journal("answer", "start", thread)
        sources = "\n".join(f"[{p['id']}] {p['text']}" for p in state["passages"])
        messages = [
            ("system", "Answer from the sources only and cite them by their [id]."),
            ("user", f"Sources:\n{sources}\n\nQuestion: {state['question']}"),
        ]
        # min_tokens: the tiny demo model would often stop at once; a real model needs none.
        pieces = [
            str(c.content)
            async for c in llm.astream(messages, max_tokens=answer_tokens, min_tokens=answer_tokens)
        ]
        journal("answer", "done", thread)
        return {"answer": "".join(pieces)}

    builder = StateGraph(AgentState)
    builder.add_node("intent", intent)
    builder.add_node("retrieve", find)
    builder.add_node("answer", answer)
    builder.add_edge(START, "intent")
    builder.add_edge("intent", "retrieve")
    builder.add_edge("retrieve", "answer")
    builder.add_edge("answer", END)
    return builder.compile(checkpointer=saver)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the thread with the question, or go on with it from its last checkpoint."""
    from airi_ray.app import init_ray
    from airi_ray.client import AsyncClient

    init_ray(args.address)
    client = AsyncClient(api_key=args.api_key)
    tenant = await client.tenant_for(client.api_key)
    if COLLECTION not in await client.collections():
        await client.create_collection(COLLECTION, args.embedder)
    if not await client.retrieve(COLLECTION, "order", k=1):  # this tenant's copy is empty
        await client.ingest(COLLECTION, DOCS)

    async def retrieve(query: str, k: int) -> list[dict[str, Any]]:
        return await client.retrieve(COLLECTION, query, k=k)

    llm = AiriChatModel(model=args.model, api_key=client.api_key, temperature=0)
    saver = AiriCheckpointSaver.on_cluster(tenant)
    graph = build_graph(llm, retrieve, saver, Journal(args.journal), args.answer_tokens)
    config = {"configurable": {"thread_id": args.thread, "airi_token_budget": args.token_budget}}
    try:
        state = await graph.aget_state(config)
        if args.question:
            inputs: AgentState | None = {"question": args.question}
        elif state.next:  # stopped mid-run: go on from the last checkpoint
            inputs = None
        else:
            raise SystemExit(f"thread {args.thread!r} has no run to go on with: ask a question")
        started = time.perf_counter()
        out = await graph.ainvoke(inputs, config, durability="sync")
        return {
            "thread": args.thread,
            "resumed": inputs is None,
            "intent": out["intent"],
            "sources": [p["id"] for p in out["passages"]],
            "answer": out["answer"],
            "seconds": round(time.perf_counter() - started, 2),
        }
    finally:
        saver.close()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", help="omit to go on with a stopped thread")
    parser.add_argument("--thread", default="agent-demo", help="the LangGraph thread id")
    parser.add_argument("--model", default="tiny-chat", help="the chat model's name")
    parser.add_argument("--embedder", default="minilm", help="the collection's embedder")
    parser.add_argument("--api-key", default=None, help="default: AIRI_API_KEY")
    parser.add_argument("--address", default="auto", help="the Ray cluster")
    parser.add_argument("--token-budget", type=int, default=4_000, help="the run's tokens")
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--journal", default=None, help="append node events to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
