"""Python client handles: ``airi.connect("auto")`` (blocking) and ``AsyncClient`` (asyncio).

An API key bound to the runtime's ``Backend``: calls from Python take the same path as
HTTP calls (tenant from an API key, scheduler lease, tokens straight from the replica).
Nothing inside ``airi_ray`` imports this module except ``airi_ray.app`` (``connect``
returns a ``Client``) and the CLI; the ingress and graph builders use the backend itself.

Example::

    import airi_ray as airi
    client = airi.connect("auto", api_key="sk-airi-de0000000001-nimbusDemoTenantKey01")
    print(client.chat("tiny-chat", [{"role": "user", "content": "How do I return boots?"}]).text)
    for piece in client.chat("tiny-chat", "Shipping to Canada?", stream=True):
        print(piece, end="")
    vectors = client.embed("minilm", ["free returns", "shipping costs"])
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from airi_ray import env
from airi_ray.config import AppSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.graph import CompiledGraph
from airi_ray.core.requests import Usage
from airi_ray.obs.report import write_report
from airi_ray.runtime.backend import Backend, BackendThread, Completion, _get, _read
from airi_ray.runtime.calls import Generation
from airi_ray.runtime.names import SCHEDULER_NAME, get_actor
from airi_ray.serve import proxy


class AsyncClient:
    """Model calls from asyncio code; bind to one event loop (create it inside that loop).

    Each call authenticates the client's key (``Backend.tenant_for``, cached for a few
    seconds) and runs on the backend as that tenant; a call given ``tenant=`` runs as that
    tenant instead, unauthenticated (the caller has authenticated it).

    Args:
        api_key: a tenant's key; without it, the ``AIRI_API_KEY`` variable, and if the
            app runs with ``auth: none``, the anonymous tenant.
        backend: the backend to call through; by default a new one on the running loop.
    """

    def __init__(self, api_key: str | None = None, backend: Backend | None = None) -> None:
        self.api_key = api_key if api_key is not None else env.api_key()
        self.backend = backend if backend is not None else Backend()

    async def _tenant(self, tenant: str | None) -> str:
        """``tenant`` if given, else the tenant this client's key authenticates as."""
        return tenant or await self.backend.tenant_for(self.api_key)

    async def tenant_for(self, api_key: str | None) -> str:
        """The tenant a key authenticates as.

        Raises:
            AuthenticationError: no key (when the app requires keys) or an unknown key.
        """
        return await self.backend.tenant_for(api_key)

    async def warm(self) -> None:
        """Fetch model infos and load tokenizers ahead of the first call."""
        await self.backend.warm()

    async def close(self) -> None:
        """Close this client's streams (its queued requests are dropped, leases returned)."""
        await self.backend.close()

    async def models(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The served models the tenant (default: this client's key's) may call."""
        if tenant is None and self.api_key:
            tenant = await self.backend.tenant_for(self.api_key)
        return await self.backend.models(tenant)

    async def chat_generation(
        self,
        model: str,
        messages: Any,
        tenant: str | None = None,
        conversation_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> Generation:
        """``Backend.chat_generation`` as this client's tenant (conversations, tools)."""
        tenant = await self._tenant(tenant)
        return await self.backend.chat_generation(
            model, messages, tenant, conversation_id=conversation_id, tools=tools, **params
        )

    async def completion_generation(
        self, model: str, prompt: str | list[int], tenant: str | None = None, **params: Any
    ) -> Generation:
        """Start a completion of ``prompt`` (a text, or token ids of the model's tokenizer)."""
        tenant = await self._tenant(tenant)
        return await self.backend.completion_generation(model, prompt, tenant, **params)

    async def chat(self, model: str, messages: Any, **params: Any) -> Completion:
        """Chat and wait for the whole answer."""
        tenant = await self._tenant(params.pop("tenant", None))
        return await self.backend.chat(model, messages, tenant, **params)

    async def complete(self, model: str, prompt: str, **params: Any) -> Completion:
        tenant = await self._tenant(params.pop("tenant", None))
        return await self.backend.complete(model, prompt, tenant, **params)

    async def stream_chat(self, model: str, messages: Any, **params: Any) -> AsyncIterator[str]:
        """Chat, yielding text as it is generated; closing this iterator aborts the request."""
        tenant = await self._tenant(params.pop("tenant", None))
        # Closed explicitly, however this iterator ends: closing it reaches the request at
        # once, not at the next collection.
        async with contextlib.aclosing(
            self.backend.stream_chat(model, messages, tenant, **params)
        ) as stream:
            async for text in stream:
                yield text

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
        tenant = await self._tenant(tenant)
        return await self.backend.embed(
            model, texts, tenant, priority=priority, deadline_s=deadline_s, dimensions=dimensions
        )

    # -- graphs ------------------------------------------------------------------------

    async def register_graph(self, graph: CompiledGraph) -> dict[str, Any]:
        """Register (or replace) a compiled graph on the cluster; returns its description."""
        return await self.backend.register_graph(graph)

    async def start_run(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> str:
        """Start a run of ``graph``; ``options``: priority, token_budget, deadline_s, run_id."""
        tenant = await self._tenant(tenant)
        return await self.backend.start_run(graph, input, tenant, **options)

    async def wait_run(
        self, run_id: str, tenant: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The run's result once it ends. If the executor dies meanwhile, the run is
        resumed from its checkpoints when the executor is back."""
        tenant = await self._tenant(tenant)
        return await self.backend.wait_run(run_id, tenant, timeout_s=timeout_s)

    async def run_graph(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Run ``graph`` on ``input`` and return its result: ``status``, the final
        ``state``, ``usage``, the edges it took (``trail``) and any ``error``."""
        tenant = await self._tenant(tenant)
        return await self.backend.run_graph(graph, input, tenant, **options)

    async def stream_graph(
        self, graph: str, input: dict[str, Any], tenant: str | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Run ``graph``, yielding events as nodes start and finish, then the run's end."""
        tenant = await self._tenant(tenant)
        async with contextlib.aclosing(
            self.backend.stream_graph(graph, input, tenant, **options)
        ) as events:
            async for event in events:
                yield event

    async def get_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The run's result so far (or its recorded end, after an executor restart)."""
        tenant = await self._tenant(tenant)
        return await self.backend.get_run(run_id, tenant)

    async def cancel_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        tenant = await self._tenant(tenant)
        return await self.backend.cancel_run(run_id, tenant)

    async def resume_run(self, run_id: str, tenant: str | None = None) -> str:
        """Continue a run from its last checkpoints (completed nodes are not run again)."""
        tenant = await self._tenant(tenant)
        return await self.backend.resume_run(run_id, tenant)

    async def graphs(self) -> list[dict[str, Any]]:
        return await self.backend.graphs()

    # -- collections and retrieval -------------------------------------------------------

    async def create_collection(self, name: str, model: str) -> dict[str, Any]:
        """Create a document collection embedded by the deployed embedding ``model``."""
        tenant = await self.backend.tenant_for(self.api_key)
        return await self.backend.create_collection(name, model, tenant)

    async def collections(self) -> list[str]:
        return await self.backend.collections()

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
        tenant = await self._tenant(tenant)
        return await self.backend.ingest(collection, tenant, documents, folder)

    async def delete_documents(
        self, collection: str, doc_ids: list[str], tenant: str | None = None
    ) -> None:
        tenant = await self._tenant(tenant)
        await self.backend.delete_documents(collection, doc_ids, tenant)

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
        tenant = await self._tenant(tenant)
        return await self.backend.retrieve(collection, query, tenant, k, filter, mmr_lambda)

    # -- features ------------------------------------------------------------------------

    async def push_events(
        self, view: str, events: list[dict[str, Any]], tenant: str | None = None
    ) -> int:
        """Store a batch of events for a feature view (all or nothing) as the tenant's;
        returns how many. Each tenant has its own events unless the view's ``tenants``
        share them; give events an ``event_id`` and a retried push counts once."""
        tenant = await self._tenant(tenant)
        return await self.backend.push_events(view, events, tenant)

    async def features(
        self,
        view: str,
        entity_ids: list[Any],
        as_of: float | None = None,
        tenant: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features now (or as of ``as_of``, epoch seconds), by entity id,
        from the tenant's own events (or those of a view its tenant shares; another
        tenant's shared view answers PermissionDenied)."""
        tenant = await self._tenant(tenant)
        return await self.backend.features(view, entity_ids, tenant, as_of)

    # -- conversations -------------------------------------------------------------------

    async def append_turns(
        self,
        conversation_id: str,
        turns: list[dict[str, Any]],
        tenant: str | None = None,
        request_id: str | None = None,
    ) -> list[int]:
        """Append ``{"role", "content", "seq"?}`` turns durably, as the tenant's input
        filters pass them; returns their numbers. A retry with the same ``request_id``
        appends nothing more and returns the first append's numbers."""
        tenant = await self._tenant(tenant)
        return await self.backend.append_turns(conversation_id, turns, tenant, request_id)

    async def conversation(
        self, conversation_id: str, tenant: str | None = None, last: int | None = None
    ) -> list[dict[str, Any]]:
        tenant = await self._tenant(tenant)
        return await self.backend.conversation(conversation_id, tenant, last=last)

    # -- observability -------------------------------------------------------------------

    async def trace(self, id: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """The spans of a graph run's or a call's trace, by start time. ``id``: a run id,
        a completion's ``id`` (``chatcmpl-...``), a request id or a trace id; render them
        with ``airi_ray.core.traces.render_tree``."""
        tenant = await self._tenant(tenant)
        return await self.backend.trace(id, tenant)

    async def feedback(self, id: str, score: float, tenant: str | None = None) -> dict[str, Any]:
        """User feedback on a completion or graph run, from -1 (bad) to 1 (good); credited
        to the model version that answered, in its quality signals."""
        tenant = await self._tenant(tenant)
        return await self.backend.feedback(id, score, tenant)

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
            await self.backend.tenant_for(self.api_key)
        return await self.backend.alerts(model, severity, limit)

    async def quality(self) -> dict[str, Any]:
        """Quality signals per model and version (rates, output length, relevance,
        grounding, feedback) over the recent window."""
        await self.backend.tenant_for(self.api_key)
        return await self.backend.quality()

    async def timeline(self, window_s: float = 900.0) -> list[dict[str, Any]]:
        """The observer's samples of the last ``window_s`` seconds (what ``airi report``
        plots), oldest first."""
        await self.backend.tenant_for(self.api_key)
        return await self.backend.timeline(window_s)


class Client:
    """Blocking handle; runs an ``AsyncClient`` on a private event-loop thread (a
    ``BackendThread``: closed when the client is closed, dropped, or the process exits)."""

    def __init__(
        self, api_key: str | None = None, deploy: Callable[..., dict[str, Any]] | None = None
    ) -> None:
        # ``deploy``: the app layer's (``airi_ray.app.deploy``), handed down by ``connect``;
        # the app sits above the client, so the client does not import it.
        self._deploy = deploy
        self._thread = BackendThread()
        self.aio = AsyncClient(api_key, backend=self._thread.backend)
        self._controller = self._thread.backend.controller

    def _run(self, coro: Any) -> Any:
        return self._thread.run(coro)

    def chat(self, model: str, messages: Any, *, stream: bool = False, **params: Any) -> Any:
        """Chat with ``model``. ``messages``: a string or OpenAI-style messages.
        ``conversation_id=...`` stores the exchange (as the tenant's filters passed it) and
        puts the earlier turns first; ``idempotency_key=...`` makes a retry store it once.

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
        scheduler = get_actor(SCHEDULER_NAME)
        status["scheduler"] = _read(scheduler.snapshot.remote)
        status["ingress"] = proxy.describe()
        return status

    def deploy(
        self, spec: AppSpec | dict[str, Any] | str | Path, wait: bool = True
    ) -> dict[str, Any]:
        """Deploy (or update) an app spec, a dict, or a YAML path; see ``airi_ray.deploy``."""
        if self._deploy is None:
            raise InvalidRequest("this client was not made by airi.connect(): use airi.deploy")
        return self._deploy(spec, wait=wait)

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
        """Store a batch of events for a feature view (all or nothing), as the key's
        tenant's; events with an ``event_id`` count once however often they are pushed."""
        return self._run(self.aio.push_events(view, events))

    def features(
        self, view: str, entity_ids: list[Any], as_of: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each entity's features now (or as of ``as_of``), by entity id."""
        return self._run(self.aio.features(view, entity_ids, as_of))

    def append_turns(
        self, conversation_id: str, turns: list[dict[str, Any]], request_id: str | None = None
    ) -> list[int]:
        """Append turns (as the tenant's input filters pass them); see ``AsyncClient``."""
        return self._run(self.aio.append_turns(conversation_id, turns, request_id=request_id))

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
        samples = self._run(self.aio.timeline(window_s))
        alerts = self._run(self.aio.alerts(limit=200))
        return write_report(Path(path), samples, alerts, self.quality(), png_dir=png_dir)

    def close(self) -> None:
        """Close the streams to the scheduler and replicas, then stop the loop thread.
        Idempotent; also done when the client is dropped or the process exits."""
        self._thread.close()
