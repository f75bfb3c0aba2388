"""OpenAI-compatible HTTP API on Ray Serve (FastAPI).

Routes: ``/v1/models``, ``/v1/chat/completions`` (SSE streaming and not),
``/v1/completions``, ``/v1/embeddings``, ``/healthz``, ``/metrics``. Every error answers
with the OpenAI error body ``{"error": {"message", "type", "code"}}``; bad input never
reaches a replica and never turns into a 500.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from starlette.exceptions import HTTPException as StarletteHTTPException

from airi_ray.config import IngressSpec
from airi_ray.core.errors import (
    AiriError,
    AuthenticationError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from airi_ray.core.pacing import RefusalPacer
from airi_ray.core.policy.errors import RateLimited
from airi_ray.obs.metrics import HttpMetrics
from airi_ray.runtime import cluster_kv
from airi_ray.runtime.backend import Backend
from airi_ray.runtime.calls import Generation
from airi_ray.runtime.names import ON_HEAD
from airi_ray.serve import protocol, proxy
from airi_ray.serve.openapi import document, header, json_body, query
from airi_ray.serve.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from airi_ray.serve.schemas import FeatureEventsRequest, FeedbackRequest, GraphRunRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Request bodies larger than this are decoded and validated off the event loop.
OFFLOAD_BYTES = 64 << 10

APP_NAME = "airi"
app = FastAPI(title="airi-ray", docs_url=None, redoc_url=None)
http_metrics = HttpMetrics()


class _CountResponses:
    """Counts responses by route and status. Plain ASGI: Starlette's ``BaseHTTPMiddleware``
    would copy every chunk of a streamed response through an extra task and queue."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")  # bounded labels
                http_metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


app.add_middleware(_CountResponses)


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = document(app)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def _error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "code": code}}, status_code=status
    )


UNAUTHENTICATED = "(unauthenticated)"  # the pace key of refusals that name no tenant


class _Refusals:
    """This replica's refusal pacer (``pace_refusals``)."""

    pacer: RefusalPacer | None = None


refusals = _Refusals()


# Serve ships the ``Ingress`` class to its replicas by value, with copies of the module
# globals its methods name; the app's handlers and middleware are this module's own. State
# both sides share is reached through functions, which travel by reference.
def pace_refusals(spec: IngressSpec) -> None:
    """Pace this replica's refusals as ``spec`` says (``refusals_per_s``, ``refusal_burst``)."""
    rate = spec.refusals_per_s
    refusals.pacer = RefusalPacer(rate, spec.refusal_burst) if rate > 0 else None


def http_metrics_text() -> bytes:
    """This replica's HTTP metrics (responses by route and status, paced refusals)."""
    return http_metrics.text()


async def _paced(request: Request, status: int, error: BaseException | None = None) -> None:
    """Wait out the pace of the tenant's refusals (``RefusalPacer``) before answering one.

    Paced: the 4xx answers a request earns by itself (invalid, too large, unauthenticated,
    over its tenant's limits), keyed by the tenant the request authenticated as. Not paced:
    a full server's 429 (``Overloaded``), which is no fault of the tenant, and 5xx.
    """
    pacer = refusals.pacer
    if pacer is None or not 400 <= status < 500:
        return
    if isinstance(error, Overloaded) and not isinstance(error, RateLimited):
        return
    delay = pacer.delay(getattr(request.state, "tenant", None) or UNAUTHENTICATED, time.monotonic())
    if delay > 0:
        http_metrics.refusals_paced.inc()
        await asyncio.sleep(delay)


