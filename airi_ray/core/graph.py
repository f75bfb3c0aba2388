"""Agent graphs: a builder, ``compile()``, and one pure step function shared by executors.

A graph is a multi-model workflow (intent, a conditional choice of model, retrieval, a
refinement loop, an answer) over one shared, typed state. It is written like LangGraph's
``StateGraph``: declare the state's fields, add nodes and edges, then ``compile()``, which
refuses unknown nodes, unreachable nodes, unbounded loops and reads nobody can satisfy, and
returns an immutable ``CompiledGraph``.

A run advances in supersteps (Pregel / bulk-synchronous parallel):

    state = graph.start(inputs)                   # plans step 0: the targets of START
    for node in state.pending:                    # in any order, in parallel or not
        writes = call(graph.nodes[node], graph.view(state, node))
        state = graph.complete(state, node, writes)   # the last one merges and plans

All nodes of a step see the state as it was when the step began. When the last of them
completes, their writes are merged in node-name order with each field's reducer, and the
next step is planned from the nodes that just ran: plain edges, joins (a target waiting for
several sources) and branches (a router choosing a path on the merged state). A loop runs
through a branch whose ``max_iterations`` bounds how often its back edge is taken; past
the bound the branch takes its ``exit`` path instead.

``RunState`` is plain data, so a checkpoint taken between two ``complete`` calls resumes
the run exactly. The Ray executor and ``run_local`` (in-process, for tests) both drive this
same ``start``/``view``/``complete`` cycle; node actions are opaque here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "END",
    "REDUCERS",
    "START",
    "Branch",
    "CompiledGraph",
    "Edge",
    "Field",
    "GraphError",
    "Node",
    "RetryPolicy",
    "RunError",
    "RunState",
    "StateGraph",
    "add",
    "append",
    "merge",
    "replace",
    "run_local",
]

START = "__start__"
END = "__end__"


class GraphError(ValueError):
    """The graph as built cannot run; the message names the node, edge or field."""


class RunError(ValueError):
    """A run was driven wrongly: bad inputs, undeclared or conflicting writes, a bad route."""


# -- reducers ----------------------------------------------------------------------------
# A reducer merges one node's write into a field. None as ``old`` is the field's empty
# value, so a field without a default starts empty. Reducers return new objects: an old
# RunState must stay valid after a step merges.


def replace(old: Any, new: Any) -> Any:
    """The write replaces the value (one writer per superstep)."""
    return new


def append(old: Any, new: Any) -> list[Any]:
    """List concatenation: a list write extends the value, any other write is appended."""
    base = [] if old is None else list(old)
    return base + new if isinstance(new, list) else [*base, new]


def add(old: Any, new: Any) -> Any:
    """Numeric sum, from 0."""
    return (0 if old is None else old) + new


def merge(old: Any, new: Any) -> dict[Any, Any]:
    """Shallow dict update, from {}."""
    return {**({} if old is None else old), **new}


REDUCERS: dict[str, Callable[[Any, Any], Any]] = {
    "replace": replace,
    "append": append,
    "add": add,
    "merge": merge,
}


# -- the graph's parts -------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One field of the shared state.

    Attributes:
        reducer: merges a write into the value (``replace``, ``append``, ``add``, ``merge``
            or any ``(old, new) -> value`` function).
        default: the value when not given as an input; deep-copied per run, so a list or
            dict default is never shared between runs. None means "no default".
    """

    reducer: Callable[[Any, Any], Any] = replace
    default: Any = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often an executor re-runs a failing node, and how long it waits in between.

    Attributes:
        max_attempts: attempts in all, at least 1 (1 means no retry).
        backoff_s: the wait before the second attempt; it doubles for each later one.
        max_backoff_s: the cap on any single wait.

    Raises:
        GraphError: a value is out of range.
    """

    max_attempts: int = 1
    backoff_s: float = 0.0
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise GraphError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise GraphError(
                f"backoff_s and max_backoff_s must not be negative, got {self.backoff_s} "
                f"and {self.max_backoff_s}"
            )

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (numbered from 1; the first has no wait)."""
        if attempt <= 1:
            return 0.0
        return float(min(self.backoff_s * 2 ** (attempt - 2), self.max_backoff_s))


