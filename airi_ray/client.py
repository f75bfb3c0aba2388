"""Python client handles: ``airi.connect("auto")`` (blocking) and ``AsyncClient`` (asyncio).

A facade over the runtime's call path: calls from Python take the same path as HTTP calls
(tenant from an API key, scheduler lease, tokens straight from the replica). Nothing inside
``airi_ray`` imports this module except the ingress and the CLI.

Example::

    import airi_ray as airi
    client = airi.connect("auto", api_key="sk-airi-de0000000001-nimbusDemoTenantKey01")
    print(client.chat("tiny-chat", [{"role": "user", "content": "How do I return boots?"}]).text)
    for piece in client.chat("tiny-chat", "Shipping to Canada?", stream=True):
        print(piece, end="")
    vectors = client.embed("minilm", ["free returns", "shipping costs"])
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from airi_ray import env
from airi_ray.config import ANONYMOUS_TENANT, AppSpec, load_spec, parse_spec
from airi_ray.core.context import build_context
from airi_ray.core.errors import AuthenticationError, InvalidRequest, NotFound, ReplicaUnavailable
from airi_ray.core.graph import CompiledGraph
from airi_ray.core.policy import KeyRecord, KeyRing
from airi_ray.core.requests import (
    CallOptions,
    ChatMessage,
    GenerationParams,
    Usage,
    generation_params,
    parse_messages,
)
from airi_ray.runtime import (
    CONTEXT_STORE_NAME,
    CONTROLLER_NAME,
    FEATURE_SERVER_NAME,
    GRAPH_EXECUTOR_NAME,
    NAMESPACE,
    OBSERVER_NAME,
    SCHEDULER_NAME,
    actors,
)
from airi_ray.runtime.calls import Cached, CallPath, Generation, ModelInfo, unwrap_error
from airi_ray.runtime.graph_executor import GRAPHS_KEY
from airi_ray.runtime.retrieval import Retriever

KEYS_TTL_S = 2.0
TEMPLATE_TOKENS = 8  # chat-template tokens around one message, at most, for the models we serve
DEFAULT_RESERVE_TOKENS = 512  # kept for the answer when a conversation call sets no max_tokens
RESUME_ATTEMPTS = 5


@dataclass(frozen=True)
class Completion:
    """A finished generation: its text, why it stopped, and token usage."""

    text: str
    finish_reason: str | None
    usage: Usage
    request_id: str
    model: str


def init_ray(address: str | None = "auto") -> None:
    """Join the Ray cluster at ``address`` ("auto": the local one) unless already joined."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


OPTION_NAMES = ("priority", "deadline_s", "session_id")
# How a stored turn passes the input filters: tool output as a document, the rest as prompt.
_WHERE = {"tool": "document"}


def _options(kwargs: dict[str, Any]) -> CallOptions:
    """Take the scheduling options (priority, deadline_s, session_id) out of ``kwargs``."""
    return CallOptions(**{k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs})


