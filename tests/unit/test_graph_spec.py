"""Graphs declared in an app spec (YAML): built from `module:function` references."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from airi_ray.config import parse_spec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.graph import run_local
from airi_ray.core.nodes import ModelCall
from airi_ray.graphs import build_graph

HERE = __name__


def classify(view: dict[str, Any]) -> dict[str, Any]:
    return {"intent": "refund" if "refund" in view["question"] else "other"}


def route(view: dict[str, Any]) -> str:
    return view["intent"]


SPEC = f"""
name: demo
graphs:
  - name: triage
    inputs: [question]
    state:
      question: {{}}
      intent: {{}}
      answer: {{}}
      notes: {{reducer: append, default: []}}
    nodes:
      - name: classify
        function: {HERE}:classify
        reads: [question]
        writes: [intent]
      - name: refund
        model: tiny-chat
        prompt: "Refund help: {{question}}"
        reads: [question]
        output: answer
        params: {{max_tokens: 16}}
      - name: other
        function: {HERE}:classify
        reads: [question]
        writes: [intent]
    edges:
      - {{from: start, to: classify}}
      - from: classify
        router: {HERE}:route
        reads: [intent]
        paths: {{refund: refund, other: other}}
      - {{from: refund, to: end}}
      - {{from: other, to: end}}
"""


def test_a_yaml_graph_builds_and_runs() -> None:
    spec = parse_spec(yaml.safe_load(SPEC))
    graph = build_graph(spec.graphs[0])
    refund = graph.nodes["refund"].action
    assert isinstance(refund, ModelCall) and refund.model == "tiny-chat"
    assert refund.build({"question": "my tent"}) == "Refund help: my tent"

    def call(node: Any, view: dict[str, Any]) -> dict[str, Any]:
        if isinstance(node.action, ModelCall):  # the model call itself is the executor's job
            return {node.action.output: "sure"}
        return dict(node.action(view))

    state = run_local(graph, {"question": "I want a refund"}, call)
    assert state.values["answer"] == "sure"
    state = run_local(graph, {"question": "hello"}, call)
    assert state.values["answer"] is None and state.values["intent"] == "other"
    # The spec round-trips (the controller stores and re-reads it).
    assert parse_spec(spec.model_dump()).graphs[0] == spec.graphs[0]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"function": "no.such.module:f"}, "cannot import 'no.such.module:f'"),
        ({"function": f"{HERE}:missing"}, "cannot import"),
        ({"reads": ["nope"]}, "nope"),
    ],
)
def test_bad_yaml_graphs_name_the_problem(patch: dict[str, Any], message: str) -> None:
    data = yaml.safe_load(SPEC)
    data["graphs"][0]["nodes"][0].update(patch)
    with pytest.raises(InvalidRequest, match=message):
        build_graph(parse_spec(data).graphs[0])


def test_a_node_needs_one_kind() -> None:
    data = yaml.safe_load(SPEC)
    data["graphs"][0]["nodes"][0]["model"] = "tiny-chat"
    with pytest.raises(InvalidRequest, match="exactly one of `function` or `model`"):
        parse_spec(data)
