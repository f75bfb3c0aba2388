"""``GraphExecutor``: runs graphs of model calls on Ray, checkpointing after every node.

The pure step function (``CompiledGraph.complete``) decides which nodes are ready and how
their writes merge; this actor only runs the ready nodes of each superstep concurrently,
model calls through the one call path (scheduler, policy, filters) under the run's
identity, Python nodes in a thread (or on the loop, if ``async def``).

Durability: a run's start (graph, inputs, options) is committed to the ``ContextStore``
before its first node runs. Each node's output is checkpointed as soon as the node
finishes, without holding up the next node (a commit costs more than a hop); the run's
result is returned only once every checkpoint is durable. ``resume(run_id)`` rebuilds the
state by replaying the checkpointed outputs through the pure step function and runs only
what is left: a node whose checkpoint had not committed when the executor died runs again
(at least once), a checkpointed one never does.

Single flight: at most one execution of a run at any time. Within this executor, every
caller that finds a run orphaned (``wait``, ``resume``, ``events``) shares one take-over,
registered before its first await. Across executors, a take-over claims the run in the
store first (``claim_run``, a fencing token) and every write carries the token: an
execution that lost its claim has its next write refused (``Fenced``) and stops at once,
without another model call or node. The time and tokens a run had spent come back with it
(``core.runs.progress``): each model call's tokens are recorded as it ends, and every
checkpoint says how long the run had been running.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import ray
from pydantic import BaseModel

from airi_ray.core.claims import FIRST_TOKEN
from airi_ray.core.context import Chunk, ChunkLike, ContextWindow
from airi_ray.core.errors import (
    AiriError,
    Fenced,
    InvalidRequest,
    NotFound,
    ReplicaUnavailable,
)
from airi_ray.core.graph import CompiledGraph, Node, RunError, RunState
from airi_ray.core.nodes import Features, ModelCall, PolicyCheck, Retrieve, calls_ahead
from airi_ray.core.policy import PermissionDenied, allows, filter_turns
from airi_ray.core.requests import (
    CallOptions,
    Usage,
    generation_params,
    parse_messages,
    structured_output,
)
from airi_ray.core.runs import (
    LIVE_STATUSES,
    RunLimits,
    RunOptions,
    charged_event,
    last_status,
    progress,
)
from airi_ray.obs.tracing import tracing
from airi_ray.runtime import cluster_kv
from airi_ray.runtime.background import spawn
from airi_ray.runtime.calls import Cached, CallPath, trace_sink, unwrap_error
from airi_ray.runtime.names import (
    CONTEXT_STORE_NAME,
    CONTROLLER_NAME,
    FEATURE_SERVER_NAME,
    OBSERVER_NAME,
    get_actor,
)
from airi_ray.runtime.retrieval import Retriever

logger = logging.getLogger(__name__)
MAX_EVENTS = 1000  # kept per run for late subscribers
FINISHED_RUNS_KEPT = 1000
ACL_TTL_S = 2.0
READ_RETRIES = 50  # reads of a restarting actor, 0.2 s apart


class NodeFailed(AiriError):
    status = 500
    type = "graph_error"
    code = "node_failed"


class RunCancelled(AiriError):
    status = 409
    type = "graph_error"
    code = "run_cancelled"


def _json_ready(value: Any) -> Any:
    """Node writes are checkpointed as JSON: numpy arrays and tuples become lists, pydantic
    objects (a ``response_format`` answer) their JSON dicts, so the state is the same
    before and after a resume."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