@dataclass(frozen=True)
class Node:
    """One step of the workflow.

    ``action`` is opaque to the core: a callable ``(view) -> writes`` for ``run_local``,
    or whatever spec object an executor knows how to run (e.g. a model call).
    """

    name: str
    action: Any
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = None


@dataclass(frozen=True)
class Edge:
    """Plain edge ``sources[0] -> target``, or a join when there are several sources."""

    sources: tuple[str, ...]
    target: str

    @property
    def is_join(self) -> bool:
        return len(self.sources) > 1


@dataclass(frozen=True)
class Branch:
    """Conditional edge: after ``source`` runs, ``router`` picks one of ``paths``.

    Attributes:
        router: gets the fields in ``reads`` of the merged state, returns a key of ``paths``.
        paths: key -> target node name, or END.
        max_iterations: how often a path looping back to ``source`` may be taken in a run;
            required when some path closes a cycle.
        exit: the key taken instead once the bound is reached; it must leave the loop.
    """

    source: str
    router: Callable[[Mapping[str, Any]], str]
    paths: Mapping[str, str]
    reads: tuple[str, ...] = ()
    max_iterations: int | None = None
    exit: str | None = None


# -- run state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    """Where a run is: the merged state and the progress of the current superstep.

    Everything but the field values (and completed writes) is JSON-able, so ``to_dict`` is
    a checkpoint whenever the values are. Never mutated: ``complete`` returns a new one.

    Attributes:
        values: the shared state, merged up to the end of the last superstep.
        step: the current superstep, 0 for the first.
        pending: nodes of the current superstep not completed yet (sorted).
        completed: node -> its writes, for nodes of the current superstep already done.
        visits: node -> how many times it has completed in this run.
        iterations: branch source -> how many times its back edge was taken.
        joins: join target -> its sources completed since the join last fired.
        trail: ``(step, source, taken)`` per node that had outgoing edges, in merge order:
            ``"->"`` for plain edges and joins, the path key for a branch, or
            ``"exit:<key>"`` when the loop bound forced the branch's exit.
        done: nothing is pending: the run has finished.
    """

    values: Mapping[str, Any]
    step: int
    pending: tuple[str, ...]
    completed: Mapping[str, Mapping[str, Any]]
    visits: Mapping[str, int]
    iterations: Mapping[str, int]
    joins: Mapping[str, tuple[str, ...]]
    trail: tuple[tuple[int, str, str], ...]
    done: bool

    @property
    def ready(self) -> tuple[str, ...]:
        """The nodes that may run now (the same as ``pending``)."""
        return self.pending

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (values and writes kept as given), for checkpoints."""
        return {
            "values": dict(self.values),
            "step": self.step,
            "pending": list(self.pending),
            "completed": {n: dict(w) for n, w in self.completed.items()},
            "visits": dict(self.visits),
            "iterations": dict(self.iterations),
            "joins": {t: list(s) for t, s in self.joins.items()},
            "trail": [list(t) for t in self.trail],
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunState:
        """The inverse of ``to_dict`` (also after a JSON round trip).

        Raises:
            RunError: ``d`` lacks a key or has a value of the wrong shape.
        """
        try:
            return cls(
                values=dict(d["values"]),
                step=int(d["step"]),
                pending=tuple(str(n) for n in d["pending"]),
                completed={str(n): dict(w) for n, w in d["completed"].items()},
                visits={str(n): int(v) for n, v in d["visits"].items()},
                iterations={str(n): int(v) for n, v in d["iterations"].items()},
                joins={str(t): tuple(str(s) for s in ss) for t, ss in d["joins"].items()},
                trail=tuple((int(s), str(src), str(k)) for s, src, k in d["trail"]),
                done=bool(d["done"]),
            )
        except KeyError as e:
            raise RunError(f"checkpoint has no {e.args[0]!r}: not a RunState.to_dict()") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise RunError(f"checkpoint is not a RunState.to_dict(): {e}") from e


# -- the builder -------------------------------------------------------------------------


class StateGraph:
    """Mutable builder of a graph; every check happens in ``compile()``.

    Args:
        name: the graph's name (for status and logs).
        fields: the shared state's fields by name.
        inputs: the fields a run is started with; each is required unless its Field has a
            default.
    """

    def __init__(
        self, name: str, fields: Mapping[str, Field], *, inputs: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.fields = dict(fields)
        self.inputs = tuple(inputs)
        self._nodes: list[Node] = []
        self._edges: list[Edge] = []
        self._branches: list[Branch] = []

    def add_node(
        self,
        name: str,
        action: Any,
        *,
        reads: Sequence[str] = (),
        writes: Sequence[str] = (),
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
    ) -> StateGraph:
        """Add a node that sees the fields in ``reads`` and may write those in ``writes``."""
        self._nodes.append(
            Node(name, action, tuple(reads), tuple(writes), retry or RetryPolicy(), timeout_s)
        )
        return self

    def add_edge(self, source: str | Sequence[str], target: str) -> StateGraph:
        """Run ``target`` after ``source``; after all of them when ``source`` is a list (join).

        ``source`` may be START and ``target`` END. Several edges from one source fan out:
        their targets run in parallel in the next superstep.
        """
        sources = (source,) if isinstance(source, str) else tuple(dict.fromkeys(source))
        self._edges.append(Edge(sources, target))
        return self

    def add_conditional_edges(
        self,
        source: str,
        router: Callable[[Mapping[str, Any]], str],
        paths: Mapping[str, str],
        *,
        reads: Sequence[str] = (),
        max_iterations: int | None = None,
        exit: str | None = None,
    ) -> StateGraph:
        """After ``source``, run ``paths[router(view)]``, the view holding the fields in ``reads``.

        A path whose target leads back to ``source`` is a loop: it needs ``max_iterations``
        (times it may be taken per run) and ``exit`` (the key taken once the bound is hit).
        """
        self._branches.append(
            Branch(source, router, dict(paths), tuple(reads), max_iterations, exit)
        )
        return self

    def compile(self) -> CompiledGraph:
        """Check the graph and freeze it.

        Raises:
            GraphError: naming the offending node, edge, branch or field: unknown or
                duplicate names, no edge from START, unreachable nodes, loops without a
                bound, reads nobody satisfies, writes or inputs of undeclared fields.
        """
        _check_fields(self.fields, self.inputs)
        nodes = _check_nodes(self._nodes, self.fields)
        _check_edges(self._edges, nodes)
        _check_branches(self._branches, nodes, self.fields)
        if not any(START in e.sources for e in self._edges):
            raise GraphError(f"graph {self.name!r} has no edge from START: add_edge(START, ...)")
        _check_reads(nodes, self._branches, self.fields, self.inputs)
        _check_reachable(nodes, self._edges, self._branches)
        _check_plain_cycles(self._edges)
        back = _back_paths(self._edges, self._branches)
        _check_loops(self._branches, back)
        return CompiledGraph(
            name=self.name,
            fields=dict(self.fields),
            inputs=self.inputs,
            nodes=nodes,
            edges=tuple(self._edges),
            branches=tuple(self._branches),
            back_paths=back,
        )


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


def _check_fields(fields: Mapping[str, Field], inputs: Sequence[str]) -> None:
    for name, f in fields.items():
        if not isinstance(f, Field):
            raise GraphError(f"field {name!r} must be a Field, got {type(f).__name__}")
    for name in inputs:
        if name not in fields:
            raise GraphError(f"input {name!r} is not a declared field (fields: {_names(fields)})")


def _check_nodes(nodes: Sequence[Node], fields: Mapping[str, Field]) -> dict[str, Node]:
    by_name: dict[str, Node] = {}
    for node in nodes:
        if node.name in (START, END):
            raise GraphError(f"{node.name!r} is reserved for the graph's entry and exit")
        if not node.name or not isinstance(node.name, str):
            raise GraphError(f"a node name must be a non-empty string, got {node.name!r}")
        if node.name in by_name:
            raise GraphError(f"node {node.name!r} is added twice")
        for kind, names in (("reads", node.reads), ("writes", node.writes)):
            for f in names:
                if f not in fields:
                    raise GraphError(
                        f"node {node.name!r} {kind} {f!r}, which is not a declared field "
                        f"(fields: {_names(fields)})"
                    )
        if node.timeout_s is not None and node.timeout_s <= 0:
            raise GraphError(
                f"node {node.name!r} timeout_s must be positive or None, got {node.timeout_s}"
            )
        by_name[node.name] = node
    return by_name


def _check_edges(edges: Sequence[Edge], nodes: Mapping[str, Node]) -> None:
    join_targets: set[str] = set()
    for e in edges:
        shown = f"edge {_names(e.sources)} -> {e.target!r}"
        if not e.sources:
            raise GraphError(f"edge into {e.target!r} has no source")
        for s in e.sources:
            if s == END:
                raise GraphError(f"{shown} starts at END; nothing runs after END")
            if s == START and e.is_join:
                raise GraphError(f"{shown} joins on START; START can only be a plain source")
            if s != START and s not in nodes:
                raise GraphError(f"{shown} names unknown node {s!r} (nodes: {_names(nodes)})")
        if e.target == START:
            raise GraphError(f"{shown} goes into START; nothing can lead back to START")
        if e.target != END and e.target not in nodes:
            raise GraphError(
                f"{shown} names unknown node {e.target!r} (nodes: {_names(nodes)}, or END)"
            )
        if e.is_join:
            if e.target in join_targets:
                raise GraphError(f"node {e.target!r} is the target of two joins; merge them")
            join_targets.add(e.target)


def _check_branches(
    branches: Sequence[Branch], nodes: Mapping[str, Node], fields: Mapping[str, Field]
) -> None:
    sources: set[str] = set()
    for b in branches:
        if b.source not in nodes:
            raise GraphError(
                f"conditional edges from {b.source!r}: unknown node (nodes: {_names(nodes)}); "
                "START and END cannot branch"
            )
        if b.source in sources:
            raise GraphError(
                f"node {b.source!r} has conditional edges twice; put all its paths in one call"
            )
        sources.add(b.source)
        if not b.paths:
            raise GraphError(f"branch from {b.source!r} has no paths")
        for key, target in b.paths.items():
            if target != END and target not in nodes:
                raise GraphError(
                    f"branch from {b.source!r} path {key!r} goes to unknown node {target!r} "
                    f"(nodes: {_names(nodes)}, or END)"
                )
        for f in b.reads:
            if f not in fields:
                raise GraphError(
                    f"branch from {b.source!r} reads {f!r}, which is not a declared field "
                    f"(fields: {_names(fields)})"
                )
        if b.max_iterations is not None and b.max_iterations < 1:
            raise GraphError(
                f"branch from {b.source!r}: max_iterations must be at least 1, "
                f"got {b.max_iterations}"
            )
        if b.exit is not None and b.exit not in b.paths:
            raise GraphError(
                f"branch from {b.source!r}: exit {b.exit!r} is not a key of its paths "
                f"(keys: {_names(b.paths)})"
            )


def _check_reads(
    nodes: Mapping[str, Node],
    branches: Sequence[Branch],
    fields: Mapping[str, Field],
    inputs: Sequence[str],
) -> None:
    written = {f for n in nodes.values() for f in n.writes}
    readers = [(f"node {n.name!r}", n.reads) for n in nodes.values()]
    readers += [(f"branch from {b.source!r}", b.reads) for b in branches]
    for who, reads in readers:
        for f in reads:
            if f not in written and f not in inputs and fields[f].default is None:
                raise GraphError(
                    f"{who} reads {f!r}, which no node writes and is not an input "
                    "(nor has a default)"
                )


def _check_reachable(
    nodes: Mapping[str, Node], edges: Sequence[Edge], branches: Sequence[Branch]
) -> None:
    # A join target is reachable only once all its sources are: otherwise it never runs.
    reached = {START}
    grew = True
    while grew:
        before = len(reached)
        for e in edges:
            if all(s in reached for s in e.sources):
                reached.add(e.target)
        for b in branches:
            if b.source in reached:
                reached.update(b.paths.values())
        grew = len(reached) > before
    for name in nodes:
        if name not in reached:
            raise GraphError(f"node {name!r} is not reachable from START: add an edge into it")


def _check_plain_cycles(edges: Sequence[Edge]) -> None:
    succ: dict[str, list[str]] = {}
    for e in edges:
        for s in e.sources:
            succ.setdefault(s, []).append(e.target)
    # Depth-first search with the current path on a stack: a grey successor is a cycle.
    state: dict[str, int] = {}  # 1 on the path, 2 finished
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for t in succ.get(n, ()):
            if state.get(t) == 1:
                cycle = [*path[path.index(t) :], t]
                raise GraphError(
                    f"cycle {' -> '.join(repr(c) for c in cycle)} is made only of plain edges, "
                    "so it never ends: close it with add_conditional_edges(..., "
                    "max_iterations=..., exit=...)"
                )
            if t not in state:
                visit(t)
        path.pop()
        state[n] = 2

    for n in list(succ):
        if n not in state:
            visit(n)


def _back_paths(edges: Sequence[Edge], branches: Sequence[Branch]) -> dict[str, frozenset[str]]:
    """Per branch source, the path keys whose target can reach the source again."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        for s in e.sources:
            succ.setdefault(s, set()).add(e.target)
    for b in branches:
        succ.setdefault(b.source, set()).update(b.paths.values())

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            n = todo.pop()
            if n == goal:
                return True
            for t in succ.get(n, ()):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return False

    return {
        b.source: frozenset(k for k, t in b.paths.items() if t != END and reaches(t, b.source))
        for b in branches
    }


def _check_loops(branches: Sequence[Branch], back: Mapping[str, frozenset[str]]) -> None:
    for b in branches:
        for key in sorted(back[b.source]):
            loop = f"loop through {b.source!r} -> {b.paths[key]!r}"
            if b.max_iterations is None:
                raise GraphError(
                    f"{loop} has no bound: pass max_iterations and exit to add_conditional_edges"
                )
            if b.exit is None:
                raise GraphError(
                    f"{loop} has max_iterations but no exit: pass exit, the key of a path "
                    "that leaves the loop"
                )
        if b.exit is not None and b.exit in back[b.source]:
            raise GraphError(
                f"branch from {b.source!r}: exit {b.exit!r} goes to {b.paths[b.exit]!r}, which "
                f"loops back to {b.source!r}; the exit must leave the loop"
            )


# -- the compiled graph ------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledGraph:
    """An immutable, checked graph and the pure transitions of a run over it.

    Build one with ``StateGraph.compile()``. ``back_paths`` holds, per branch source, the
    path keys that loop back to it (those counted against ``max_iterations``).
    """

    name: str
    fields: Mapping[str, Field]
    inputs: tuple[str, ...]
    nodes: Mapping[str, Node]
    edges: tuple[Edge, ...]
    branches: tuple[Branch, ...]
    back_paths: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Indexes for planning, derived from the edges and branches.
    _plain: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _joins: Mapping[str, tuple[Edge, ...]] = field(init=False, repr=False, compare=False)
    _branch: Mapping[str, Branch] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain: dict[str, list[str]] = {}
        joins: dict[str, list[Edge]] = {}
        for e in self.edges:
            if e.is_join:
                for s in e.sources:
                    joins.setdefault(s, []).append(e)
            else:
                plain.setdefault(e.sources[0], []).append(e.target)
        object.__setattr__(self, "_plain", {s: tuple(t) for s, t in plain.items()})
        object.__setattr__(self, "_joins", {s: tuple(j) for s, j in joins.items()})
        object.__setattr__(self, "_branch", {b.source: b for b in self.branches})

    def start(self, inputs: Mapping[str, Any]) -> RunState:
        """The state of a new run, with step 0 (the targets of START) pending.

        Fields not given start at a deep copy of their default.

        Raises:
            RunError: an input is not one of ``inputs``, or a required input is missing.
        """
        for name in inputs:
            if name not in self.inputs:
                raise RunError(
                    f"graph {self.name!r} has no input {name!r} (inputs: {_names(self.inputs)})"
                )
        missing = [n for n in self.inputs if n not in inputs and self.fields[n].default is None]
        if missing:
            raise RunError(
                f"graph {self.name!r} is missing required input(s) {_names(missing)} "
                f"(inputs: {_names(self.inputs)})"
            )
        values = {
            n: inputs[n] if n in inputs else copy.deepcopy(f.default)
            for n, f in self.fields.items()
        }
        pending = sorted(set(self._plain.get(START, ())) - {END})
        return RunState(
            values=values,
            step=0,
            pending=tuple(pending),
            completed={},
            visits=dict.fromkeys(self.nodes, 0),
            iterations={s: 0 for s, keys in self.back_paths.items() if keys},
            joins={},
            trail=(),
            done=not pending,
        )

    def view(self, state: RunState, node: str) -> dict[str, Any]:
        """Deep copies of the fields ``node`` reads, so it cannot change the state.

        Raises:
            RunError: ``node`` is not a node of this graph.
        """
        return _view(state.values, self._node(node).reads)

    def complete(self, state: RunState, node: str, writes: Mapping[str, Any]) -> RunState:
        """Record that ``node`` finished with ``writes``; merge and plan if it was the last.

        Returns a new state; ``state`` is left as it was.

        Raises:
            RunError: ``node`` is not pending; ``writes`` is not a mapping, names a field
                the node did not declare, or writes a replace field another node of this
                step already wrote; after the last node, a router returns an unknown key.
        """
        n = self._node(node)
        if node not in state.pending:
            raise RunError(
                f"node {node!r} is not pending in step {state.step} "
                f"(pending: {_names(state.pending)})"
            )
        if not isinstance(writes, Mapping):
            raise RunError(
                f"node {node!r} returned {type(writes).__name__}; a node returns a mapping "
                f"of field -> value among its writes ({_names(n.writes)})"
            )
        for f in writes:
            if f not in n.writes:
                raise RunError(
                    f"node {node!r} wrote {f!r}, which it does not declare "
                    f"(writes: {_names(n.writes)})"
                )
            if self.fields[f].reducer is replace:
                # Caught when the second writer completes, naming both: with two writes
                # to a replace field the result would depend on the merge order.
                for other, theirs in state.completed.items():
                    if f in theirs:
                        raise RunError(
                            f"nodes {other!r} and {node!r} both wrote {f!r} in step "
                            f"{state.step}; a replace field takes one write per superstep: "
                            "give it a reducer (append, add, merge) or write it from one node"
                        )
        done = RunState(
            values=state.values,
            step=state.step,
            pending=tuple(p for p in state.pending if p != node),
            completed={**state.completed, node: dict(writes)},
            visits={**state.visits, node: state.visits.get(node, 0) + 1},
            iterations=state.iterations,
            joins=state.joins,
            trail=state.trail,
            done=False,
        )
        return self._next_step(done) if not done.pending else done

    def describe(self) -> dict[str, Any]:
        """The graph as JSON-able data, for ``airi status`` and docs."""
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "fields": {
                n: {"reducer": _reducer_name(f.reducer), "default": repr(f.default)}
                for n, f in self.fields.items()
            },
            "nodes": [
                {
                    "name": n.name,
                    "action": _action_name(n.action),
                    "reads": list(n.reads),
                    "writes": list(n.writes),
                    "retry": {
                        "max_attempts": n.retry.max_attempts,
                        "backoff_s": n.retry.backoff_s,
                        "max_backoff_s": n.retry.max_backoff_s,
                    },
                    "timeout_s": n.timeout_s,
                }
                for n in self.nodes.values()
            ],
            "edges": [{"sources": list(e.sources), "target": e.target} for e in self.edges],
            "branches": [
                {
                    "source": b.source,
                    "paths": dict(b.paths),
                    "reads": list(b.reads),
                    "max_iterations": b.max_iterations,
                    "exit": b.exit,
                    "loops": sorted(self.back_paths.get(b.source, ())),
                }
                for b in self.branches
            ],
        }

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise RunError(
                f"graph {self.name!r} has no node {name!r} (nodes: {_names(self.nodes)})"
            )
        return node

    def _next_step(self, state: RunState) -> RunState:
        """Merge the finished superstep's writes and plan the next one from its nodes."""
        ran = sorted(state.completed)
        values = dict(state.values)
        for name in ran:
            for f, v in state.completed[name].items():
                values[f] = self.fields[f].reducer(values[f], v)
        targets: set[str] = set()
        joins = dict(state.joins)
        iterations = dict(state.iterations)
        trail = list(state.trail)
        for name in ran:
            if name in self._plain or name in self._joins:
                trail.append((state.step, name, "->"))
            targets.update(self._plain.get(name, ()))
            for join in self._joins.get(name, ()):
                got = tuple(sorted({*joins.get(join.target, ()), name}))
                if len(got) == len(join.sources):
                    targets.add(join.target)
                    joins.pop(join.target, None)
                else:
                    joins[join.target] = got
            branch = self._branch.get(name)
            if branch is not None:
                key, taken = self._route(branch, values, iterations)
                trail.append((state.step, name, taken))
                targets.add(branch.paths[key])
        pending = tuple(sorted(targets - {END}))
        return RunState(
            values=values,
            step=state.step + 1,
            pending=pending,
            completed={},
            visits=state.visits,
            iterations=iterations,
            joins=joins,
            trail=tuple(trail),
            done=not pending,
        )

    def _route(
        self, branch: Branch, values: Mapping[str, Any], iterations: dict[str, int]
    ) -> tuple[str, str]:
        """The path key to take and its trail entry; counts loop iterations in place."""
        key = branch.router(_view(values, branch.reads))
        if not isinstance(key, str) or key not in branch.paths:
            raise RunError(
                f"router of the branch from {branch.source!r} returned {key!r}; "
                f"allowed keys: {_names(branch.paths)}"
            )
        if key not in self.back_paths.get(branch.source, ()):
            return key, key
        taken = iterations.get(branch.source, 0)
        # compile() guarantees a bound and an exit on every branch with a looping path.
        assert branch.max_iterations is not None and branch.exit is not None
        if taken >= branch.max_iterations:
            return branch.exit, f"exit:{branch.exit}"
        iterations[branch.source] = taken + 1
        return key, key


def _view(values: Mapping[str, Any], reads: Iterable[str]) -> dict[str, Any]:
    return {f: copy.deepcopy(values[f]) for f in reads}


def _reducer_name(reducer: Callable[[Any, Any], Any]) -> str:
    for name, r in REDUCERS.items():
        if r is reducer:
            return name
    return str(getattr(reducer, "__qualname__", type(reducer).__name__))


def _action_name(action: Any) -> str:
    if callable(action) and hasattr(action, "__qualname__"):
        return str(action.__qualname__)
    return type(action).__name__


# -- the in-process executor -------------------------------------------------------------


def _call_action(node: Node, view: dict[str, Any]) -> Mapping[str, Any]:
    if not callable(node.action):
        raise RunError(
            f"node {node.name!r} has a {type(node.action).__name__} action, which is not "
            "callable; pass call= to run_local to run it"
        )
    result: Mapping[str, Any] = node.action(view)
    return result


def run_local(
    graph: CompiledGraph,
    inputs: Mapping[str, Any],
    call: Callable[[Node, dict[str, Any]], Mapping[str, Any]] | None = None,
    *,
    max_steps: int = 1000,
) -> RunState:
    """Run a graph in this process, the nodes of each superstep one after the other.

    Args:
        call: runs one node on its view and returns its writes; the default calls
            ``node.action(view)``. A raising call is retried up to
            ``node.retry.max_attempts`` times, with a fresh view and without waiting;
            ``timeout_s`` is not enforced here.
        max_steps: supersteps allowed before giving up.

    Raises:
        RunError: bad inputs or writes (see ``start`` and ``complete``), or the run did
            not finish within ``max_steps`` supersteps.
        Exception: whatever the last attempt of a failing node raised.
    """
    run = call or _call_action
    state = graph.start(inputs)
    while not state.done:
        if state.step >= max_steps:
            raise RunError(
                f"graph {graph.name!r} did not finish within max_steps={max_steps} supersteps "
                f"(pending: {_names(state.pending)})"
            )
        for name in state.pending:
            node = graph.nodes[name]
            for attempt in range(1, node.retry.max_attempts + 1):
                try:
                    writes = run(node, graph.view(state, name))
                    break
                except Exception:
                    if attempt == node.retry.max_attempts:
                        raise
            state = graph.complete(state, name, writes)
    return state
