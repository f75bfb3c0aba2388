"""The HTTP API's OpenAPI document: every route with its request body, query parameters,
error shape and bearer-key security, so standard API tools (clients, gateways, fuzzers)
can drive the server from ``/openapi.json``.

Routes read their bodies themselves (size-limited, validated against a pydantic model,
errors in OpenAI's shape), so FastAPI cannot see them: each route declares its body with
``json_body(Model)`` and its query parameters with ``query(...)``, and ``document()``
adds the models' JSON schemas to the document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"
_bodies: dict[str, type[BaseModel]] = {}  # every model a route declared, by name

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    _bodies[model.__name__] = model
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
            },
        }
    }


def query(*params: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    """``openapi_extra`` for a route's query parameters: ``(name, schema, required)``; an
    array schema is sent as the parameter repeated (``?id=a&id=b``)."""
    return {
        "parameters": [
            {"name": name, "in": "query", "required": required, "schema": schema}
            | ({"style": "form", "explode": True} if schema.get("type") == "array" else {})
            for name, schema, required in params
        ]
    }


def header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """``openapi_extra`` for an optional request header of a route."""
    return {
        "parameters": [
            {
                "name": name,
                "in": "header",
                "required": False,
                "schema": schema,
                "description": description,
            }
        ]
    }


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the declared bodies, the error responses and the
    bearer-key security added."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=(
            "OpenAI-compatible model calls, agent graphs, features and observability of an "
            "airi-ray app. Authenticate with `Authorization: Bearer <api key>`."
        ),
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, model in sorted(_bodies.items()):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    schemas["Error"] = ERROR_SCHEMA
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
    for path, operations in doc["paths"].items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # bodies are validated by the route: errors are 400s
            responses.setdefault("4XX", {"description": "The request was refused"} | error)
            responses.setdefault("5XX", {"description": "The runtime could not serve it"} | error)
            if path not in ("/healthz", "/metrics"):
                op["security"] = [{"bearer": []}]
    return doc