class AsyncClient:
    """Model calls from asyncio code; bind to one event loop (create it inside that loop).

    Args:
        api_key: a tenant's key; without it, the ``AIRI_API_KEY`` variable, and if the
            app runs with ``auth: none``, the anonymous tenant.
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key if api_key is not None else env.api_key()
        self._path = CallPath()
        self._controller = actors.get_actor(CONTROLLER_NAME)
        # Key records (salted hashes) refreshed every few seconds: a revoked key stops
        # working within KEYS_TTL_S everywhere, with no call to the controller per request.
        self._auth = Cached(self._fetch_auth, KEYS_TTL_S, "the API key ring")
        self._retriever: Retriever | None = None

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
        """Close this client's streams (its queued requests are dropped, leases returned)."""
        await self._path.close()

    async def models(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The served models the tenant (default: this client's key's) may call."""
        if tenant is None and self.api_key:
            tenant = await self.tenant_for(self.api_key)
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
        tenant: str | None = None,
        conversation_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> Generation:
        """Start a chat generation; iterate the result for ``(text, n_tokens, finish)``.

        With ``conversation_id``, the conversation's earlier turns (those that fit the
        model's window, newest first) go before ``messages``, and once the answer is
        complete the new messages and the answer are appended to the conversation.
        ``tools`` (OpenAI function tools) are shown to the model by its chat template.
        """
        tenant = tenant or await self.tenant_for(self.api_key)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        options = _options(params)
        gen_params = generation_params(params)
        parsed = parse_messages(messages)
        if conversation_id is None:
            return await self._path.chat(model, parsed, gen_params, tenant, options, tools=tools)
        new_turns = [{"role": m.role, "content": m.content} for m in parsed if m.role != "system"]
        window = await self._window(model, tenant, conversation_id, parsed, gen_params)
        g = await self._path.chat(
            model, parse_messages(window), gen_params, tenant, options, tools=tools
        )
        g._stream = self._remember(g.__aiter__(), tenant, model, conversation_id, new_turns)
        return g

    async def _window(
        self,
        model: str,
        tenant: str,
        conversation_id: str,
        messages: list[ChatMessage],
        params: GenerationParams,
    ) -> list[dict[str, str]]:
        """The conversation so far plus ``messages``, cut to what fits the model's window."""
        info = await self._path.model(model, "generate")
        assert info.max_model_len is not None
        try:
            history = await self.conversation(conversation_id, tenant)
        except NotFound:
            history = []
        system = "\n".join(m.content for m in messages if m.role == "system")
        turns = [{"role": t["role"], "content": t["content"]} for t in history]
        turns += [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        tokenizer = info.tokenizer

        def count(text: str) -> int:
            # Content tokens plus the chat template's few tokens around each message.
            return len(tokenizer.encode(text, add_special_tokens=False)) + TEMPLATE_TOKENS

        reserve = params.max_tokens or min(DEFAULT_RESERVE_TOKENS, info.max_model_len // 4)
        window = build_context(system, [], turns, info.max_model_len, count, reserve)
        return [dict(m) for m in window.messages]

    async def _remember(
        self,
        inner: AsyncIterator[tuple[str, int, str | None]],
        tenant: str,
        model: str,
        conversation_id: str,
        new_turns: list[dict[str, str]],
    ) -> AsyncIterator[tuple[str, int, str | None]]:
        """Pass a generation through; once it is complete, store the turns durably, as the
        model saw them (what the tenant's filters redacted stays redacted in the store)."""
        parts: list[str] = []
        try:
            async for text, n, finish in inner:
                parts.append(text)
                if finish is not None:
                    stored = [
                        t
                        | {
                            "content": await self._path.redacted(
                                tenant, model, t["content"], _WHERE.get(t["role"], "prompt")
                            )
                        }
                        for t in new_turns
                    ]
                    answer = {"role": "assistant", "content": "".join(parts)}
                    await self.append_turns(conversation_id, [*stored, answer], tenant)
                yield text, n, finish
        finally:
            await inner.aclose()  # type: ignore[attr-defined]

    async def completion_generation(
        self, model: str, prompt: str | list[int], tenant: str | None = None, **params: Any
    ) -> Generation:
        """Start a completion of ``prompt`` (a text, or token ids of the model's tokenizer)."""
        tenant = tenant or await self.tenant_for(self.api_key)
        options = _options(params)
        return await self._path.complete(model, prompt, generation_params(params), tenant, options)

    async def chat(self, model: str, messages: Any, **params: Any) -> Completion:
        """Chat and wait for the whole answer."""
        return await _collect(await self.chat_generation(model, messages, **params))

    async def complete(self, model: str, prompt: str, **params: Any) -> Completion:
        return await _collect(await self.completion_generation(model, prompt, **params))

    async def stream_chat(self, model: str, messages: Any, **params: Any) -> AsyncIterator[str]:
        """Chat, yielding text as it is generated; closing this iterator aborts the request."""
        stream = (await self.chat_generation(model, messages, **params)).__aiter__()
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
        tenant: str | None = None,
        priority: str = "interactive",
        deadline_s: float | None = None,
        dimensions: int | None = None,
    ) -> tuple[list[list[float]], Usage]:
        """Embed one text or a list (texts or lists of token ids); returns the vectors (one
        per input) and usage. ``dimensions`` truncates a Matryoshka model's vectors."""
        tenant = tenant or await self.tenant_for(self.api_key)
        texts = [texts] if isinstance(texts, str) else texts
        options = CallOptions(priority=priority, deadline_s=deadline_s)
        return await self._path.embed(model, texts, tenant, options, dimensions=dimensions)

    # -- graphs ------------------------------------------------------------------------

    async def register_graph(self, graph: CompiledGraph) -> dict[str, Any]:
        """Register (or replace) a compiled graph on the cluster; returns its description."""
        blob = pickle_graph(graph)
        return await _ask(actors.get_or_start_graph_executor().register.remote(blob))

    async def start_run(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> str:
        """Start a run of ``graph``; ``options``: priority, token_budget, deadline_s, run_id."""
        tenant = tenant or await self.tenant_for(self.api_key)
        run_id = options.pop("run_id", None)
        ref = _executor().start.remote(tenant, graph, input, options, run_id)
        return str(await _ask(ref))

    async def wait_run(
        self, run_id: str, tenant: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The run's result once it ends. If the executor dies meanwhile, the run is
        resumed from its checkpoints when the executor is back."""
        tenant = tenant or await self.tenant_for(self.api_key)
        for _ in range(RESUME_ATTEMPTS):
            try:
                return await _ask(_executor().wait.remote(tenant, run_id, timeout_s))
            except ray.exceptions.RayActorError:
                await _ask(_executor().resume.remote(tenant, run_id))
        raise ReplicaUnavailable(f"the graph executor kept failing while running {run_id!r}")

    async def run_graph(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Run ``graph`` on ``input`` and return its result: ``status``, the final
        ``state``, ``usage``, the edges it took (``trail``) and any ``error``."""
        tenant = tenant or await self.tenant_for(self.api_key)
        run_id = await self.start_run(graph, input, tenant, **options)
        return await self.wait_run(run_id, tenant)

    async def stream_graph(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Run ``graph``, yielding events as nodes start and finish, then the run's end."""
        tenant = tenant or await self.tenant_for(self.api_key)
        run_id = await self.start_run(graph, input, tenant, **options)
        gen = _executor().events.options(num_returns="streaming").remote(tenant, run_id)
        async for ref in gen:
            yield await _ask(ref)

    async def get_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The run's result so far (or its recorded end, after an executor restart)."""
        return await self.wait_run(run_id, tenant, timeout_s=0)

    async def cancel_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        tenant = tenant or await self.tenant_for(self.api_key)
        return await _ask(_executor().cancel.remote(tenant, run_id))

    async def resume_run(self, run_id: str, tenant: str | None = None) -> str:
        """Continue a run from its last checkpoints (completed nodes are not run again)."""
        tenant = tenant or await self.tenant_for(self.api_key)
        return str(await _ask(_executor().resume.remote(tenant, run_id)))

    async def graphs(self) -> list[dict[str, Any]]:
        return await _ask(_executor().graphs.remote())

    # -- collections and retrieval -------------------------------------------------------

    async def _collections(self) -> Retriever:
        if self._retriever is None:
            uri = await self._controller.storage_uri.remote()
            self._retriever = Retriever(self._path, uri, progress=sys.stderr.isatty())
        return self._retriever

    async def create_collection(self, name: str, model: str) -> dict[str, Any]:
        """Create a document collection embedded by the deployed embedding ``model``."""
        tenant = await self.tenant_for(self.api_key)
        return await (await self._collections()).create(name, model, tenant)

    async def collections(self) -> list[str]:
        return await (await self._collections()).names()

    async def ingest(
        self,
        collection: str,
        documents: list[dict[str, Any]] | None = None,
        folder: str | Path | None = None,
        tenant: str | None = None,
    ) -> dict[str, int]:
        """Chunk, embed and store documents (``{"id", "text", "metadata"?}``) or every
        ``.md``/``.txt`` file under ``folder``, as this client's tenant's; a document id
        ingested again replaces its earlier chunks."""
        tenant = tenant or await self.tenant_for(self.api_key)
        where = str(folder) if folder is not None else None
        return await (await self._collections()).ingest(collection, tenant, documents, where)

    async def delete_documents(
        self, collection: str, doc_ids: list[str], tenant: str | None = None
    ) -> None:
        tenant = tenant or await self.tenant_for(self.api_key)
        await (await self._collections()).delete(collection, tenant, doc_ids)

    async def retrieve(
        self,
        collection: str,
        query: str,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        mmr_lambda: float | None = None,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` chunks of this tenant's documents closest to ``query``, best first:
        ``{"id", "doc_id", "text", "metadata", "score"}`` (``id`` is the citation id)."""
        tenant = tenant or await self.tenant_for(self.api_key)
        retriever = await self._collections()
        return await retriever.retrieve(collection, query, tenant, k, filter, mmr_lambda)

    # -- features ------------------------------------------------------------------------

    async def push_events(
        self, view: str, events: list[dict[str, Any]], tenant: str | None = None
    ) -> int:
        """Store a batch of events for a feature view (all or nothing); returns how many."""
        if tenant is None:  # authenticate; the views themselves belong to the app
            await self.tenant_for(self.api_key)
        return int(await _ask(_feature_server().push.remote(view, events)))

    async def features(
        self,
        view: str,
        entity_ids: list[Any],
        as_of: float | None = None,
        tenant: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features now (or as of ``as_of``, epoch seconds), by entity id.
        Feature views belong to the app: any authenticated tenant may read them."""
        if tenant is None:  # authenticate; the views themselves belong to the app
            await self.tenant_for(self.api_key)
        return dict(await _ask(_feature_server().get.remote(view, entity_ids, as_of)))

    # -- conversations -------------------------------------------------------------------

    async def append_turns(
        self, conversation_id: str, turns: list[dict[str, Any]], tenant: str | None = None
    ) -> list[int]:
        """Append ``{"role", "content", "seq"?}`` turns durably; returns their numbers."""
        tenant = tenant or await self.tenant_for(self.api_key)
        store = actors.get_actor(CONTEXT_STORE_NAME)
        return list(await _ask(store.append_turns.remote(tenant, conversation_id, turns)))

    async def conversation(
        self, conversation_id: str, tenant: str | None = None, last: int | None = None
    ) -> list[dict[str, Any]]:
        tenant = tenant or await self.tenant_for(self.api_key)
        store = actors.get_actor(CONTEXT_STORE_NAME)
        return list(await _ask(store.conversation.remote(tenant, conversation_id, last)))

    # -- observability -------------------------------------------------------------------

    async def trace(self, id: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """The spans of a graph run's or a call's trace, by start time. ``id``: a run id,
        a completion's ``id`` (``chatcmpl-...``), a request id or a trace id; render them
        with ``airi_ray.core.traces.render_tree``."""
        tenant = tenant or await self.tenant_for(self.api_key)
        store = actors.get_actor(CONTEXT_STORE_NAME)
        return list(await _ask(store.trace.remote(tenant, request_key(id))))

    async def feedback(self, id: str, score: float, tenant: str | None = None) -> dict[str, Any]:
        """User feedback on a completion or graph run, from -1 (bad) to 1 (good); credited
        to the model version that answered, in its quality signals."""
        tenant = tenant or await self.tenant_for(self.api_key)
        return dict(await _ask(_observer().feedback.remote(tenant, request_key(id), score)))

    async def alerts(
        self,
        model: str | None = None,
        severity: str | None = None,
        limit: int = 100,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Recent drift and anomaly alerts, newest first (``severity``: at least this).
        Alerts concern the app's models: any authenticated tenant may read them."""
        if tenant is None:
            await self.tenant_for(self.api_key)
        return list(await _ask(_observer().alerts.remote(model, severity, limit)))

    async def quality(self) -> dict[str, Any]:
        """Quality signals per model and version (rates, output length, relevance,
        grounding, feedback) over the recent window."""
        await self.tenant_for(self.api_key)
        return dict(await _ask(_observer().quality.remote()))

    async def timeline(self, window_s: float = 900.0) -> list[dict[str, Any]]:
        """The observer's samples of the last ``window_s`` seconds (what ``airi report``
        plots), oldest first."""
        await self.tenant_for(self.api_key)
        return list(await _ask(_observer().timeline.remote(window_s)))


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
        return actors.get_actor(OBSERVER_NAME)
    except ValueError:
        raise NotFound("no airi app is deployed on this cluster (`airi deploy FILE`)") from None


def _executor() -> Any:
    return actors.get_actor(GRAPH_EXECUTOR_NAME)


def _feature_server() -> Any:
    try:
        return actors.get_actor(FEATURE_SERVER_NAME)
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


class Client:
    """Blocking handle; runs an ``AsyncClient`` on a private event-loop thread."""

    def __init__(self, api_key: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="airi-client", daemon=True
        )
        self._thread.start()
        self.aio: AsyncClient = self._run(self._make(api_key))
        self._controller = self.aio._controller
        # Closed when dropped, or at the latest when the process exits (before Ray's own
        # exit handler, registered earlier, disconnects): a script that never calls close
        # still hands back its last release and says goodbye to the scheduler.
        self._closer = weakref.finalize(self, _close_client, self._loop, self._thread, self.aio)
        self._closer.atexit = False
        atexit.register(self._closer)

    async def _make(self, api_key: str | None) -> AsyncClient:
        client = AsyncClient(api_key)
        await client.warm()
        return client

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def chat(self, model: str, messages: Any, *, stream: bool = False, **params: Any) -> Any:
        """Chat with ``model``. ``messages``: a string or OpenAI-style messages.

        Returns a ``Completion``, or with ``stream=True`` an iterator of text pieces.
        Raises ``InvalidRequest``, ``ModelNotFound``, ``AuthenticationError``, ... (airi_ray.core.errors).
        """
        if stream:
            return self._iterate(self.aio.stream_chat(model, messages, **params))
        return self._run(self.aio.chat(model, messages, **params))

    def complete(self, model: str, prompt: str, **params: Any) -> Completion:
        """Plain text completion of ``prompt``."""
        return self._run(self.aio.complete(model, prompt, **params))

    def embed(self, model: str, texts: str | list[str], **options: Any) -> list[list[float]]:
        """Embedding vectors, one per text; ``options``: priority, deadline_s."""
        return self._run(self.aio.embed(model, texts, **options))[0]

    def models(self) -> list[dict[str, Any]]:
        return self._run(self.aio.models())

    def status(self) -> dict[str, Any]:
        """Models, replicas and recent events, with each model's queue and routing counts."""
        status: dict[str, Any] = _read(self._controller.status.remote)
        scheduler = actors.get_actor(SCHEDULER_NAME)
        status["scheduler"] = _read(scheduler.snapshot.remote)
        return status

    def deploy(
        self, spec: AppSpec | dict[str, Any] | str | Path, wait: bool = True
    ) -> dict[str, Any]:
        """Deploy (or update) an app spec, a dict, or a YAML path; see ``airi_ray.deploy``."""
        return deploy(spec, wait=wait)

    def rollout(
        self,
        model: str,
        to: str,
        strategy: str | None = None,
        steps: list[int] | None = None,
        together: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Start moving ``model`` to version ``to`` and return the status at once.

        ``strategy`` is ``"canary"`` (traffic in ``steps``, promoted while the new version
        stays within its limits, rolled back by itself otherwise) or ``"blue-green"``
        (all at once when warm); default: the version's ``rollout`` setting. ``together``
        names other models to move in the same instant (``{"guard": "v2"}``).

        Raises:
            NotFound: unknown model or version. InvalidRequest: bad strategy or steps.
            Conflict: a rollout runs already, or a ``requires`` constraint forbids it.
        """
        return _get(self._controller.rollout.remote(model, to, strategy, steps, together))

    def rollback(self, model: str) -> dict[str, Any]:
        """Stop ``model``'s running rollout, or go back to its previous version."""
        return _get(self._controller.rollback.remote(model))

    def _iterate(self, agen: AsyncIterator[str]) -> Iterator[str]:
        it = agen.__aiter__()
        try:
            while True:
                try:
                    yield self._run(it.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(it.aclose())

    def register_graph(self, graph: CompiledGraph) -> dict[str, Any]:
        """Register (or replace) a compiled graph; see ``airi_ray.graphs``."""
        return self._run(self.aio.register_graph(graph))

    def graphs(self) -> list[dict[str, Any]]:
        """The registered graphs: name, inputs, nodes and edges of each."""
        return self._run(self.aio.graphs())

    def run_graph(self, graph: str, input: dict[str, Any], **options: Any) -> dict[str, Any]:
        """Run a graph and return its result (``status``, ``state``, ``usage``, ``trail``).
        ``options``: priority, token_budget, deadline_s, run_id."""
        return self._run(self.aio.run_graph(graph, input, **options))

    def stream_graph(self, graph: str, input: dict[str, Any], **options: Any) -> Iterator[Any]:
        """Run a graph, yielding node events (``node_started``, ``node_finished``) and the
        run's end (``run_finished``, ``run_failed``...)."""
        return self._iterate(self.aio.stream_graph(graph, input, **options))

    def start_run(self, graph: str, input: dict[str, Any], **options: Any) -> str:
        return self._run(self.aio.start_run(graph, input, **options))

    def wait_run(self, run_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self._run(self.aio.wait_run(run_id, timeout_s=timeout_s))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._run(self.aio.get_run(run_id))

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self._run(self.aio.cancel_run(run_id))

    def resume_run(self, run_id: str) -> str:
        return self._run(self.aio.resume_run(run_id))

    def create_collection(self, name: str, model: str) -> dict[str, Any]:
        """Create a document collection embedded by the deployed embedding ``model``."""
        return self._run(self.aio.create_collection(name, model))

    def collections(self) -> list[str]:
        return self._run(self.aio.collections())

    def ingest(
        self,
        collection: str,
        documents: list[dict[str, Any]] | None = None,
        folder: str | Path | None = None,
    ) -> dict[str, int]:
        """Chunk, embed and store documents or a folder of ``.md``/``.txt`` files."""
        return self._run(self.aio.ingest(collection, documents, folder))

    def delete_documents(self, collection: str, doc_ids: list[str]) -> None:
        self._run(self.aio.delete_documents(collection, doc_ids))

    def retrieve(self, collection: str, query: str, k: int = 5, **options: Any) -> list[Any]:
        """The ``k`` chunks closest to ``query``; ``options``: filter, mmr_lambda."""
        return self._run(self.aio.retrieve(collection, query, k, **options))

    def push_events(self, view: str, events: list[dict[str, Any]]) -> int:
        """Store a batch of events for a feature view (all or nothing)."""
        return self._run(self.aio.push_events(view, events))

    def features(
        self, view: str, entity_ids: list[Any], as_of: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features now (or as of ``as_of``), by entity id."""
        return self._run(self.aio.features(view, entity_ids, as_of))

    def append_turns(self, conversation_id: str, turns: list[dict[str, Any]]) -> list[int]:
        return self._run(self.aio.append_turns(conversation_id, turns))

    def conversation(self, conversation_id: str, last: int | None = None) -> list[dict[str, Any]]:
        return self._run(self.aio.conversation(conversation_id, last=last))

    def trace(self, id: str) -> list[dict[str, Any]]:
        """The spans of a run's or a call's trace (see ``AsyncClient.trace``)."""
        return self._run(self.aio.trace(id))

    def feedback(self, id: str, score: float) -> dict[str, Any]:
        """Feedback on a completion or run, from -1 (bad) to 1 (good)."""
        return self._run(self.aio.feedback(id, score))

    def alerts(
        self, model: str | None = None, severity: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return self._run(self.aio.alerts(model, severity, limit))

    def quality(self) -> dict[str, Any]:
        return self._run(self.aio.quality())

    def report(
        self, path: str | Path, window_s: float = 900.0, png_dir: str | Path | None = None
    ) -> Path:
        """Write an HTML report (throughput, TTFT, queue depth, cache hits, drift, alerts,
        quality) of the last ``window_s`` seconds to ``path``."""
        from airi_ray.obs.report import write_report

        samples = self._run(self.aio.timeline(window_s))
        alerts = self._run(self.aio.alerts(limit=200))
        return write_report(Path(path), samples, alerts, self.quality(), png_dir=png_dir)

    def close(self) -> None:
        """Close the streams to the scheduler and replicas, then stop the loop thread.
        Idempotent; also done when the client is dropped or the process exits."""
        self._closer()


def _close_client(loop: asyncio.AbstractEventLoop, thread: threading.Thread, aio: Any) -> None:
    """Close ``aio`` on its loop, then stop the loop (the client is closed or gone)."""
    if not loop.is_running():
        return
    if not ray.is_initialized():
        loop.call_soon_threadsafe(loop.stop)
        return
    done = asyncio.run_coroutine_threadsafe(aio.close(), loop)
    done.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
    if threading.current_thread() is not thread:  # never block the loop on itself
        try:
            done.result(timeout=15)
        except Exception:  # closing is best effort: the scheduler times out silent callers
            pass
        thread.join(timeout=5)


def connect(address: str | None = "auto", api_key: str | None = None) -> Client:
    """Connect to a running airi app on the Ray cluster at ``address``.

    Raises:
        InvalidRequest: no airi app runs there (start one with ``airi up``).
    """
    init_ray(address)
    try:
        actors.get_actor(CONTROLLER_NAME)
    except ValueError:
        raise InvalidRequest(
            "no airi app is running on this Ray cluster; start one with `airi up`"
        ) from None
    return Client(api_key)


def deploy(spec: AppSpec | dict[str, Any] | str | Path, wait: bool = True) -> dict[str, Any]:
    """Deploy an app spec on the connected Ray cluster: models, graphs, then the HTTP ingress.

    Raises:
        InvalidRequest: the spec is invalid, or a model failed to start (with its error).
    """
    if isinstance(spec, (str, Path)):
        app = load_spec(spec)
    elif isinstance(spec, AppSpec):
        app = spec
    else:
        app = parse_spec(spec)
    from airi_ray.graphs import _function, build_graph, run_builder

    # Built here, where the spec's `module:function` names import, and before anything
    # changes on the cluster, so a graph that does not compile changes nothing. Graphs
    # with a builder are built once the models are ready (the builder may use them).
    graphs = [build_graph(g) for g in app.graphs if g.builder is None]
    builders = [g for g in app.graphs if g.builder is not None]
    for g in builders:
        _function(g.builder)  # an import error, before anything changes
    init_ray(None)
    controller = actors.get_or_start_controller()
    status = _get(controller.deploy.remote(app.model_dump(), wait or bool(builders)))
    graphs += [run_builder(g, app) for g in builders]
    if graphs:
        executor = actors.get_or_start_graph_executor()
        ray.get([executor.register.remote(pickle_graph(g)) for g in graphs])
    if app.ingress.enabled:
        from airi_ray.serve.ingress import run_ingress

        run_ingress(app.ingress)
    return status


def shutdown() -> None:
    """Stop the app: ingress, replicas, scheduler and controller (the Ray cluster stays)."""
    from ray import serve

    try:
        serve.shutdown()
    except Exception:
        pass
    for key in ray.experimental.internal_kv._internal_kv_list(GRAPHS_KEY):
        ray.experimental.internal_kv._internal_kv_del(key)
    names = (
        CONTROLLER_NAME,
        SCHEDULER_NAME,
        GRAPH_EXECUTOR_NAME,
        CONTEXT_STORE_NAME,
        FEATURE_SERVER_NAME,
    )
    for name in names:
        try:
            handle = actors.get_actor(name)
        except ValueError:
            continue
        if name == CONTROLLER_NAME:
            try:
                ray.get(handle.shutdown.remote(), timeout=60)
            except Exception:
                pass
        ray.kill(handle, no_restart=True)
    # Replicas are detached (they outlive a crashed controller): whatever the controller
    # could not stop goes now, with the pools.
    left = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    ]
    handles = []
    for name in left:
        try:
            handles.append(actors.get_actor(name))
        except ValueError:
            pass
    # A replica stops its engine processes itself (killed, it would leave them running).
    stops = [h.shutdown.remote() for h in handles if hasattr(h, "shutdown")]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=30)
    for h in handles:
        ray.kill(h, no_restart=True)
