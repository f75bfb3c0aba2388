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
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from airi_ray import env
from airi_ray.config import ANONYMOUS_TENANT, AppSpec, load_spec, parse_spec
from airi_ray.core.errors import AuthenticationError, InvalidRequest
from airi_ray.core.policy import KeyRecord, KeyRing
from airi_ray.core.requests import CallOptions, GenerationParams, Usage, parse_messages
from airi_ray.runtime import CONTROLLER_NAME, NAMESPACE, actors
from airi_ray.runtime.calls import Cached, CallPath, Generation

KEYS_TTL_S = 2.0


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


def _options(kwargs: dict[str, Any]) -> CallOptions:
    """Take the scheduling options (priority, deadline_s, session_id) out of ``kwargs``."""
    return CallOptions(**{k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs})


def _params(kwargs: dict[str, Any]) -> GenerationParams:
    stop = kwargs.pop("stop", None)
    try:
        return GenerationParams(
            stop=tuple([stop] if isinstance(stop, str) else stop or ()), **kwargs
        )
    except TypeError as e:
        raise InvalidRequest(f"unknown generation argument: {e}") from None


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
        self._auth = Cached(self._fetch_auth, KEYS_TTL_S)

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

    async def models(self) -> list[dict[str, Any]]:
        return [vars(m) | {"tokenizer": None} for m in await self._path.list_models(refresh=True)]

    async def chat_generation(
        self, model: str, messages: Any, tenant: str | None = None, **params: Any
    ) -> Generation:
        """Start a chat generation; iterate the result for ``(text, n_tokens, finish)``."""
        tenant = tenant or await self.tenant_for(self.api_key)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        options = _options(params)
        return await self._path.chat(
            model, parse_messages(messages), _params(params), tenant, options
        )

    async def completion_generation(
        self, model: str, prompt: str, tenant: str | None = None, **params: Any
    ) -> Generation:
        tenant = tenant or await self.tenant_for(self.api_key)
        options = _options(params)
        return await self._path.complete(model, prompt, _params(params), tenant, options)

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
        texts: str | list[str],
        tenant: str | None = None,
        priority: str = "interactive",
        deadline_s: float | None = None,
    ) -> tuple[list[list[float]], Usage]:
        """Embed one text or a list; returns the vectors (one per text) and usage."""
        tenant = tenant or await self.tenant_for(self.api_key)
        texts = [texts] if isinstance(texts, str) else texts
        options = CallOptions(priority=priority, deadline_s=deadline_s)
        return await self._path.embed(model, texts, tenant, options)


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
        status: dict[str, Any] = ray.get(self._controller.status.remote())
        scheduler = actors.get_actor(actors.SCHEDULER_NAME)
        status["scheduler"] = ray.get(scheduler.snapshot.remote())
        return status

    def deploy(
        self, spec: AppSpec | dict[str, Any] | str | Path, wait: bool = True
    ) -> dict[str, Any]:
        """Deploy (or update) an app spec, a dict, or a YAML path; see ``airi_ray.deploy``."""
        return deploy(spec, wait=wait)

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

    def close(self) -> None:
        """Close the streams to the scheduler and replicas, then stop the loop thread."""
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


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
    """Deploy an app spec on the connected Ray cluster: models, then the HTTP ingress.

    Raises:
        InvalidRequest: the spec is invalid, or a model failed to start (with its error).
    """
    if isinstance(spec, (str, Path)):
        app = load_spec(spec)
    elif isinstance(spec, AppSpec):
        app = spec
    else:
        app = parse_spec(spec)
    init_ray(None)
    controller = actors.get_or_start_controller()
    try:
        status = ray.get(controller.deploy.remote(app.model_dump(), wait))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, InvalidRequest):
            raise e.cause from None
        raise
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
    for name in (CONTROLLER_NAME, actors.SCHEDULER_NAME):
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
