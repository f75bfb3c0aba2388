"""The calls of a running app for a tenant the caller names: the backend of every front door.

The HTTP ingress (a tenant per request, from its bearer key), the Python client (its API
key's tenant) and graph builders at deploy time (the system tenant) all call through a
``Backend``. It never decides whose call it is: callers authenticate (``tenant_for``) and
pass the tenant to every tenant-scoped call. So it sits below all of them, and none of
them imports another.
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from airi_ray.config import ANONYMOUS_TENANT
from airi_ray.core.context import retried
from airi_ray.core.errors import (
    AuthenticationError,
    InvalidRequest,
    NotFound,
    ReplicaUnavailable,
)
from airi_ray.core.graph import CompiledGraph
from airi_ray.core.policy import KeyRecord, KeyRing, filter_turns
from airi_ray.core.requests import (
    CallOptions,
    ChatMessage,
    GenerationParams,
    Usage,
    generation_params,
    parse_messages,
)
from airi_ray.core.runs import RunProgress, charged_event, progress
from airi_ray.runtime.calls import Cached, CallPath, Generation, ModelInfo, unwrap_error
from airi_ray.runtime.names import (
    CONTEXT_STORE_NAME,
    CONTROLLER_NAME,
    FEATURE_SERVER_NAME,
    GRAPH_EXECUTOR_NAME,
    OBSERVER_NAME,
    SCHEDULER_NAME,
    get_actor,
)
from airi_ray.runtime.retrieval import Retriever

KEYS_TTL_S = 2.0
# A key ring older than this is not used (503): revoked keys must not keep working while
# the controller is unreachable. Long enough to ride out a controller restart.
KEYS_MAX_AGE_S = 120.0
RESUME_ATTEMPTS = 5
RESUME_BACKOFF_S = 0.2


@dataclass(frozen=True)
class Completion:
    """A finished generation: its text, why it stopped, and token usage."""

    text: str
    finish_reason: str | None
    usage: Usage
    request_id: str
    model: str


OPTION_NAMES = ("priority", "deadline_s", "session_id")


def _options(kwargs: dict[str, Any]) -> CallOptions:
    """Take the scheduling options (priority, deadline_s, session_id) out of ``kwargs``."""
    return CallOptions(**{k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs})


class Backend:
    """Model, graph, retrieval, feature, conversation and observability calls, each for the
    tenant it is given; bind to one event loop (create it inside that loop).

    Calls that concern the app rather than a tenant (graph and collection listings,
    alerts, quality signals) take none: whoever serves them to a caller authenticates the
    caller first.
    """

    def __init__(self) -> None:
        self._path = CallPath()
        self._controller = get_actor(CONTROLLER_NAME)
        self._scheduler = get_actor(SCHEDULER_NAME)
        # Key records (salted hashes) refreshed every few seconds: a revoked key stops
        # working within KEYS_TTL_S everywhere, with no call to the controller per request.
        self._auth = Cached(
            self._fetch_auth, KEYS_TTL_S, "the API key ring", max_age_s=KEYS_MAX_AGE_S
        )
        self._retriever: Retriever | None = None

    @property
    def controller(self) -> Any:
        """The controller actor (the app's status and rollouts, for the blocking client)."""
        return self._controller

    async def _fetch_auth(self) -> tuple[str, KeyRing]:
        config = await self._controller.auth_config.remote()
        return config["mode"], KeyRing(KeyRecord.from_dict(r) for r in config["records"])

    async def tenant_for(self, api_key: str | None) -> str:
        """The tenant a key authenticates as.

        Raises:
            AuthenticationError: no key (when the app requires keys) or an unknown key.
        """
        mode, keys = await self._auth.get()
        if api_key is None or api_key == "":
            if mode == "none":
                return ANONYMOUS_TENANT
            raise AuthenticationError(
                "missing API key: send `Authorization: Bearer <key>` (Python: api_key=...)"
            )
        return keys.tenant_for(api_key, time.time())

    async def warm(self) -> None:
        """Fetch model infos and load tokenizers ahead of the first call."""
        await self._path.warm()

    async def close(self) -> None:
        """Close this backend's streams (its queued requests are dropped, leases returned)."""
        await self._path.close()

    async def metrics_text(self) -> bytes:
        """The runtime's metrics in Prometheus text (what ``/metrics`` serves besides the
        ingress's own): the scheduler's, then the observer's and the controller's."""
        runtime: bytes = await self._scheduler.metrics_text.remote()
        try:
            observer: bytes = await get_actor(OBSERVER_NAME).metrics_text.remote()
        except Exception:  # restarting: its metrics are back at the next scrape
            observer = b""
        try:
            controller: bytes = await self._controller.metrics_text.remote()
        except Exception:  # restarting, as above
            controller = b""
        return runtime + observer + controller

    async def models(self, tenant: str | None) -> list[dict[str, Any]]:
        """The served models ``tenant`` may call; None: every served model."""
        infos = await self._path.visible_models(tenant, refresh=True)
        return [vars(m) | {"tokenizer": None} for m in infos]

    async def model_info(self, model: str, task: str, tenant: str) -> ModelInfo:
        """What callers know of a served model the tenant may call (tokenizer included).

        Raises:
            ModelNotFound: no such model for this tenant, or not of this task.
        """
        return await self._path.model(model, task, tenant)

    async def chat_generation(
        self,
        model: str,
        messages: Any,
        tenant: str,
        conversation_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
        cap: Callable[[int], int] | None = None,
        **params: Any,
    ) -> Generation:
        """Start a chat generation; iterate the result for ``(text, n_tokens, finish)``.

        With ``conversation_id``, the conversation's earlier turns (those that fit the
        model's window, newest first) go before ``messages``, and once the answer is
        complete the new messages and the answer are appended to the conversation, as
        the tenant's input filters passed them to the model. ``idempotency_key`` names the
        request: a retry with the same key appends nothing more; once the first attempt's
        answer is stored, the retry gets that answer without running the model again
        (unless it asks for logprobs, which are not stored: then the model answers again
        and the stored exchange stays the first one's). ``tools`` (OpenAI function tools)
        are shown to the model by its chat template. ``cap`` maps the prompt's length to
        the most output tokens allowed (a run's token budget, as ``CallPath.chat``).

        Raises:
            InvalidRequest: a bad ``idempotency_key`` (1 to 256 characters).
            Conflict: the key was used for other messages in this conversation.
        """
        if idempotency_key is not None:
            idempotency_key = check_idempotency_key(idempotency_key)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        options = _options(params)
        gen_params = generation_params(params)
        parsed = parse_messages(messages)
        if conversation_id is None:
            return await self._path.chat(
                model, parsed, gen_params, tenant, options, cap, tools=tools
            )
        new_turns = [{"role": m.role, "content": m.content} for m in parsed if m.role != "system"]
        try:
            history = await self.conversation(conversation_id, tenant)
        except NotFound:
            history = []
        if idempotency_key is not None and any(
            t.get("request_id") == idempotency_key for t in history
        ):
            # A retry: its first attempt's turns stay out of the window, and a stored
            # answer is the retry's answer (logprobs are not stored: those ask again).
            asked = filter_turns(await self._path.input_filters(tenant, model), new_turns)
            retry = retried(history, idempotency_key, asked)
            history = retry.history
            if retry.answer is not None and not gen_params.extra.get("logprobs"):
                return await self._replay(model, tenant, retry.answer)
        window = await self._window(model, history, parsed, gen_params)
        g = await self._path.chat(
            model, parse_messages(window), gen_params, tenant, options, cap, tools=tools
        )
        g._stream = self._remember(
            g.__aiter__(), tenant, model, conversation_id, new_turns, idempotency_key
        )
        return g

    async def _replay(self, model: str, tenant: str, answer: Mapping[str, Any]) -> Generation:
        """The stored answer of a request answered already (a client's retry whose first
        attempt completed), as a generation, without a model call: nothing is charged to
        the tenant but its right to call the model is checked again."""
        info = await self._path.model(model, "generate", tenant)
        n = len(info.tokenizer.encode(answer["content"], add_special_tokens=False))
        finish = answer.get("finish_reason") or "stop"
        usage = Usage(completion_tokens=n, finish_reason=finish, extra={"replayed": True})

        async def stream() -> AsyncIterator[tuple[str, int, str | None]]:
            yield answer["content"], n, finish

        return Generation(f"req-{uuid.uuid4().hex}", info.name, usage, _stream=stream())

    async def _window(
        self,
        model: str,
        history: Sequence[Mapping[str, Any]],
        messages: list[ChatMessage],
        params: GenerationParams,
    ) -> list[dict[str, str]]:
        """The conversation so far plus ``messages``, cut to what fits the model's window."""
        system = "\n".join(m.content for m in messages if m.role == "system")
        turns = [{"role": t["role"], "content": t["content"]} for t in history]
        turns += [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        window = await self._path.fit(model, None, system, [], turns, params.max_tokens)
        return [dict(m) for m in window.messages]

    async def _remember(
        self,
        inner: AsyncIterator[tuple[str, int, str | None]],
        tenant: str,
        model: str,
        conversation_id: str,
        new_turns: list[dict[str, str]],
        request_id: str | None,
    ) -> AsyncIterator[tuple[str, int, str | None]]:
        """Pass a generation through; once it is complete, store the turns durably, as the
        model saw them (what the tenant's filters redacted stays redacted in the store;
        the answer passed the output filters as it streamed)."""
        parts: list[str] = []
        try:
            async for text, n, finish in inner:
                parts.append(text)
                if finish is not None:
                    filters = await self._path.input_filters(tenant, model)
                    answer = {
                        "role": "assistant",
                        "content": "".join(parts),
                        "finish_reason": finish,
                    }
                    turns = [*filter_turns(filters, new_turns), answer]
                    store = get_actor(CONTEXT_STORE_NAME)
                    ref = store.append_turns.remote(tenant, conversation_id, turns, request_id)
                    await _ask(ref)
                yield text, n, finish
        finally:
            await inner.aclose()  # type: ignore[attr-defined]

    async def completion_generation(
        self, model: str, prompt: str | list[int], tenant: str, **params: Any
    ) -> Generation:
        """Start a completion of ``prompt`` (a text, or token ids of the model's tokenizer)."""
        options = _options(params)
        return await self._path.complete(model, prompt, generation_params(params), tenant, options)

    async def chat(self, model: str, messages: Any, tenant: str, **params: Any) -> Completion:
        """Chat and wait for the whole answer."""
        return await _collect(await self.chat_generation(model, messages, tenant, **params))

    async def complete(self, model: str, prompt: str, tenant: str, **params: Any) -> Completion:
        return await _collect(await self.completion_generation(model, prompt, tenant, **params))

    async def stream_chat(
        self, model: str, messages: Any, tenant: str, **params: Any
    ) -> AsyncIterator[str]:
        """Chat, yielding text as it is generated; closing this iterator aborts the request."""
        stream = (await self.chat_generation(model, messages, tenant, **params)).__aiter__()
        try:
            async for text, _, _ in stream:
                if text:
                    yield text
        finally:
            # Closed explicitly: left to the garbage collector, the abandoned request would
            # keep its replica slot until a collection happens to run.
            await stream.aclose()  # type: ignore[attr-defined]

    async def embed(
        self,
        model: str,
        texts: str | list[str] | list[list[int]],
        tenant: str,
        priority: str = "interactive",
        deadline_s: float | None = None,
        dimensions: int | None = None,
    ) -> tuple[list[list[float]], Usage]:
        """Embed one text or a list (texts or lists of token ids); returns the vectors (one
        per input) and usage. ``dimensions`` truncates a Matryoshka model's vectors."""
        texts = [texts] if isinstance(texts, str) else texts
        options = CallOptions(priority=priority, deadline_s=deadline_s)
        return await self._path.embed(model, texts, tenant, options, dimensions=dimensions)

    # -- graphs ------------------------------------------------------------------------

    async def register_graph(self, graph: CompiledGraph) -> dict[str, Any]:
        """Register (or replace) a compiled graph on the cluster; returns its description."""
        blob = pickle_graph(graph)
        return await _ask(_executor().register.remote(blob))

    async def start_run(
        self, graph: str, input: dict[str, Any], tenant: str, **options: Any
    ) -> str:
        """Start a run of ``graph``; ``options``: priority, token_budget, deadline_s, run_id."""
        run_id = options.pop("run_id", None)
        ref = _executor().start.remote(tenant, graph, input, options, run_id)
        return str(await _ask(ref))

    async def wait_run(
        self, run_id: str, tenant: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The run's result once it ends. If the executor dies meanwhile, the run is
        resumed from its checkpoints when the executor is back (by ``wait`` itself: a
        separate ``resume`` would fail for a run another caller resumed and finished)."""
        for attempt in range(RESUME_ATTEMPTS):
            try:
                return await _ask(_executor().wait.remote(tenant, run_id, timeout_s))
            except ray.exceptions.RayActorError:
                await asyncio.sleep(RESUME_BACKOFF_S * 2**attempt)  # while it restarts
        raise ReplicaUnavailable(f"the graph executor kept failing while running {run_id!r}")

    async def run_graph(
        self, graph: str, input: dict[str, Any], tenant: str, **options: Any
    ) -> dict[str, Any]:
        """Run ``graph`` on ``input`` and return its result: ``status``, the final
        ``state``, ``usage``, the edges it took (``trail``) and any ``error``."""
        run_id = await self.start_run(graph, input, tenant, **options)
        return await self.wait_run(run_id, tenant)

    async def stream_graph(
        self, graph: str, input: dict[str, Any], tenant: str, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Run ``graph``, yielding events as nodes start and finish, then the run's end."""
        run_id = await self.start_run(graph, input, tenant, **options)
        gen = _executor().events.options(num_returns="streaming").remote(tenant, run_id)
        async for ref in gen:
            yield await _ask(ref)

    async def get_run(self, run_id: str, tenant: str) -> dict[str, Any]:
        """The run's result so far (or its recorded end, after an executor restart)."""
        return await self.wait_run(run_id, tenant, timeout_s=0)

    async def cancel_run(self, run_id: str, tenant: str) -> dict[str, Any]:
        return await _ask(_executor().cancel.remote(tenant, run_id))

    async def resume_run(self, run_id: str, tenant: str) -> str:
        """Continue a run from its last checkpoints (completed nodes are not run again)."""
        return str(await _ask(_executor().resume.remote(tenant, run_id)))

    async def graphs(self) -> list[dict[str, Any]]:
        return await _ask(_executor().graphs.remote())

    # -- collections and retrieval -------------------------------------------------------

    async def _collections(self) -> Retriever:
        if self._retriever is None:
            uri = await self._controller.storage_uri.remote()
            self._retriever = Retriever(self._path, uri, progress=sys.stderr.isatty())
        return self._retriever

    async def create_collection(self, name: str, model: str, tenant: str) -> dict[str, Any]:
        """Create a document collection embedded by the deployed embedding ``model``."""
        return await (await self._collections()).create(name, model, tenant)

    async def collections(self) -> list[str]:
        return await (await self._collections()).names()

    async def ingest(
        self,
        collection: str,
        tenant: str,
        documents: list[dict[str, Any]] | None = None,
        folder: str | Path | None = None,
    ) -> dict[str, int]:
        """Chunk, embed and store documents (``{"id", "text", "metadata"?}``) or every
        ``.md``/``.txt`` file under ``folder``, as the tenant's; a document id ingested
        again replaces its earlier chunks."""
        where = str(folder) if folder is not None else None
        return await (await self._collections()).ingest(collection, tenant, documents, where)

    async def delete_documents(self, collection: str, doc_ids: list[str], tenant: str) -> None:
        await (await self._collections()).delete(collection, tenant, doc_ids)

    async def retrieve(
        self,
        collection: str,
        query: str,
        tenant: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        mmr_lambda: float | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` chunks of the tenant's documents closest to ``query``, best first:
        ``{"id", "doc_id", "text", "metadata", "score"}`` (``id`` is the citation id)."""
        retriever = await self._collections()
        return await retriever.retrieve(collection, query, tenant, k, filter, mmr_lambda)

    # -- features ------------------------------------------------------------------------

    async def push_events(self, view: str, events: list[dict[str, Any]], tenant: str) -> int:
        """Store a batch of events for a feature view as the tenant's (all or nothing);
        returns how many. A view's events are each tenant's own unless its ``tenants``
        share them; an event's optional ``event_id`` makes a retried push count once.

        Raises:
            PermissionDenied: the view is shared by other tenants only.
        """
        return int(await _ask(_feature_server().push.remote(tenant, view, events)))

    async def features(
        self, view: str, entity_ids: list[Any], tenant: str, as_of: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features now (or as of ``as_of``, epoch seconds), by entity id,
        from the events the tenant may see: its own, or those of a view it shares.

        Raises:
            PermissionDenied: the view is shared by other tenants only.
        """
        return dict(
            await _ask_again(lambda: _feature_server().get.remote(tenant, view, entity_ids, as_of))
        )

    # -- conversations -------------------------------------------------------------------

    async def append_turns(
        self,
        conversation_id: str,
        turns: list[dict[str, Any]],
        tenant: str,
        request_id: str | None = None,
    ) -> list[int]:
        """Append ``{"role", "content", "seq"?}`` turns durably; returns their numbers.

        The turns pass the tenant's input filters first (whichever models they cover: any
        model may read the conversation later), so what they redact is never stored in
        clear. ``request_id``: a retry with the same id appends nothing more and returns
        the first append's numbers; so an append with one is asked again while the store
        restarts (a kill mid-write fails none), one without is not (it might be stored twice).

        Raises:
            ContentBlocked: a blocking filter matched a turn. InvalidRequest: a bad turn
            or id. Conflict: a ``seq`` or ``request_id`` already used for other turns.
        """
        if not isinstance(turns, list):
            raise InvalidRequest("turns must be a list of {role, content} objects")
        if request_id is not None:
            request_id = check_idempotency_key(request_id, "request_id")
        turns = filter_turns(await self._path.input_filters(tenant, None), turns)
        store = get_actor(CONTEXT_STORE_NAME)

        def append() -> Any:
            return store.append_turns.remote(tenant, conversation_id, turns, request_id)

        if request_id is not None:
            return list(await _ask_again(append))
        return list(await _ask(append()))

    async def conversation(
        self, conversation_id: str, tenant: str, last: int | None = None
    ) -> list[dict[str, Any]]:
        store = get_actor(CONTEXT_STORE_NAME)
        return list(await _ask(store.conversation.remote(tenant, conversation_id, last)))

    # -- runs driven from outside the executor (LangGraph) ---------------------------------

    async def run_progress(self, run_id: str, tenant: str) -> RunProgress:
        """What a run driven from outside airi's executor (``AiriChatModel`` in a LangGraph
        graph) was charged by its earlier processes: its ``charged`` events in the store
        (none: it is new)."""
        store = get_actor(CONTEXT_STORE_NAME)
        try:
            record = await _ask_again(lambda: store.run.remote(tenant, outside_run_key(run_id)))
        except NotFound:
            return RunProgress()
        return progress(record["events"], [])

    async def record_run_charge(
        self, run_id: str, tenant: str, seq: int, model: str, tokens: int, elapsed_s: float
    ) -> None:
        """Record one call of such a run (its ``seq``-th), durably: a process that resumes
        the run after this one died starts its budget and deadline from it."""
        store = get_actor(CONTEXT_STORE_NAME)
        event = charged_event(model, tokens, elapsed_s, "langgraph")
        await _ask(store.run_event.remote(tenant, outside_run_key(run_id), seq, event))

    # -- observability -------------------------------------------------------------------

    async def trace(self, id: str, tenant: str) -> list[dict[str, Any]]:
        """The spans of a graph run's or a call's trace, by start time. ``id``: a run id,
        a completion's ``id`` (``chatcmpl-...``), a request id or a trace id; render them
        with ``airi_ray.core.traces.render_tree``."""
        store = get_actor(CONTEXT_STORE_NAME)
        return list(await _ask(store.trace.remote(tenant, request_key(id))))

    async def feedback(self, id: str, score: float, tenant: str) -> dict[str, Any]:
        """User feedback on a completion or graph run, from -1 (bad) to 1 (good); credited
        to the model version that answered, in its quality signals."""
        return dict(await _ask(_observer().feedback.remote(tenant, request_key(id), score)))

    async def alerts(
        self, model: str | None = None, severity: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Recent drift and anomaly alerts, newest first (``severity``: at least this).
        Alerts concern the app's models: any authenticated tenant may read them."""
        return list(await _ask(_observer().alerts.remote(model, severity, limit)))

    async def quality(self) -> dict[str, Any]:
        """Quality signals per model and version (rates, output length, relevance,
        grounding, feedback) over the recent window."""
        return dict(await _ask(_observer().quality.remote()))

    async def timeline(self, window_s: float = 900.0) -> list[dict[str, Any]]:
        """The observer's samples of the last ``window_s`` seconds (what ``airi report``
        plots), oldest first."""
        return list(await _ask(_observer().timeline.remote(window_s)))


class BackendThread:
    """A ``Backend`` on a private event-loop thread, for blocking callers (the ``Client``,
    graph builders at deploy time): ``run`` waits for a coroutine on that loop.

    The loop is its own rather than the caller's, so blocking calls work from code that
    runs inside an event loop already (a notebook, an async builder's caller).
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="airi-client", daemon=True
        )
        self._thread.start()
        self.backend: Backend = self.run(_warm_backend())
        # Closed when dropped, or at the latest when the process exits (before Ray's own
        # exit handler, registered earlier, disconnects): a script that never calls close
        # still hands back its last release and says goodbye to the scheduler.
        self._closer = weakref.finalize(
            self, _close_backend, self._loop, self._thread, self.backend
        )
        self._closer.atexit = False
        atexit.register(self._closer)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the backend's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the backend's streams, then stop the loop thread. Idempotent; also done
        when this is dropped or the process exits."""
        self._closer()


async def _warm_backend() -> Backend:
    backend = Backend()
    await backend.warm()
    return backend


def _close_backend(loop: asyncio.AbstractEventLoop, thread: threading.Thread, backend: Any) -> None:
    """Close ``backend`` on its loop, then stop the loop (its owner is closed or gone)."""
    if not loop.is_running():
        return
    if not ray.is_initialized():
        loop.call_soon_threadsafe(loop.stop)
        return
    done = asyncio.run_coroutine_threadsafe(backend.close(), loop)
    done.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
    if threading.current_thread() is not thread:  # never block the loop on itself
        try:
            done.result(timeout=15)
        except Exception:  # closing is best effort: the scheduler times out silent callers
            pass
        thread.join(timeout=5)


MAX_IDEMPOTENCY_KEY_CHARS = 256


def check_idempotency_key(value: Any, what: str = "the Idempotency-Key") -> str:
    """A request's idempotency key as given, or InvalidRequest naming what is allowed."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_CHARS
        or not value.isprintable()
    ):
        raise InvalidRequest(
            f"{what} must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters "
            "(a UUID, say), the same on every retry of one request"
        )
    return value


def outside_run_key(run_id: str) -> str:
    """The store's key of a run driven from outside the executor: apart from graph runs."""
    return "langgraph:" + run_id


def request_key(id: str) -> str:
    """The request id behind an OpenAI-style completion id (``chatcmpl-X`` is ``req-X``)."""
    if not isinstance(id, str) or not id:
        raise InvalidRequest("give a run id, a completion id or a request id")
    for prefix in ("chatcmpl-", "cmpl-"):
        if id.startswith(prefix):
            return "req-" + id.removeprefix(prefix)
    return id


def _observer() -> Any:
    try:
        return get_actor(OBSERVER_NAME)
    except ValueError:
        raise NotFound("no airi app is deployed on this cluster (`airi deploy FILE`)") from None


def _executor() -> Any:
    return get_actor(GRAPH_EXECUTOR_NAME)


def _feature_server() -> Any:
    try:
        return get_actor(FEATURE_SERVER_NAME)
    except ValueError:
        raise NotFound(
            "the deployed app declares no feature views (`features:` in the spec)"
        ) from None


def _get(ref: Any) -> Any:
    """``ray.get`` an actor call; an airi error raised inside arrives as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = unwrap_error(e)
        if cause is not e:
            raise cause from None
        raise


def _read(call: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """``_get`` a read-only actor call, again while the actor restarts (a read is safe to
    repeat; a restarting actor refuses calls instead of queueing them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _get(call())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def _ask_again(call: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """``_ask`` an actor call that may be repeated (a read, or a write made idempotent by
    its id), again while the actor restarts (``_read``'s async twin): it waits for the
    restart instead of failing."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await _ask(call())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _ask(ref: Any) -> Any:
    """Await an actor call; an airi error raised inside arrives as itself."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        cause = unwrap_error(e)
        if cause is not e:
            raise cause from None
        raise


def pickle_graph(graph: CompiledGraph) -> bytes:
    """Pickle a graph for the executor. Functions from the user's own modules (not
    installed packages) travel by value, so the executor needs no copy of that code."""
    import cloudpickle

    fns = [n.action for n in graph.nodes.values()]
    fns += [getattr(n.action, "build", None) for n in graph.nodes.values()]
    fns += [b.router for b in graph.branches]
    for fn in fns:
        name = getattr(fn, "__module__", None) or ""
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None) or ""
        if module is None or name.startswith("airi_ray") or "-packages" in where or not where:
            continue
        cloudpickle.register_pickle_by_value(module)
    return bytes(cloudpickle.dumps(graph))


async def _collect(g: Generation) -> Completion:
    text = await g.text()
    return Completion(text, g.usage.finish_reason, g.usage, g.request_id, g.model)
