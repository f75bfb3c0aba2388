"""The HTTP API's OpenAPI document: every body-taking route declares its body, every
reference resolves, and every route but the probes asks for the bearer key."""

from __future__ import annotations

import json
from typing import Any

from airi_ray.serve.ingress import app


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_post_route_declares_its_json_body() -> None:
    doc = app.openapi()
    posts = {p: ops["post"] for p, ops in doc["paths"].items() if "post" in ops}
    assert set(posts) >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    for path, op in posts.items():
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[1]
        assert doc["components"]["schemas"][name]["type"] == "object", path
    chat = doc["components"]["schemas"]["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"])


def test_every_reference_resolves_and_the_document_is_json() -> None:
    doc = json.loads(json.dumps(app.openapi()))
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref


def test_routes_ask_for_the_bearer_key_and_say_how_errors_look() -> None:
    doc = app.openapi()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert ("security" in op) == (path not in ("/healthz", "/metrics")), path
            assert "422" not in op["responses"], path  # bad bodies are OpenAI-style 400s
            assert op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
    features = doc["paths"]["/v1/features/{view}"]["get"]["parameters"]
    assert {p["name"]: p["required"] for p in features if p["in"] == "query"} == {
        "entity_id": True,
        "as_of": False,
    }
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert [(p["name"], p["in"]) for p in chat["parameters"]] == [("Idempotency-Key", "header")]
    assert "requestBody" in chat
