"""What a graph node does when it is not a plain Python function: a model call or a
retrieval.

A ``ModelCall`` is data: which model, how to build its input from the node's view of the
state, which field receives the answer. The executor runs it through the same call path as
every other model call (scheduler, policy, filters), under the run's identity; a
``Retrieve`` embeds its query the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from airi_ray.core.graph import END, START, CompiledGraph

CallKind = Literal["chat", "complete", "embed"]


@dataclass(frozen=True)
class ModelCall:
    """A node that calls a model.

    Attributes:
        kind: ``chat`` (build returns messages), ``complete`` (a prompt string) or ``embed``
            (a list of texts; the output is their vectors).
        model: the deployed model's name.
        build: the node's view of the state -> the call's input.
        output: the state field that receives the answer text (or the vectors).
        params: generation parameters (``max_tokens``, ``temperature``...).
        usage: a state field that receives the call's token usage, or None.
    """

    kind: CallKind
    model: str
    build: Callable[[Mapping[str, Any]], Any]
    output: str
    params: Mapping[str, Any] = field(default_factory=dict)
    usage: str | None = None


@dataclass(frozen=True)
class Retrieve:
    """A node that retrieves from a collection: ``query(view)`` is embedded by the
    collection's model and the ``k`` best chunks of the run's tenant go to ``output`` as
    ``{"id", "doc_id", "text", "metadata", "score"}`` dicts (``id`` is the citation id)."""

    collection: str
    query: Callable[[Mapping[str, Any]], str]
    output: str
    k: int = 5
    filter: Mapping[str, Any] | None = None
    mmr_lambda: float | None = None


@dataclass(frozen=True)
class PolicyCheck:
    """A node that passes the text in ``field`` through the run's tenant's content filters
    (PII redaction, block lists, the injection heuristic, the semantic filter) and writes
    the redacted text to ``output`` (default: back to ``field``); a blocked text fails the
    run with the filter's 400/403. ``where``: ``prompt`` for user text, ``document`` for
    retrieved text. ``model``: check with the filters that apply to that model."""

    field: str
    output: str
    where: str = "prompt"
    model: str = "*"


@dataclass(frozen=True)
class Features:
    """A node that looks up online features: ``entities(view)`` gives entity ids, and
    ``output`` receives ``{entity id: {feature: value}}`` as of now."""

    view: str
    entities: Callable[[Mapping[str, Any]], list[Any]]
    output: str


def calls_ahead(graph: CompiledGraph) -> dict[str, int]:
    """For each node, the most model calls still to come after it on one path to the end
    (loops counted once): the share of a run's deadline a call may take is what is left
    divided by one plus this."""
    succ: dict[str, set[str]] = {n: set() for n in graph.nodes}
    for e in graph.edges:
        for s in e.sources:
            if s != START and e.target != END:
                succ[s].add(e.target)
    for b in graph.branches:
        succ[b.source].update(t for t in b.paths.values() if t != END)
    memo: dict[str, int] = {}

    def longest(node: str, path: frozenset[str]) -> int:
        if node in memo:
            return memo[node]
        best = 0
        for nxt in succ[node]:
            if nxt in path:  # a back edge: the loop is counted once
                continue
            here = 1 if isinstance(graph.nodes[nxt].action, ModelCall | Retrieve) else 0
            best = max(best, here + longest(nxt, path | {nxt}))
        memo[node] = best
        return best

    return {n: longest(n, frozenset({n})) for n in graph.nodes}
