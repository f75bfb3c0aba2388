"""``AiriChatModel``: a LangChain chat model whose calls take airi's call path.

Every call goes through ``runtime.backend.Backend`` as the tenant of the model's API key:
the front door (scheduling, ACLs, rate limits, budgets), the tenant's filters, a fair
lease on a replica, traces and metrics, exactly as a call from the Python client or HTTP.
The async methods run on the caller's event loop (a ``Backend`` per loop); the sync ones
on a private loop thread (a ``BackendThread``, as ``airi.connect("auto")`` does).

Inside a LangGraph run (a config with ``configurable.thread_id``) the calls carry the
run's identity, as a graph run's calls in airi's own executor do: the thread id is the run
id (``airi trace <thread_id>`` shows the run's calls as one trace, a span per node call),
the session id (replica affinity for the run's prompts), and the key into the run's
``RunLimits``: ``configurable.airi_token_budget`` and ``airi_deadline_s`` bound the run's
calls together, and a call the budget or deadline does not allow is refused with airi's
own ``RunBudgetExceeded`` / ``RunDeadlineExceeded``. The calls of a run with limits are
recorded in the context store as they end, so a run resumed from its checkpoint by
another process (this one was killed) goes on with what it had spent, as a resumed graph
run in airi's executor does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import AIMessageChunk, BaseMessage
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable
    from langchain_core.runnables.config import ensure_config
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(
        "AiriChatModel needs the langgraph extra: pip install 'airi-ray[langgraph]'"
    ) from e

from airi_ray import env
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.requests import CallOptions, structured_output
from airi_ray.core.runs import RunBook, RunLimits
from airi_ray.langgraph.convert import (
    RunIdentity,
    ToolAnswer,
    ai_message,
    read_tool_calls,
    run_identity,
    to_messages,
    tool_choice_name,
    tools_schema,
    trace_id,
    usage_metadata,
)
from airi_ray.obs.tracing import tracing
from airi_ray.runtime.backend import Backend, BackendThread
from airi_ray.runtime.calls import Generation

logger = logging.getLogger(__name__)

# Keyword arguments LangChain itself adds to a call, which are not the model's.
_LANGCHAIN_KWARGS = ("ls_structured_output_format",)


class AiriChatModel(BaseChatModel):
    """A chat model served by airi, called as the tenant of ``api_key``.

    Args:
        model: the served model's name (``airi status`` lists them).
        api_key: a tenant's key; default: the ``AIRI_API_KEY`` variable.
        temperature, max_tokens, top_p, stop, seed: sampling, as airi's chat takes them.
        model_kwargs: more of airi's generation arguments (``SAMPLING_EXTRAS``: top_k,
            presence_penalty, ...); an unknown one fails the call with InvalidRequest.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = Field(description="the served model's name")
    api_key: SecretStr | None = Field(default=None, description="a tenant's API key")
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    _backends: Any = PrivateAttr(default_factory=weakref.WeakKeyDictionary)
    _thread: BackendThread | None = PrivateAttr(default=None)
    _runs: RunBook = PrivateAttr(default_factory=RunBook)

    @property
    def _llm_type(self) -> str:
        return "airi"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model} | self._params()

    def _key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else env.api_key()

    def _params(self) -> dict[str, Any]:
        fixed = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }
        return {k: v for k, v in fixed.items() if v is not None} | dict(self.model_kwargs)

    # -- tools and structured output ------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        """Bind tools (anything ``convert_to_openai_tool`` takes); ``tool_choice``: "auto"
        (default: the model may call one, in the Hermes ``<tool_call>`` format), "required"
        / "any" (it must; the answer is constrained to the tools' schema), or a tool's name."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = tool_choice_name(tool_choice)
        tools_schema(formatted, choice)  # refuses a bad choice now, not at the first call
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The answer generated to ``schema`` (a pydantic class: parsed into it; a JSON
        schema dict: a dict). ``method``: "json_schema" (airi's ``response_format``, the
        engine keeps the answer to the schema) or "function_calling" (a tool call)."""
        if method == "function_calling" or include_raw:
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method != "json_schema":
            raise InvalidRequest(
                f"method must be 'json_schema' or 'function_calling', got {method!r}"
            )
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            parser: Any = PydanticOutputParser(pydantic_object=schema)
            fmt: Any = schema
        elif isinstance(schema, dict):
            parser = JsonOutputParser()
            body = schema.get("schema", schema) if "name" in schema else schema
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": body}}
        else:
            raise InvalidRequest("schema must be a pydantic model class or a JSON schema dict")
        return self.bind(response_format=fmt) | parser

    # -- calls -----------------------------------------------------------------------------

    def _request(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
        """The call's airi arguments, its tools and its tool choice."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _LANGCHAIN_KWARGS}
        tools = list(kwargs.pop("tools", None) or [])
        choice = tool_choice_name(kwargs.pop("tool_choice", None))
        params = self._params() | kwargs
        if stop is not None:
            params["stop"] = stop
        fmt = params.pop("response_format", None)
        schema = tools_schema(tools, choice) if tools else None
        if fmt is not None and schema is not None:
            raise InvalidRequest(
                "response_format cannot be combined with tool_choice 'required' or a named "
                "tool (the tools' schema already shapes the answer)"
            )
        if fmt is not None:
            params["structured_outputs"], _ = structured_output(fmt)
        elif schema is not None:
            params["structured_outputs"] = {"json": schema}
        for name in ("priority", "deadline_s", "session_id", "conversation_id", "cap"):
            if name in params:
                raise InvalidRequest(
                    f"{name} is set by the run identity (configurable.airi_priority, "
                    "airi_deadline_s, thread_id), not per call"
                )
        return params, tools, choice

    async def _start(
        self,
        backend: Backend,
        identity: RunIdentity | None,
        messages: list[BaseMessage],
        params: dict[str, Any],
        tools: list[dict[str, Any]],
    ) -> tuple[Generation, Any, RunLimits | None, Callable[[int], Awaitable[None]] | None]:
        """Start the call on ``backend`` (on its loop), under the run identity if any;
        returns the generation, its node span, the run's limits and, for a run with a
        budget or deadline, what records the call's tokens durably once it ends."""
        tenant = await backend.tenant_for(self._key())
        openai_messages = to_messages(messages)
        if identity is None:
            g = await backend.chat_generation(
                self.model, openai_messages, tenant, tools=tools or None, **params
            )
            return g, None, None, None
        run_id, options = identity.run_id, identity.options
        bounded = options.token_budget is not None or options.deadline_s is not None
        prior = None
        if bounded and self._runs.get(run_id) is None:  # perhaps resumed after a crash
            prior = await backend.run_progress(run_id, tenant)
        now = time.monotonic()
        limits = self._runs.limits(run_id, options, now, prior)
        limits.check(now)
        record = None
        if bounded:

            async def record(tokens: int) -> None:
                limits.charge(self.model, tokens)
                seq, elapsed = limits.calls - 1, limits.elapsed(time.monotonic())
                try:
                    await backend.record_run_charge(
                        run_id, tenant, seq, self.model, tokens, elapsed
                    )
                except Exception as e:  # the call succeeded; a resume would count less
                    logger.warning("run %s: a call's %d tokens not recorded: %s", run_id, tokens, e)

        options = CallOptions(
            priority=identity.options.priority,
            deadline_s=limits.call_deadline_s(now, 0),
            session_id=identity.run_id,
        )
        wanted = params.get("max_tokens") or 1 << 30

        def cap(prompt_tokens: int) -> int:
            return limits.max_tokens(prompt_tokens, wanted)

        attrs = {
            "airi.run_id": identity.run_id,
            "airi.tenant": tenant,
            "airi.graph": "langgraph",
        }
        with tracing.use(tracing.remote_parent(trace_id(identity.run_id))):
            span = tracing.start(f"node {identity.node}", "node", attrs)
        try:
            with tracing.use(span):
                g = await backend.chat_generation(
                    self.model,
                    openai_messages,
                    tenant,
                    tools=tools or None,
                    cap=cap,
                    priority=options.priority,
                    deadline_s=options.deadline_s,
                    session_id=options.session_id,
                    **params,
                )
        except BaseException as e:
            tracing.end_failed(span, e)
            raise
        return g, span, limits, record

    async def _pieces(
        self,
        backend: Backend,
        identity: RunIdentity | None,
        messages: list[BaseMessage],
        params: dict[str, Any],
        tools: list[dict[str, Any]],
    ) -> AsyncIterator[tuple[str, Generation]]:
        """The answer's text pieces as they come; the run is charged once it ends."""
        g, span, limits, record = await self._start(backend, identity, messages, params, tools)
        stream = g.__aiter__()
        failed: BaseException | None = None
        try:
            async for text, _, _ in stream:
                yield text, g
        except BaseException as e:
            failed = e
            raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            tokens = g.usage.prompt_tokens + g.usage.completion_tokens
            if record is not None:
                await record(tokens)
            elif limits is not None:
                limits.charge(self.model, tokens)
            if failed is not None:
                tracing.end_failed(span, failed)
            else:
                tracing.end(span)

    async def _answer(
        self,
        backend: Backend,
        identity: RunIdentity | None,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> ChatResult:
        params, tools, choice = self._request(stop, kwargs)
        parts: list[str] = []
        g: Generation | None = None
        async for text, current in self._pieces(backend, identity, messages, params, tools):
            parts.append(text)
            g = current
        assert g is not None
        u = g.usage
        answer = read_tool_calls("".join(parts), choice, bool(tools))
        message = ai_message(
            answer, g.model, u.finish_reason, g.request_id, u.prompt_tokens, u.completion_tokens
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _chunks(
        self,
        backend: Backend,
        identity: RunIdentity | None,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[ChatGenerationChunk]:
        params, tools, choice = self._request(stop, kwargs)
        reads_calls = bool(tools) and choice != "none"
        parts: list[str] = []
        g: Generation | None = None
        async for text, g in self._pieces(backend, identity, messages, params, tools):
            if reads_calls:  # calls are read from the whole answer
                parts.append(text)
            elif text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=text, id=g.request_id))
        assert g is not None
        u = g.usage
        answer = read_tool_calls("".join(parts), choice, True) if reads_calls else None
        yield ChatGenerationChunk(message=_last_chunk(answer, g, u))

    # -- LangChain's entry points -------------------------------------------------------------

    def _backend(self) -> Backend:
        loop = asyncio.get_running_loop()
        backend = self._backends.get(loop)
        if backend is None:
            backend = self._backends[loop] = Backend()
        return backend

    def _sync(self) -> BackendThread:
        if self._thread is None:
            self._thread = BackendThread()
        return self._thread

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        identity = run_identity(ensure_config())
        return await self._answer(self._backend(), identity, messages, stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        identity = run_identity(ensure_config())  # read here: the config is this thread's
        thread = self._sync()
        return thread.run(self._answer(thread.backend, identity, messages, stop, kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        identity = run_identity(ensure_config())
        async for chunk in self._chunks(self._backend(), identity, messages, stop, kwargs):
            if run_manager is not None and isinstance(chunk.message.content, str):
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        identity = run_identity(ensure_config())
        thread = self._sync()
        it = self._chunks(thread.backend, identity, messages, stop, kwargs).__aiter__()
        try:
            while True:
                try:
                    chunk = thread.run(it.__anext__())
                except StopAsyncIteration:
                    return
                if run_manager is not None and isinstance(chunk.message.content, str):
                    run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
                yield chunk
        finally:
            thread.run(it.aclose())

    def close(self) -> None:
        """Close the sync calls' loop thread (the async ones close with their loop)."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None


def _last_chunk(answer: ToolAnswer | None, g: Generation, u: Any) -> AIMessageChunk:
    """The stream's last chunk: the tool calls read from the whole answer (if tools were
    bound), usage and the finish reason."""
    chunks = []
    content = ""
    finish = u.finish_reason
    if answer is not None:
        content = answer.content
        for i, c in enumerate(answer.tool_calls):
            chunks.append(
                tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            )
        for j, bad in enumerate(answer.invalid_tool_calls, start=len(chunks)):
            chunks.append(
                tool_call_chunk(
                    name=bad.get("name"), args=bad.get("args"), id=bad.get("id"), index=j
                )
            )
        if answer.tool_calls:
            finish = "tool_calls"
    return AIMessageChunk(
        content=content,
        id=g.request_id,
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(u.prompt_tokens, u.completion_tokens),
        response_metadata={"model_name": g.model, "finish_reason": finish},
        chunk_position="last",
    )
