"""``AiriChatModel`` on the session cluster: LangChain calls through airi's call path
(a run's budget across its calls, usage and metadata), and LangChain's own ``ChatOpenAI``
pointed at airi's HTTP API."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict
from uuid import uuid4

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph

from airi_ray.core.errors import AuthenticationError
from airi_ray.core.runs import RunBudgetExceeded
from airi_ray.langgraph import AiriChatModel
from tests.conftest import KEY, App


@pytest.fixture(scope="module")
def llm(airi_app: App) -> Any:
    model = AiriChatModel(model="tiny-chat", api_key=KEY, max_tokens=6)
    yield model
    model.close()


def test_invoke_and_stream_go_through_airi(llm: AiriChatModel) -> None:
    answer = llm.invoke([HumanMessage("How do I return boots?")], max_tokens=5)
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.usage_metadata["output_tokens"] == 5
    assert answer.usage_metadata["total_tokens"] == (
        answer.usage_metadata["input_tokens"] + answer.usage_metadata["output_tokens"]
    )
    assert answer.response_metadata["finish_reason"] == "length"

    chunks = list(llm.stream("Shipping to Canada?"))
    assert len(chunks) >= 2
    assert "".join(str(c.content) for c in chunks)


def test_async_calls_run_on_the_callers_loop(llm: AiriChatModel) -> None:
    async def calls() -> tuple[AIMessage, list[Any]]:
        answer = await llm.ainvoke("hello", max_tokens=3)
        return answer, [c async for c in llm.astream("hello again")]

    answer, pieces = asyncio.run(calls())
    assert answer.usage_metadata["output_tokens"] == 3
    assert pieces


def test_a_bad_key_is_refused_by_airi(airi_app: App) -> None:
    model = AiriChatModel(model="tiny-chat", api_key="sk-airi-ffffffffffff-notAKeyAtAll000000")
    try:
        with pytest.raises(AuthenticationError):
            model.invoke("hi")
    finally:
        model.close()


def test_a_langgraph_run_budget_bounds_its_calls_together(llm: AiriChatModel) -> None:
    class State(TypedDict):
        n: int

    def ask(state: State) -> State:
        llm.invoke("count", max_tokens=6)
        return {"n": state["n"] + 1}

    g = StateGraph(State)
    g.add_node("ask", ask)
    g.add_edge(START, "ask")
    g.add_conditional_edges("ask", lambda s: END if s["n"] >= 50 else "ask")
    graph = g.compile()
    config = {
        "configurable": {"thread_id": f"lg-{uuid4().hex}", "airi_token_budget": 60},
        "recursion_limit": 200,
    }
    with pytest.raises(RunBudgetExceeded):
        graph.invoke({"n": 0}, config)


def test_chat_openai_pointed_at_airi_works(airi_app: App) -> None:
    model = ChatOpenAI(
        model="tiny-chat",
        base_url=f"{airi_app.base_url}/v1",
        api_key=KEY,
        max_tokens=5,
        max_retries=0,
    )
    answer = model.invoke("How do I return boots?")
    assert answer.content and answer.usage_metadata["output_tokens"] == 5
    assert "".join(str(c.content) for c in model.stream("Shipping?"))