@dataclass
class RunContext:
    """What a Python node may use besides its view of the state: model calls under the
    run's identity (its tenant, priority, budget and deadline)."""

    run_id: str
    tenant: str
    graph: str
    _executor: GraphExecutor
    _run: _Run

    async def chat(self, model: str, messages: Any, **params: Any) -> Any:
        """The answer's text; with ``response_format=SomeModel`` (a pydantic model class)
        the answer is generated to its JSON schema and returned parsed into it."""
        call = ModelCall("chat", model, lambda _: messages, "-", params)
        return (await self._executor._model_call(self._run, call, {}, "-"))["-"]

    async def fit(
        self,
        model: str,
        turns: list[dict[str, str]],
        *,
        system: str = "",
        chunks: Sequence[ChunkLike | Mapping[str, Any]] = (),
        max_tokens: int | None = None,
    ) -> ContextWindow:
        """The prompt for ``model`` that fits its context window with ``max_tokens`` kept
        for the answer (``airi_ray.core.context.build_context``): the system prompt and the
        last user turn always (or ContextWindowExceeded), then ``chunks`` best first (a
        retrieve node's hits), then the newest earlier ``turns``. ``.messages`` is what to
        send, ``.cited_ids`` the chunks placed in it."""
        hits = [Chunk.of(c) for c in chunks]
        return await self._executor._path().fit(model, self.tenant, system, hits, turns, max_tokens)

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        call = ModelCall("embed", model, lambda _: texts, "-")
        return list((await self._executor._model_call(self._run, call, {}, "-"))["-"])

    async def check_text(self, text: str, where: str = "prompt") -> str:
        """``text`` as the tenant's input filters pass it (redacted), or ContentBlocked."""
        return await self._executor._path().check_text(self.tenant, text, where)

    async def conversation(self, conversation_id: str, last: int | None = None) -> list[Any]:
        """The last turns of one of the tenant's conversations (none if it is new)."""
        store = self._executor._store
        try:
            return list(await store.conversation.remote(self.tenant, conversation_id, last))
        except ray.exceptions.RayTaskError as e:
            if isinstance(unwrap_error(e), NotFound):
                return []
            raise unwrap_error(e) from None

    async def append_turns(
        self, conversation_id: str, turns: list[dict[str, Any]], request_id: str | None = None
    ) -> None:
        """Append turns to one of the tenant's conversations, durably, as the tenant's
        input filters pass them (whichever models they cover), like every stored turn.
        ``request_id``: a retry with the same id (a resumed run's node) appends nothing."""
        filters = await self._executor._path().input_filters(self.tenant, None)
        store = self._executor._store
        try:
            await store.append_turns.remote(
                self.tenant, conversation_id, filter_turns(filters, turns), request_id
            )
        except ray.exceptions.RayTaskError as e:
            raise unwrap_error(e) from None

    def record_grounding(self, score: float) -> None:
        """The grounding of the run's last answer (similarity to the sources it cites),
        credited to the model version that wrote it, in its quality signals."""
        if self._run.answered_by is not None:
            model, version = self._run.answered_by
            self._executor._path().signal("grounding", model, version, score)


@dataclass
class _Run:
    run_id: str
    tenant: str
    graph: str
    inputs: dict[str, Any]
    options: RunOptions
    limits: RunLimits
    state: RunState | None = None
    status: str = "running"  # running | finished | failed | cancelled
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=list)
    checkpoints: list[Any] = field(default_factory=list)  # refs of uncommitted writes
    event_seq: int = 0
    node_calls: int = 0
    timings: list[dict[str, Any]] = field(default_factory=list)  # for the observer
    answered_by: tuple[str, str] | None = None  # the last generative call's model, version
    token: int = FIRST_TOKEN  # this execution's fencing token (claim) on the run
    fenced: Fenced | None = None  # set once a write was refused: another execution owns it
    replayed: int = 0  # checkpoints it was rebuilt from (after a take-over)

    def result(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "graph": self.graph,
            "status": self.status,
            "state": dict(self.state.values) if self.state is not None else None,
            "error": self.error,
            "steps": self.state.step if self.state is not None else 0,
            "trail": [list(t) for t in self.state.trail] if self.state is not None else [],
            "usage": {"tokens": self.limits.spent, "calls": self.limits.calls}
            | {"per_model": dict(self.limits.per_model)},
        }