@app.exception_handler(AiriError)
async def _airi_error(request: Request, e: AiriError) -> JSONResponse:
    await _paced(request, e.status, e)
    headers = {}
    if isinstance(e, Overloaded) and e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    return JSONResponse(e.to_body(), status_code=e.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    await _paced(request, e.status_code)
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error(
        e.status_code,
        f"{request.method} {request.url.path}: {e.detail}",
        "invalid_request_error",
        code,
    )


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return _error(500, f"internal error: {type(e).__name__}", "internal_error")


def _pydantic_message(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
    )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's ``base64`` format: little-endian float32 bytes, base64-encoded."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def _model_card(m: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's model object, with what airi knows of the model besides."""
    return {
        "id": m["name"],
        "object": "model",
        "created": 0,
        "owned_by": "airi",
        "version": m["version"],
        "task": m["task"],
        "max_model_len": m["max_model_len"],
        "ready_replicas": m["ready_replicas"],
    }


class _EventStream(StreamingResponse):
    """Server-sent events of one generation, closed however the response ends.

    Starlette neither closes a body iterator that stopped early (the client hung up while
    an event was being sent) nor starts one whose response was cancelled before its body:
    left to the garbage collector, the generation would hold its lease and replica slot
    until a collection happened to run. Closing it aborts the request in the engine and
    hands the lease back at once.
    """

    def __init__(self, events: AsyncIterator[str], generations: list[AsyncIterator[Any]]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._generations = generations

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            for g in self._generations:
                await g.aclose()  # type: ignore[attr-defined]


async def _first(it: AsyncIterator[Any]) -> Any:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _all(coros: list[Any]) -> list[Any]:
    """Await all; if one fails, the others are cancelled (their requests aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close_all(gens: list[Generation]) -> None:
    for g in gens:
        with contextlib.suppress(Exception):
            await g.__aiter__().aclose()  # type: ignore[attr-defined]


async def _merged(
    its: list[AsyncIterator[Any]], firsts: list[Any], interval_s: float
) -> AsyncIterator[tuple[int, Any]]:
    """``(choice index, item)`` from every stream, as items arrive; ``firsts`` are each
    stream's first item, already read (None: the stream was empty)."""
    if len(its) == 1:
        if firsts[0] is None:
            return
        yield 0, firsts[0]
        finish = firsts[0][2]
        while finish is None:
            # Tokens that arrive meanwhile are merged into the next event.
            if interval_s:
                await asyncio.sleep(interval_s)
            try:
                item = await its[0].__anext__()
            except StopAsyncIteration:
                return
            finish = item[2]
            yield 0, item
        return
    pending: dict[asyncio.Future[Any], int] = {}
    for i, first in enumerate(firsts):
        if first is not None:
            yield i, first
            if first[2] is None:
                pending[asyncio.ensure_future(its[i].__anext__())] = i
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                i = pending.pop(f)
                try:
                    item = f.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                if item[2] is None:
                    pending[asyncio.ensure_future(its[i].__anext__())] = i
    finally:
        for f in pending:
            f.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class _Reply:
    """One chat or completion response of ``gens`` (its choices, in order), whole or as
    stream events: content, tool calls, logprobs and echo, in vLLM's response models."""

    def __init__(
        self,
        gens: list[Generation],
        body: Any,
        chat: bool,
        plan: protocol.ToolPlan | None = None,
        parser: Any = None,
        echo: bool = False,
        per_prompt: int = 1,
    ) -> None:
        self.gens, self.body, self.chat = gens, body, chat
        self.plan = plan or protocol.ToolPlan()
        self.parser = parser
        self.echo = echo
        self.per_prompt = per_prompt  # choices of each prompt (n): gens come prompt by prompt
        self.created = int(time.time())
        # The completion's id names its first request: feedback and `airi trace` take it.
        self.rid = ("chatcmpl-" if chat else "cmpl-") + gens[0].request_id.removeprefix("req-")
        self.model = gens[0].model
        self.logprobs = (body.logprobs if chat else body.logprobs is not None) or False
        so = body.stream_options
        self.include_usage = bool(so and so.include_usage)
        n = len(gens)
        self._started = [False] * n
        self._buffers: list[list[str]] = [[] for _ in range(n)]
        self._offsets = [0] * n
        self._call_ids = [f"call_{g.request_id[-24:]}" for g in gens]

    # -- whole responses

    def whole(self, texts: list[str]) -> dict[str, Any]:
        choices = []
        for i, (g, text) in enumerate(zip(self.gens, texts, strict=True)):
            finish = g.usage.finish_reason
            if self.chat:
                lp = protocol.chat_logprobs(g.logprobs.tokens) if self.logprobs else None
                content, calls = protocol.read_tool_calls(self.plan, text, self.body, self.parser)
                if calls and self.plan.mode != "named":
                    finish = "tool_calls"
                choices.append(protocol.chat_choice(i, content, calls, finish, lp))
            else:
                positions = g.logprobs.tokens
                if self.echo:
                    text = (g.prompt_text or "") + text
                    positions = (g.logprobs.prompt or []) + positions
                plp = protocol.completion_logprobs(positions) if self.logprobs else None
                choices.append(protocol.completion_choice(i, text, finish, plp))
        return protocol.response(
            self.chat, self.rid, self.created, self.model, choices, self._usage()
        )

    def _usage(self) -> Any:
        # A prompt counts once however many choices it has, as OpenAI counts it.
        prompt = sum(g.usage.prompt_tokens for g in self.gens[:: self.per_prompt])
        return protocol.usage(prompt, sum(g.usage.completion_tokens for g in self.gens))

    # -- stream events

    def usage_chunk(self) -> str:
        return protocol.usage_chunk(self.rid, self.created, self.model, self.chat, self._usage())

    def chunk(self, i: int, text: str, n: int, finish: str | None) -> list[str]:
        g = self.gens[i]
        first = not self._started[i]
        self._started[i] = True
        if not self.chat:
            positions = g.logprobs.take()
            if first and self.echo:
                text = (g.prompt_text or "") + text
                positions = (g.logprobs.prompt or []) + positions
            plp = None
            if self.logprobs:
                plp = protocol.completion_logprobs(positions, self._offsets[i])
                self._offsets[i] += sum(len(p[0]) for p in positions)
            return [
                protocol.completion_chunk(self.rid, self.created, self.model, i, text, finish, plp)
            ]
        lp = protocol.chat_logprobs(g.logprobs.take()) if self.logprobs else None
        args = (self.rid, self.created, self.model, i)
        mode = self.plan.mode
        if mode == "none":
            return [
                protocol.chat_chunk(
                    *args,
                    content=text,
                    role="assistant" if first else None,
                    finish=finish,
                    logprobs=lp,
                )
            ]
        if mode == "named":
            assert self.plan.function is not None
            delta = protocol.named_call_delta(text, first, self.plan.function, self._call_ids[i])
            return [
                protocol.chat_chunk(
                    *args,
                    role="assistant" if first else None,
                    tool_calls=delta,
                    finish=finish,
                    logprobs=lp,
                )
            ]
        # required / auto: the calls are read from the whole answer, sent when it ends.
        out = []
        if first:
            out.append(protocol.chat_chunk(*args, role="assistant", content="", logprobs=lp))
            lp = None
        self._buffers[i].append(text)
        if finish is None:
            if lp is not None:
                out.append(protocol.chat_chunk(*args, logprobs=lp))
            return out
        whole = "".join(self._buffers[i])
        content, calls = protocol.read_tool_calls(self.plan, whole, self.body, self.parser)
        out.append(
            protocol.chat_chunk(
                *args,
                content=content,
                tool_calls=protocol.tool_call_deltas(calls),
                finish="tool_calls" if calls else finish,
                logprobs=lp,
            )
        )
        return out


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(f"invalid request: {_pydantic_message(e)}") from None


# serve.ingress pickles the app when the class is decorated: helpers the routes use must
# be defined above this point.
@serve.deployment(
    name="airi-ingress",
    max_ongoing_requests=2048,  # streams are long-lived; the scheduler does the queueing
)
@serve.ingress(app)
class Ingress:
    async def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = IngressSpec.model_validate(spec)
        pace_refusals(self.spec)
        # Built in the serving event loop, where requests run; tokenizers load before the
        # replica reports ready, so the first request does not wait for them.
        # The backend takes each call's tenant from the route, which authenticates the
        # request's bearer key (``_tenant``).
        self.backend = Backend()
        await self.backend.warm()

    async def __del__(self) -> None:
        """Serve's graceful shutdown of this replica: hand back what its calls hold."""
        await self.backend.close()

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        """Read the JSON body within the size limit and validate it against ``model``."""
        return await self._parsed(request, functools.partial(_validate, model))

    async def _parsed(self, request: Request, parse: Callable[[dict[str, Any]], T]) -> T:
        """The request's JSON object, read within the body size limit, through ``parse``.

        A large body is decoded and validated in a worker thread: a megabyte of JSON takes
        milliseconds of CPU, which on the event loop would stall every stream it serves.
        """
        raw = await self._read(request)
        if len(raw) <= OFFLOAD_BYTES:
            return parse(_decode(raw))
        return await asyncio.to_thread(lambda: parse(_decode(raw)))

    async def _read(self, request: Request) -> bytes:
        limit = self.spec.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body has {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _tenant(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if header and scheme.lower() != "bearer":
            raise AuthenticationError("the Authorization header must be `Bearer <key>`")
        tenant = await self.backend.tenant_for(key.strip() or None)
        request.state.tenant = tenant  # its refusals are paced as its own (``_paced``)
        return tenant

    # -- routes --------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        models = await self.backend.models(None)
        return {"status": "ok", "models": {m["name"]: m["ready_replicas"] for m in models}}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        text = await self.backend.metrics_text() + http_metrics_text()
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        """The models the caller's tenant may call."""
        models = await self.backend.models(await self._tenant(request))
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model, if the caller's tenant may call it (else 404, as if it did not exist)."""
        for m in await self.backend.models(await self._tenant(request)):
            if m["name"] == model_id:
                return _model_card(m)
        raise ModelNotFound(f"The model `{model_id}` does not exist.")

    @app.post(
        "/v1/chat/completions",
        openapi_extra=json_body(ChatRequest)
        | header(
            "Idempotency-Key",
            {"type": "string", "minLength": 1, "maxLength": 256},
            "The same on every retry of one request: with a conversation_id, the exchange "
            "is stored once, and a retry of a stored one gets its stored answer.",
        ),
    )
    async def chat_completions(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        body: ChatRequest = await self._parsed(
            request, functools.partial(protocol.parse, ChatRequest)
        )
        info = await self.backend.model_info(body.model, "generate", tenant)
        plan = protocol.tool_plan(body, info.tool_parser)
        params, n = protocol.generation(body)
        protocol.check_choices(1, n)
        if n > 1 and body.conversation_id is not None:
            raise InvalidRequest(
                "a stored conversation keeps one answer: with conversation_id, n must be 1"
            )
        options = {"priority": body.priority, "session_id": body.session_id}
        # A client's retry resends its Idempotency-Key: the conversation stores the exchange
        # once. (The openai Python client sends none by itself: pass extra_headers.)
        key = request.headers.get("idempotency-key")
        gens = []
        try:
            for j in range(n):
                gens.append(
                    await self.backend.chat_generation(
                        body.model,
                        body.messages,
                        tenant,
                        conversation_id=body.conversation_id,
                        idempotency_key=key,
                        tools=plan.tools or None,
                        **protocol.choice_params(params, j).to_dict(),
                        **options,
                    )
                )
        except BaseException:
            await _close_all(gens)
            raise
        parser = (
            protocol.tool_parser_for(info.tool_parser, info.tokenizer, body)
            if plan.mode == "auto" and info.tool_parser
            else None
        )
        reply = _Reply(gens, body, chat=True, plan=plan, parser=parser, per_prompt=n)
        return await self._respond(reply)

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        body: CompletionRequest = await self._parsed(
            request, functools.partial(protocol.parse, CompletionRequest)
        )
        prompts = protocol.prompts_of(body)
        params, n = protocol.generation(body)
        protocol.check_choices(len(prompts), n)
        options = {"priority": body.priority, "session_id": body.session_id}
        gens = []
        try:
            for prompt in prompts:
                for j in range(n):  # choice index: prompt number * n + j, as OpenAI's
                    gens.append(
                        await self.backend.completion_generation(
                            body.model,
                            prompt,
                            tenant,
                            **protocol.choice_params(params, j).to_dict(),
                            **options,
                        )
                    )
        except BaseException:
            await _close_all(gens)
            raise
        reply = _Reply(gens, body, chat=False, echo=bool(body.echo), per_prompt=n)
        return await self._respond(reply)

    @app.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest))
    async def embeddings(self, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        body: EmbeddingRequest = await self._parsed(
            request, functools.partial(protocol.parse, EmbeddingRequest)
        )
        if body.encoding_format not in ("float", "base64"):
            raise InvalidRequest(
                f"encoding_format must be 'float' or 'base64', got {body.encoding_format!r}"
            )
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        vectors, usage = await self.backend.embed(
            body.model,
            list(inputs),
            tenant,
            priority=body.priority,
            dimensions=body.dimensions,
        )
        return {
            "object": "list",
            "model": body.model,
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }

    # -- graphs --------------------------------------------------------------------------

    @app.get("/v1/graphs")
    async def list_graphs(self, request: Request) -> dict[str, Any]:
        await self._tenant(request)
        return {"object": "list", "data": await self.backend.graphs()}

    @app.post("/v1/graphs/{name}/runs", openapi_extra=json_body(GraphRunRequest))
    async def run_graph(self, name: str, request: Request) -> Response:
        tenant = await self._tenant(request)
        body: GraphRunRequest = await self._body(request, GraphRunRequest)
        run_id = await self.backend.start_run(name, body.input, tenant, **body.options())
        if not body.wait:
            return JSONResponse({"run_id": run_id, "graph": name, "status": "running"}, 202)
        return JSONResponse(await self.backend.wait_run(run_id, tenant))

    @app.get("/v1/graphs/{name}/runs/{run_id}")
    async def get_run(self, name: str, run_id: str, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        run = await self.backend.get_run(run_id, tenant)
        if run.get("graph", name) != name:
            raise NotFound(f"run {run_id!r} not found")
        return run

    # -- features ------------------------------------------------------------------------

    @app.get(
        "/v1/features/{view}",
        openapi_extra=query(
            ("entity_id", {"type": "array", "items": {"type": "string"}, "minItems": 1}, True),
            ("as_of", {"type": "number"}, False),
        ),
    )
    async def get_features(self, view: str, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        ids = request.query_params.getlist("entity_id")
        raw = request.query_params.get("as_of")
        try:
            as_of = float(raw) if raw is not None else None
        except ValueError:
            raise InvalidRequest(f"as_of must be epoch seconds, got {raw!r}") from None
        if not ids:
            raise InvalidRequest("give one or more entity ids as ?entity_id=...&entity_id=...")
        found = await self.backend.features(view, ids, tenant, as_of)
        return {"object": "features", "view": view, "as_of": as_of, "data": found}

    @app.post("/v1/features/{view}/events", openapi_extra=json_body(FeatureEventsRequest))
    async def push_events(self, view: str, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        body: FeatureEventsRequest = await self._body(request, FeatureEventsRequest)
        accepted = await self.backend.push_events(view, body.events, tenant)
        return {"view": view, "accepted": accepted}

    # -- observability -------------------------------------------------------------------

    @app.post("/v1/feedback", openapi_extra=json_body(FeedbackRequest))
    async def feedback(self, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        body: FeedbackRequest = await self._body(request, FeedbackRequest)
        return await self.backend.feedback(body.id, body.value(), tenant)

    @app.get("/v1/traces/{id}")
    async def trace(self, id: str, request: Request) -> dict[str, Any]:
        tenant = await self._tenant(request)
        return {"object": "trace", "id": id, "spans": await self.backend.trace(id, tenant)}

    @app.get(
        "/v1/alerts",
        openapi_extra=query(
            ("model", {"type": "string"}, False),
            ("severity", {"type": "string", "enum": ["info", "warning", "critical"]}, False),
            ("limit", {"type": "integer", "minimum": 0, "default": 100}, False),
        ),
    )
    async def alerts(self, request: Request) -> dict[str, Any]:
        await self._tenant(request)  # authenticate; alerts concern the app's models
        q = request.query_params
        raw = q.get("limit", "100")
        if not raw.isdigit():
            raise InvalidRequest(f"limit must be a whole number, got {raw!r}")
        found = await self.backend.alerts(q.get("model"), q.get("severity"), int(raw))
        return {"object": "list", "data": found}

    # -- responses -----------------------------------------------------------------------

    async def _respond(self, reply: _Reply) -> Response:
        if not reply.body.stream:
            if len(reply.gens) == 1:
                texts = [await reply.gens[0].text()]
            else:
                texts = await _all([g.text() for g in reply.gens])
            return JSONResponse(reply.whole(texts))
        its = [g.__aiter__() for g in reply.gens]
        # Wait for the first tokens before answering 200: queue-full, no replica and engine
        # refusals still get their own status code instead of an error inside a stream.
        try:
            if len(its) == 1:
                firsts = [await _first(its[0])]
            else:
                firsts = await _all([_first(it) for it in its])
        except BaseException:
            await _close_all(reply.gens)
            raise
        interval_s = self.spec.stream_interval_ms / 1000 if len(its) == 1 else 0.0

        async def events() -> AsyncIterator[str]:
            try:
                async for i, item in _merged(its, firsts, interval_s):
                    for event in reply.chunk(i, *item):
                        yield event
                if reply.include_usage:
                    yield reply.usage_chunk()
                yield "data: [DONE]\n\n"
            except AiriError as e:
                yield _sse(e.to_body())

        return _EventStream(events(), its)


def _serve_running() -> bool:
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def run_ingress(spec: IngressSpec) -> None:
    """Start (or update) the HTTP ingress on the connected Ray cluster; an ingress already
    running with the same settings is left alone (a redeploy replaces its replicas).

    The proxy (``ingress.proxy``) is chosen when Serve starts: its controller and proxies
    read it from their environment then. A Serve instance started with another proxy (or
    not by airi) is shut down and started again with the asked one.
    """
    wanted = proxy.resolve(spec.proxy)
    settings = spec.model_dump_json().encode()
    if _serve_running():
        if proxy.running() != wanted:
            logger.warning("restarting Ray Serve to put %s in front of the ingress", wanted)
            serve.shutdown()
        else:
            app = serve.status().applications.get(APP_NAME)
            if (
                app is not None
                and app.status == "RUNNING"
                and cluster_kv.get(proxy.SETTINGS_KEY) == settings
            ):
                return
    serve.start(
        http_options={"host": spec.host, "port": spec.port},
        proxy_location="HeadOnly",
        controller_options={"runtime_env": {"env_vars": proxy.controller_env(wanted)}},
    )
    cluster_kv.put(proxy.KV_KEY, wanted.encode())
    ingress = Ingress.options(
        num_replicas=spec.replicas,
        ray_actor_options={
            "num_cpus": 0,
            "resources": dict(ON_HEAD),  # with the proxy and the control actors
            "runtime_env": {"env_vars": proxy.replica_env(wanted)},
        },
    )
    serve.run(ingress.bind(spec.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    cluster_kv.put(proxy.SETTINGS_KEY, settings)
