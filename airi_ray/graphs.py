"""Writing graphs: the builder, node helpers for model calls, and graphs from an app spec.

    from airi_ray.graphs import END, START, Field, StateGraph, append, chat

    g = StateGraph("qa", {"question": Field(), "answer": Field()}, inputs=["question"])
    g.add_node("answer", chat("tiny-chat", lambda s: s["question"], output="answer"),
               reads=["question"], writes=["answer"])
    g.add_edge(START, "answer").add_edge("answer", END)
    client.register_graph(g.compile())
    client.run_graph("qa", {"question": "hi"})

Plain Python nodes take the node's view of the state (and, with a second parameter, a
``RunContext`` whose ``chat``/``embed`` run under the run's identity) and return the fields
they write. A graph in a YAML spec names its Python functions as ``module:function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from airi_ray.config import ANONYMOUS_TENANT, SYSTEM_TENANT, GraphSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.graph import (
    END,
    REDUCERS,
    START,
    CompiledGraph,
    Field,
    GraphError,
    RetryPolicy,
    StateGraph,
    add,
    append,
    merge,
    replace,
)
from airi_ray.core.nodes import Features, ModelCall, PolicyCheck, Retrieve

__all__ = [
    "BuildContext",
    "END",
    "START",
    "CompiledGraph",
    "Field",
    "GraphError",
    "RetryPolicy",
    "StateGraph",
    "add",
    "append",
    "build_graph",
    "chat",
    "check",
    "complete",
    "embed",
    "features",
    "merge",
    "replace",
    "retrieve",
]

Build = Callable[[Mapping[str, Any]], Any]


def chat(
    model: str, messages: Build, *, output: str, usage: str | None = None, **params: Any
) -> ModelCall:
    """A node that chats with ``model``: ``messages(view)`` gives a prompt string or a list
    of ``{"role", "content"}``; the answer text goes to ``output``. With
    ``response_format=SomeModel`` (a pydantic model class, or OpenAI's ``json_object`` /
    ``json_schema`` dicts) the answer is generated to that JSON schema and ``output``
    receives it parsed and validated (a model's JSON dict, as the state is stored)."""
    return ModelCall("chat", model, messages, output, params, usage)


def complete(
    model: str, prompt: Build, *, output: str, usage: str | None = None, **params: Any
) -> ModelCall:
    """A node that completes ``prompt(view)`` with ``model``."""
    return ModelCall("complete", model, prompt, output, params, usage)


def embed(model: str, texts: Build, *, output: str) -> ModelCall:
    """A node that embeds ``texts(view)`` (a string or a list) with ``model``."""
    return ModelCall("embed", model, texts, output)


def retrieve(
    collection: str,
    query: Build,
    *,
    output: str,
    k: int = 5,
    filter: Mapping[str, Any] | None = None,
    mmr_lambda: float | None = None,
) -> Retrieve:
    """A node that retrieves the ``k`` chunks closest to ``query(view)`` from
    ``collection`` (the run's tenant's documents only) into ``output``."""
    return Retrieve(collection, query, output, k, filter, mmr_lambda)


def check(
    field: str, *, output: str | None = None, where: str = "prompt", model: str = "*"
) -> PolicyCheck:
    """A node that runs the tenant's content filters on ``field`` (reads it, writes
    ``output`` or ``field`` back redacted; a block fails the run)."""
    if where not in ("prompt", "document"):
        raise InvalidRequest(f"where must be 'prompt' or 'document', got {where!r}")
    return PolicyCheck(field, output or field, where, model)


def features(view: str, entities: Build, *, output: str) -> Features:
    """A node that looks up the online features of ``entities(view)`` in a feature view,
    as the run's tenant: its own events, or a view's it shares (else the run fails, 403)."""
    return Features(view, entities, output)


def _function(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InvalidRequest(f"cannot import {ref!r}: {e}") from None
    if not callable(fn):
        raise InvalidRequest(f"{ref!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _template(template: str) -> Build:
    def build(view: Mapping[str, Any]) -> str:
        try:
            return template.format(**view)
        except (KeyError, IndexError) as e:
            raise InvalidRequest(
                f"prompt template {template!r} names {e}, not in the node's reads"
            ) from None

    return build


def _endpoint(name: str) -> str:
    return {"start": START, "end": END}.get(name, name)


class BuildContext:
    """What a graph ``builder`` of an app spec may use at deploy time, once the app's models
    are ready: embeddings and ingestion as the runtime itself (the system tenant)."""

    def __init__(self, spec: Any, thread: Any) -> None:
        # ``thread`` is a ``runtime.backend.BackendThread``, made by the app layer: modules
        # that only declare graphs import this one, and stay free of Ray and LanceDB.
        self.spec = spec  # the AppSpec being deployed
        self._thread = thread

    def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Vectors of ``texts`` from the deployed embedding ``model``."""
        backend = self._thread.backend
        vectors, _ = self._thread.run(backend.embed(model, texts, SYSTEM_TENANT))
        return list(vectors)

    def ingest(self, collection: str, model: str, folder: Any) -> dict[str, int]:
        """Create ``collection`` (embedded by ``model``) if needed and ingest every
        ``.md``/``.txt`` file under ``folder`` as the documents of each of the app's
        tenants (a document replaces its earlier chunks: deploying again is harmless)."""
        backend, run = self._thread.backend, self._thread.run
        if collection not in run(backend.collections()):
            run(backend.create_collection(collection, model, SYSTEM_TENANT))
        total = {"documents": 0, "chunks": 0}
        for tenant in [t.name for t in self.spec.tenants] or [ANONYMOUS_TENANT]:
            done = run(backend.ingest(collection, tenant, folder=str(folder)))
            total = {k: total[k] + done[k] for k in total}
        return total

    def close(self) -> None:
        self._thread.close()


def run_builder(spec: GraphSpec, app: Any, thread: Any) -> CompiledGraph:
    """Call a graph spec's ``builder`` with a ``BuildContext`` of the app on ``thread``
    (a ``BackendThread``, closed afterwards).

    Raises:
        InvalidRequest: the builder cannot be imported or returns no compiled graph.
    """
    assert spec.builder is not None
    ctx = BuildContext(app, thread)
    try:
        graph = _function(spec.builder)(ctx)
    finally:
        ctx.close()
    if not isinstance(graph, CompiledGraph):
        raise InvalidRequest(
            f"graph {spec.name!r}: builder {spec.builder} returned {type(graph).__name__}, "
            "not a compiled graph (StateGraph(...).compile())"
        )
    if graph.name != spec.name:
        raise InvalidRequest(
            f"graph {spec.name!r}: builder {spec.builder} built a graph named {graph.name!r}"
        )
    return graph


def build_graph(spec: GraphSpec) -> CompiledGraph:
    """Compile a graph declared in an app spec.

    Raises:
        InvalidRequest: a function cannot be imported, or the graph does not compile
            (the message names the node or edge).
    """
    fields = {
        name: Field(reducer=REDUCERS[f.reducer], default=f.default)
        for name, f in spec.state.items()
    }
    g = StateGraph(spec.name, fields, inputs=spec.inputs)
    try:
        for n in spec.nodes:
            retry = RetryPolicy(max_attempts=n.max_attempts)
            if n.function is not None:
                action: Any = _function(n.function)
                writes = n.writes
            else:
                assert n.model is not None and n.prompt is not None and n.output is not None
                action = ModelCall(n.call, n.model, _template(n.prompt), n.output, n.params)
                writes = [n.output]
            g.add_node(
                n.name, action, reads=n.reads, writes=writes, retry=retry, timeout_s=n.timeout_s
            )
        for e in spec.edges:
            sources = [
                _endpoint(s) for s in ([e.source] if isinstance(e.source, str) else e.source)
            ]
            if e.to is not None:
                g.add_edge(sources if len(sources) > 1 else sources[0], _endpoint(e.to))
            else:
                assert e.router is not None
                if len(sources) != 1:
                    raise InvalidRequest("a conditional edge leaves exactly one node")
                g.add_conditional_edges(
                    sources[0],
                    _function(e.router),
                    {k: _endpoint(v) for k, v in e.paths.items()},
                    reads=e.reads,
                    max_iterations=e.max_iterations,
                    exit=e.exit,
                )
        return g.compile()
    except GraphError as e:
        raise InvalidRequest(f"graph {spec.name!r}: {e}") from None