class GraphExecutor:
    """Runs registered graphs; a detached named actor that restarts."""

    def __init__(self) -> None:
        self._graphs: dict[str, CompiledGraph] = {}
        self._ahead: dict[str, dict[str, int]] = {}
        self._runs: dict[str, _Run] = {}
        # Take-overs of orphaned runs in progress, by (tenant, run id): one per run.
        self._adopting: dict[tuple[str, str], asyncio.Task[_Run | dict[str, Any]]] = {}
        self._owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._watching: set[asyncio.Task[None]] = set()  # watches of unawaited run writes
        self._calls: CallPath | None = None
        self._retriever: Retriever | None = None
        self._store = get_actor(CONTEXT_STORE_NAME)
        self._controller = get_actor(CONTROLLER_NAME)
        tracing.configure(tracing.enabled, sink=trace_sink)  # runs are traced before any call
        self._acl = Cached(self._controller.graph_acl.remote, ACL_TTL_S, "the graph ACLs")
        for key, blob in cluster_kv.saved_graphs():
            try:
                self._add(cloudpickle.loads(blob))
            except Exception:  # a graph whose code is gone: skip it, serve the rest
                logger.exception("could not reload graph %s", key)

    # -- registry --------------------------------------------------------------------------

    def register(self, blob: bytes) -> dict[str, Any]:
        """Register (or replace) a compiled graph sent pickled by a client."""
        graph = cloudpickle.loads(blob)
        if not isinstance(graph, CompiledGraph):
            raise InvalidRequest("register takes a compiled graph: call StateGraph.compile()")
        self._add(graph)
        cluster_kv.save_graph(graph.name, blob)
        return graph.describe()

    def _add(self, graph: CompiledGraph) -> None:
        self._graphs[graph.name] = graph
        self._ahead[graph.name] = calls_ahead(graph)

    def graphs(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self._graphs.values()]

    # -- runs ------------------------------------------------------------------------------

    async def start(
        self,
        tenant: str,
        graph: str,
        inputs: dict[str, Any],
        options: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Start a run of ``graph``; returns its id once the start is durable.

        Raises:
            NotFound: no such graph.
            PermissionDenied: the tenant may not run it.
            InvalidRequest: bad inputs or options.
        """
        g = await self._graph_for(tenant, graph)
        opts = RunOptions(**(options or {}))
        if not isinstance(inputs, dict):
            raise InvalidRequest("input must be an object of the graph's input fields")
        try:
            state = g.start(inputs)
        except RunError as e:
            raise InvalidRequest(f"graph {graph!r}: {e}") from None
        if run_id is not None and (run_id in self._runs or not isinstance(run_id, str)):
            raise InvalidRequest(f"run_id {run_id!r} is already used")
        run_id = run_id or f"run-{uuid.uuid4().hex}"
        run = _Run(run_id, tenant, graph, inputs, opts, RunLimits(opts, time.monotonic()), state)
        event = {"status": "started", "graph": graph, "inputs": inputs, "options": vars(opts)}
        started = self._store.run_event.remote(tenant, run_id, 0, event, run.token)
        run.event_seq = 1
        # The first nodes run while the start commits (the store keeps the order of the
        # writes, so checkpoints land after it); the caller hears of the run once it is durable.
        self._launch(run)
        try:
            await started
        except BaseException:
            assert run.task is not None
            run.task.cancel()
            raise
        return run_id

    async def resume(self, tenant: str, run_id: str) -> str:
        """Continue a run from its checkpoints (after the executor died); completed nodes are
        not run again. A run that is still going here is left alone, and concurrent
        resumes of one run share one take-over.

        Raises:
            NotFound: no such run for this tenant.
            InvalidRequest: the run has already ended.
        """
        live = self._get(tenant, run_id)
        if live is not None and live.status != "running":
            raise InvalidRequest(f"run {run_id!r} already {live.status}; nothing to resume")
        got = await self._adopt(tenant, run_id)
        if isinstance(got, dict):
            raise InvalidRequest(f"run {run_id!r} already {got['status']}; nothing to resume")
        return run_id

    async def wait(
        self, tenant: str, run_id: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The run's result once it ends (or as it stands after ``timeout_s``). A run left
        unfinished by an executor that died is resumed first (once, however many wait).

        Raises:
            NotFound: no such run for this tenant.
            Fenced: another executor took the run over while this one ran it.
        """
        got = await self._adopt(tenant, run_id)
        if isinstance(got, dict):
            return got
        run = got
        if run.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(run.task), timeout_s)
        if run.fenced is not None:
            raise run.fenced
        return run.result()

    async def events(self, tenant: str, run_id: str) -> AsyncIterator[dict[str, Any]]:
        """The run's node events so far, then live ones until it ends (a Ray streaming call).
        An orphaned run is resumed first; one that ended gives its end only."""
        got = await self._adopt(tenant, run_id)
        if isinstance(got, dict):
            yield {"run_id": run_id, "type": "run_" + str(got["status"]), "result": got}
            return
        run = got
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for e in run.events:
            queue.put_nowait(e)
        if run.status == "running":
            run.listeners.append(queue)
        else:
            queue.put_nowait(None)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if queue in run.listeners:
                run.listeners.remove(queue)

    async def _adopt(self, tenant: str, run_id: str) -> _Run | dict[str, Any]:
        """The run as this executor holds it; an orphaned one taken over first, in one
        take-over however many callers ask at once; or, for a run that has ended, its
        recorded end.

        Raises:
            NotFound: no such run for this tenant.
        """
        run = self._get(tenant, run_id)
        if run is not None:
            return run
        return await self._once(tenant, run_id, self._take_over)

    async def _once(
        self,
        tenant: str,
        run_id: str,
        how: Callable[[str, str], Awaitable[_Run | dict[str, Any]]],
    ) -> _Run | dict[str, Any]:
        """``how(tenant, run_id)`` (a take-over or an orphan's cancel), or the one already
        under way for the run, whichever it is: one at a time per run."""
        key = (tenant, run_id)
        task = self._adopting.get(key)
        if task is None:
            # Registered before any await, so a second caller finds it. Spawned on its
            # own: a caller that hangs up does not cancel the take-over the others await.
            task = spawn(how(tenant, run_id))
            self._adopting[key] = task

            def done(t: asyncio.Task[Any], key: tuple[str, str] = key) -> None:
                if self._adopting.get(key) is t:
                    del self._adopting[key]
                if not t.cancelled():
                    t.exception()  # each caller hears of a failure; none is left unread

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _take_over(self, tenant: str, run_id: str) -> _Run | dict[str, Any]:
        """Claim an orphaned run, rebuild its state from its record and run what is left."""
        got = await self._claim(tenant, run_id)
        if isinstance(got, dict):
            return got
        run = got
        resumed = {"status": "resumed", "replayed_nodes": run.replayed, "token": run.token}
        await self._store.run_event.remote(
            tenant, run_id, run.event_seq, resumed | {"elapsed_s": run.limits.elapsed_s}, run.token
        )
        run.event_seq += 1
        self._launch(run)
        return run

    async def _cancel_orphan(self, tenant: str, run_id: str) -> _Run | dict[str, Any]:
        """Claim an orphaned run and record its end as cancelled, as it stood at its last
        checkpoint (an earlier execution that is only stalled is fenced off by the
        claim); its recorded end if it had one."""
        got = await self._claim(tenant, run_id)
        if isinstance(got, dict):
            return got
        run = got
        run.status = "cancelled"
        run.error = RunCancelled(f"run {run_id!r} was cancelled").to_body()["error"]
        final = {"status": run.status, "result": run.result(), "elapsed_s": run.limits.elapsed_s}
        await self._store.run_event.remote(tenant, run_id, run.event_seq, final, run.token)
        return run.result()

    async def _claim(self, tenant: str, run_id: str) -> _Run | dict[str, Any]:
        """Claim an orphaned run and rebuild it from its record, not yet running (its
        ``event_seq`` the next free one); or its recorded end if it has one.

        Raises:
            NotFound: no such run for this tenant.
        """
        record = await self._store.run.remote(tenant, run_id)  # NotFound if none
        if (ended := _ended(run_id, record)) is not None:
            return ended
        started = record["events"][0]
        g = await self._graph_for(tenant, started["graph"])
        token = await self._store.claim_run.remote(tenant, run_id, self._owner)
        # Read again under the claim: every write the store took from an earlier
        # execution is in it now, and any later one is refused.
        record = await self._store.run.remote(tenant, run_id)
        if (ended := _ended(run_id, record)) is not None:
            return ended
        opts = RunOptions(**started["options"])
        state = g.start(started["inputs"])
        checkpoints = sorted(record["checkpoints"], key=lambda c: c["step"])
        for cp in checkpoints:
            state = g.complete(state, cp["node"], cp["output"])
        done = progress(record["events"], checkpoints)
        limits = RunLimits.resumed(opts, time.monotonic(), done)
        run = _Run(run_id, tenant, started["graph"], started["inputs"], opts, limits, state)
        run.token = token
        run.event_seq = int(record["next_event_seq"])
        run.replayed = len(checkpoints)
        return run

    async def cancel(self, tenant: str, run_id: str) -> dict[str, Any]:
        """Stop a run; its in-flight model calls are aborted. A run no executor holds
        (orphaned by a restart) is ended as cancelled without being resumed.

        Raises:
            NotFound: no such run for this tenant.
        """
        run = self._get(tenant, run_id)
        if run is None:
            got = await self._once(tenant, run_id, self._cancel_orphan)
            if isinstance(got, dict):
                return got
            run = got  # a take-over others asked for came first: stop it
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
        return run.result()

    def stats(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for r in self._runs.values():
            by_status[r.status] = by_status.get(r.status, 0) + 1
        return {"graphs": sorted(self._graphs), "runs": by_status, "pid": os.getpid()}

    # -- execution -------------------------------------------------------------------------

    def _get(self, tenant: str, run_id: str) -> _Run | None:
        run = self._runs.get(run_id)
        return run if run is not None and run.tenant == tenant else None

    async def _graph_for(self, tenant: str, name: str) -> CompiledGraph:
        g = self._graphs.get(name)
        if g is None:
            known = ", ".join(sorted(self._graphs)) or "none"
            raise NotFound(f"graph {name!r} is not registered; graphs: {known}")
        for fresh in (False, True):  # a refusal is checked against the latest spec
            if allows((await self._acl.get(fresh)).get(tenant) or [], name):
                return g
        raise PermissionDenied(f"tenant {tenant!r} may not run graph {name!r}")

    def _launch(self, run: _Run) -> None:
        self._runs[run.run_id] = run
        run.task = spawn(self._execute(run))
        finished = [r for r in self._runs.values() if r.status != "running"]
        for old in finished[: max(len(finished) - FINISHED_RUNS_KEPT, 0)]:
            del self._runs[old.run_id]

    def _emit(self, run: _Run, event: dict[str, Any]) -> None:
        event = {"run_id": run.run_id, "at": time.time()} | event
        if len(run.events) < MAX_EVENTS:
            run.events.append(event)
        for q in run.listeners:
            q.put_nowait(event)

    async def _execute(self, run: _Run) -> None:
        g = self._graphs[run.graph]
        assert run.state is not None
        start = time.perf_counter()
        attrs = {"airi.run_id": run.run_id, "airi.tenant": run.tenant, "airi.graph": run.graph}
        with tracing.span(f"run {run.graph}", "run", attrs) as span:
            try:
                while not run.state.done:
                    step = run.state.step
                    async with asyncio.TaskGroup() as tg:
                        for name in run.state.pending:
                            tg.create_task(self._run_node(run, g, g.nodes[name], step))
                run.status = "finished"
                # The end is recorded in the same group commit as the last checkpoints.
                self._record_end(run)
                await asyncio.gather(*run.checkpoints)
            except asyncio.CancelledError:
                run.status = "cancelled"
                run.error = RunCancelled(f"run {run.run_id!r} was cancelled").to_body()["error"]
            except BaseException as e:
                err = e.exceptions[0] if isinstance(e, BaseExceptionGroup) else e
                while isinstance(err, BaseExceptionGroup):
                    err = err.exceptions[0]
                err = unwrap_error(err)
                run.status = "failed"
                if isinstance(err, Fenced) and run.fenced is None:
                    run.fenced = err
                if not isinstance(err, AiriError):
                    logger.exception("run %s failed", run.run_id, exc_info=err)
                    err = NodeFailed(f"{type(err).__name__}: {err}")
                run.error = err.to_body()["error"]
            finally:
                if run.fenced is not None:
                    # Another execution owns the run now: record nothing (it would be
                    # refused), and let the next caller here find it in the store.
                    run.status = "failed"
                    run.error = run.fenced.to_body()["error"]
                    if self._runs.get(run.run_id) is run:
                        del self._runs[run.run_id]
                elif run.status != "finished":
                    self._record_end(run)
                if span is not None:
                    span.set_attributes(
                        {"airi.status": run.status, "airi.steps": run.state.step}
                        | {"airi.tokens": run.limits.spent, "airi.calls": run.limits.calls}
                    )
                    if run.error is not None:
                        span.set_attribute("airi.error", str(run.error.get("code")))
                self._send_timings(run, (time.perf_counter() - start) * 1000)
                self._emit(run, {"type": "run_" + run.status, "result": run.result()})
                for q in run.listeners:
                    q.put_nowait(None)
                run.listeners.clear()

    def _send_timings(self, run: _Run, ms: float) -> None:
        """Node and run timings to the observer (metrics; the run becomes a feedback target)."""
        model, version = run.answered_by or (None, None)
        end = {"graph": run.graph, "node": None, "ms": ms, "status": run.status}
        end |= {"run_id": run.run_id, "tenant": run.tenant, "model": model, "version": version}
        try:
            get_actor(OBSERVER_NAME).record_nodes.remote([*run.timings, end])
        except Exception as e:  # no observer (a cluster without a deployed app): metrics only
            logger.debug("run %s timings dropped: %s", run.run_id, e)

    def _record_end(self, run: _Run) -> None:
        """Send the run's end to the store. Not awaited: if it is lost, ``resume`` replays
        the checkpoints, finds nothing left to run and records the end then."""
        final = {"status": run.status, "result": run.result()}
        final["elapsed_s"] = run.limits.elapsed(time.monotonic())
        self._store.run_event.remote(run.tenant, run.run_id, run.event_seq, final, run.token)

    def _send(self, run: _Run, ref: Any) -> None:
        """Keep a write of the run that is not awaited here (the run awaits them all before
        it returns), and watch it: a refused write (``Fenced``) stops the run at once."""
        run.checkpoints.append(ref)
        watch = spawn(self._watch(run, ref))
        self._watching.add(watch)  # held: the loop keeps only weak references to tasks
        watch.add_done_callback(self._watching.discard)

    async def _watch(self, run: _Run, ref: Any) -> None:
        try:
            await ref
        except Exception as e:  # other failures reach the run when it awaits its writes
            err = unwrap_error(e)
            if isinstance(err, Fenced) and run.fenced is None:
                logger.warning("run %s: %s", run.run_id, err.message)
                run.fenced = err
                if run.task is not None and not run.task.done():
                    run.task.cancel()

    def _charge(self, run: _Run, node: str, model: str, tokens: int) -> None:
        """Count a call's tokens against the run and record them, so a resume counts the
        calls of a node interrupted before its checkpoint too."""
        run.limits.charge(model, tokens)
        event = charged_event(model, tokens, run.limits.elapsed(time.monotonic()), node)
        seq, run.event_seq = run.event_seq, run.event_seq + 1
        self._send(run, self._store.run_event.remote(run.tenant, run.run_id, seq, event, run.token))

    async def _run_node(self, run: _Run, g: CompiledGraph, node: Node, step: int) -> None:
        attrs = {"airi.node": node.name, "airi.step": step}
        start = time.perf_counter()
        status = "failed"
        try:
            with tracing.span(f"node {node.name}", "node", attrs):
                await self._node(run, g, node, step)
            status = "finished"
        finally:
            ms = (time.perf_counter() - start) * 1000
            run.timings.append({"graph": run.graph, "node": node.name, "ms": ms, "status": status})

    async def _node(self, run: _Run, g: CompiledGraph, node: Node, step: int) -> None:
        assert run.state is not None
        if run.fenced is not None:  # another execution owns the run: run nothing more
            raise run.fenced
        view = g.view(run.state, node.name)
        self._emit(run, {"type": "node_started", "node": node.name, "step": step})
        start = time.perf_counter()
        tokens_before = dict(run.limits.per_model)
        last: BaseException | None = None
        for attempt in range(1, node.retry.max_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(node.retry.delay_s(attempt))
            try:
                writes = await asyncio.wait_for(self._call(run, node, view), node.timeout_s)
                break
            except AiriError as e:
                if e.status < 500:  # refused by policy or bad input: retrying cannot help
                    raise
                last = e
            except (TimeoutError, Exception) as e:
                last = e
            logger.warning(
                "run %s node %s attempt %d failed: %s", run.run_id, node.name, attempt, last
            )
        else:
            what = "timed out" if isinstance(last, TimeoutError) else f"failed: {last}"
            raise NodeFailed(
                f"node {node.name!r} {what} (after {node.retry.max_attempts} attempt(s))"
            ) from last
        writes = _json_ready(dict(writes or {}))
        run.state = g.complete(run.state, node.name, writes)
        run.node_calls += 1
        usage = {
            m: t - tokens_before.get(m, 0)
            for m, t in run.limits.per_model.items()
            if t != tokens_before.get(m, 0)
        }
        ms = (time.perf_counter() - start) * 1000
        body = {"output": writes, "usage": usage, "ms": ms, "attempts": attempt}
        body["elapsed_s"] = run.limits.elapsed(time.monotonic())
        self._send(
            run,
            self._store.checkpoint.remote(run.tenant, run.run_id, step, node.name, body, run.token),
        )
        self._emit(
            run,
            {"type": "node_finished", "node": node.name, "step": step, "ms": ms}
            | {"writes": writes, "usage": usage},
        )

    async def _call(self, run: _Run, node: Node, view: dict[str, Any]) -> Mapping[str, Any]:
        action = node.action
        if isinstance(action, ModelCall):
            return await self._model_call(run, action, view, node.name)
        if isinstance(action, Retrieve):
            return await self._retrieve(run, action, view, node.name)
        if isinstance(action, PolicyCheck):
            text = view.get(action.field)
            clean = await self._path().check_text(run.tenant, text, action.where, action.model)
            return {action.output: clean}
        if isinstance(action, Features):
            entities = list(action.entities(view))
            for _ in range(READ_RETRIES):  # a lookup is safe to repeat while the server restarts
                try:
                    server = get_actor(FEATURE_SERVER_NAME)
                    found = await server.get.remote(run.tenant, action.view, entities)
                    return {action.output: found}
                except ray.exceptions.ActorUnavailableError:
                    await asyncio.sleep(0.2)
            raise ReplicaUnavailable("the feature server is restarting; retry shortly")
        ctx = RunContext(run.run_id, run.tenant, run.graph, self, run)
        args = (view, ctx) if len(inspect.signature(action).parameters) >= 2 else (view,)
        if inspect.iscoroutinefunction(action):
            result = await action(*args)
        else:
            result = await asyncio.to_thread(action, *args)
        if result is not None and not isinstance(result, Mapping):
            raise InvalidRequest(
                f"node {node.name!r} returned {type(result).__name__}; a node returns a dict "
                "of the fields it writes"
            )
        return result or {}

    async def _retrieve(
        self, run: _Run, call: Retrieve, view: dict[str, Any], node: str
    ) -> dict[str, Any]:
        options = self._call_options(run, node)
        if self._retriever is None:
            uri = await self._controller.storage_uri.remote()
            self._retriever = Retriever(self._path(), uri)
        hits = await self._retriever.retrieve(
            call.collection,
            call.query(view),
            run.tenant,
            call.k,
            call.filter,
            call.mmr_lambda,
            options,
            charge=lambda model, tokens: self._charge(run, node, model, tokens),
        )
        return {call.output: hits}

    def _call_options(self, run: _Run, node: str, session_id: str | None = None) -> CallOptions:
        """A call's options under the run's identity; raises if the run may not call more
        (budget spent, deadline passed)."""
        if run.fenced is not None:  # another execution owns the run: no more calls
            raise run.fenced
        now = time.monotonic()
        run.limits.check(now)
        ahead = self._ahead.get(run.graph, {}).get(node, 0)
        return CallOptions(
            priority=run.options.priority,
            deadline_s=run.limits.call_deadline_s(now, ahead),
            session_id=session_id,
        )

    def _path(self) -> CallPath:
        if self._calls is None:
            self._calls = CallPath()
        return self._calls

    async def _model_call(
        self, run: _Run, call: ModelCall, view: dict[str, Any], node: str
    ) -> dict[str, Any]:
        options = self._call_options(run, node, session_id=run.run_id)
        payload = call.build(view)
        path = self._path()
        if call.kind == "embed":
            texts = [payload] if isinstance(payload, str) else list(payload)
            vectors, usage = await path.embed(call.model, texts, run.tenant, options)
            self._charge(run, node, call.model, usage.prompt_tokens)
            return {call.output: vectors} | (
                {call.usage: {"prompt_tokens": usage.prompt_tokens}} if call.usage else {}
            )
        raw = dict(call.params)
        read: Callable[[str], Any] | None = None
        if raw.get("response_format") is not None:
            raw["structured_outputs"], read = structured_output(raw.pop("response_format"))
        params = generation_params(raw)
        wanted = call.params.get("max_tokens") or 1 << 30

        def cap(prompt_tokens: int) -> int:
            return run.limits.max_tokens(prompt_tokens, wanted)

        if call.kind == "chat":
            messages = (
                [{"role": "user", "content": payload}] if isinstance(payload, str) else payload
            )
            generation = await path.chat(
                call.model, parse_messages(messages), params, run.tenant, options, cap
            )
        else:
            generation = await path.complete(
                call.model, str(payload), params, run.tenant, options, cap
            )
        u = generation.usage
        stream = generation.__aiter__()
        try:
            text = "".join([t async for t, _, _ in stream])
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            self._charge(run, node, call.model, u.prompt_tokens + u.completion_tokens)
        if "version" in u.extra:
            run.answered_by = (call.model, u.extra["version"])
        out: dict[str, Any] = {call.output: text if read is None else _parsed(read, text, u)}
        if call.usage:
            out[call.usage] = {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "finish_reason": u.finish_reason,
            }
        return out


def _ended(run_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """A run's recorded end (its result), or None while the record says it may still run."""
    last = last_status(record["events"])
    if last["status"] in LIVE_STATUSES:
        return None
    return {"run_id": run_id, "status": last["status"]} | dict(last.get("result", {}))


def _parsed(read: Callable[[str], Any], text: str, usage: Usage) -> Any:
    """The answer read as its ``response_format`` asks; the engine kept it to the schema,
    so only an answer cut short (``max_tokens``) fails here."""
    try:
        return read(text)
    except ValueError as e:
        raise InvalidRequest(
            f"the answer does not parse as the response_format asks (finish reason "
            f"{usage.finish_reason!r}; raise max_tokens if it was cut short): {e}"
        ) from None
