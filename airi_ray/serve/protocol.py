"""The OpenAI API on vLLM's own protocol layer.

Requests are parsed and validated with vLLM's OpenAI request models and turned into
sampling parameters with their ``to_sampling_params()``, so every parameter vLLM's
server accepts is accepted and checked the same way; responses are vLLM's response
models. On top of them, airi's extensions (``priority``, ``session_id``,
``conversation_id``) and what airi does not serve is refused by name instead of ignored.
vLLM is imported here only: the ingress process pays for it, Python clients do not.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError
from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.openai.completion import protocol as completion_protocol
from vllm.entrypoints.openai.completion.protocol import (
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.pooling.embed import protocol as embed_protocol
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import SamplingParams
from vllm.tool_parsers.utils import get_json_schema_from_tools

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.requests import (
    SAMPLING_EXTRAS,
    GenerationParams,
    Position,
    generation_params,
)

MAX_CHOICES = 64  # n times the number of prompts, per request
_DEFAULTS = SamplingParams()
Priority = Literal["interactive", "batch"]


# airi's extensions, shared by the request models. vLLM's own ``priority`` is an integer
# for its priority scheduling; airi's names a class within the tenant's queue.
def _priority() -> Any:
    return Field(
        "interactive", description="airi extension: priority class within the tenant's queue."
    )


def _session_id() -> Any:
    return Field(
        None,
        min_length=1,
        max_length=256,
        description="airi extension: conversation id; later turns go to the same replica.",
    )


def _model() -> Any:
    # vLLM's server falls back to its one model; an airi app serves several.
    return Field(min_length=1, description="The served model to call.")


class ChatRequest(chat_protocol.ChatCompletionRequest):
    model: str = _model()  # type: ignore[assignment]
    priority: Priority = _priority()  # type: ignore[assignment]
    session_id: str | None = _session_id()
    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="airi extension: a stored conversation; its earlier turns go before "
        "`messages`, and the new turns and the answer are appended to it.",
    )


class CompletionRequest(completion_protocol.CompletionRequest):
    model: str = _model()  # type: ignore[assignment]
    priority: Priority = _priority()  # type: ignore[assignment]
    session_id: str | None = _session_id()


class EmbeddingRequest(embed_protocol.EmbeddingCompletionRequest):
    model: str = _model()  # type: ignore[assignment]
    priority: Priority = _priority()  # type: ignore[assignment]


# vLLM request fields airi does not serve, with the value that means "not used": a request
# setting one to anything else is refused rather than answered without it.
_UNSERVED: dict[str, Any] = {
    "use_beam_search": False,
    "prompt_embeds": None,
    "suffix": None,
    "logits_processors": None,
    "logprob_token_ids": None,
    "kv_transfer_params": None,
    "ec_transfer_params": None,
    "vllm_xargs": None,
    "continue_final_message": False,
    "add_generation_prompt": True,
    "chat_template": None,
    "chat_template_kwargs": None,
    "mm_processor_kwargs": None,
    "return_tokens_as_token_ids": None,
    "return_token_ids": None,
    "thinking_token_budget": None,
    "repetition_detection": None,
    "routed_experts_prompt_start": None,
    "cache_salt": None,
    "documents": None,
}
_CHAT_UNSERVED = _UNSERVED | {"echo": False, "functions": None, "function_call": None}


def parse(model: type[Any], data: dict[str, Any]) -> Any:
    """``data`` validated with vLLM's request ``model``.

    Raises:
        InvalidRequest: what vLLM's validation said, field by field.
    """
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(f"invalid request: {_pydantic_message(e)}") from None
    except (ValueError, VLLMClientError) as e:  # vLLM's own validation errors
        raise InvalidRequest(f"invalid request: {e}") from None
    unserved = _CHAT_UNSERVED if isinstance(body, ChatRequest) else _UNSERVED
    used = sorted(
        k
        for k, neutral in unserved.items()
        if k in body.model_fields_set and getattr(body, k, neutral) not in (neutral, [], {})
    )
    if used:
        raise InvalidRequest(
            f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by this "
            "server; leave out (or unset) these parameters"
        )
    return body


def _pydantic_message(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
    )


# -- requests to sampling parameters ---------------------------------------------------


def _requested_max_tokens(body: Any) -> int | None:
    """The output limit the request asks for (chat: ``max_completion_tokens`` first)."""
    chat_limit = body.max_completion_tokens if isinstance(body, ChatRequest) else None
    return chat_limit or body.max_tokens


def _sampling(body: Any, requested: int | None) -> SamplingParams:
    # The real output budget is settled later, against the model's window; this one only
    # has to pass vLLM's checks (min_tokens <= max_tokens).
    placeholder = requested or max(1, body.min_tokens or 0)
    try:
        return body.to_sampling_params(placeholder, {})
    except (ValueError, TypeError, VLLMClientError) as e:
        raise InvalidRequest(f"invalid request: {e}") from None


def _extras(sp: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SAMPLING_EXTRAS:
        value = getattr(sp, name)
        if value == getattr(_DEFAULTS, name) or (value == [] and not getattr(_DEFAULTS, name)):
            continue
        if name == "structured_outputs":
            value = {
                f.name: getattr(value, f.name)
                for f in dataclasses.fields(value)
                if f.init and getattr(value, f.name) != f.default
            }
        out[name] = value
    return out


def generation(body: Any) -> tuple[GenerationParams, int]:
    """The generation parameters of a chat or completion request, and ``n``.

    Raises:
        InvalidRequest: a value vLLM or airi refuses.
    """
    requested = _requested_max_tokens(body)
    sp = _sampling(body, requested)
    params = generation_params(
        {
            "max_tokens": requested,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "stop": list(sp.stop or []),
            "seed": sp.seed,
            "ignore_eos": sp.ignore_eos,
            "extra": _extras(sp),
        }
    )
    return params, sp.n


def choice_params(params: GenerationParams, j: int) -> GenerationParams:
    """The ``j``-th of ``n`` choices: vLLM gives each child of a seeded request seed + j."""
    return params if params.seed is None or j == 0 else params.with_seed(params.seed + j)


def check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise InvalidRequest(
            f"the request asks for {prompts * n} choices ({prompts} prompts, n={n}); at most "
            f"{MAX_CHOICES} are allowed per request"
        )


def prompts_of(body: CompletionRequest) -> list[str | list[int]]:
    """A completion request's prompts: one text, texts, token ids, or lists of them."""
    p = body.prompt
    if p is None:
        raise InvalidRequest("prompt is required")
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        out: list[Any] = [p]
    elif isinstance(p, list):
        out = list(p)
    else:
        raise InvalidRequest("prompt must be a string, a list of strings or token ids")
    if not out:
        raise InvalidRequest("prompt is an empty list; send at least one prompt")
    return out


# -- tools -----------------------------------------------------------------------------


@dataclass
class ToolPlan:
    """How a chat request uses tools: the tools the template shows, and how the answer
    is read (``named``: the output is one function's arguments; ``required``: a JSON list
    of calls; ``auto``: the model's tool parser finds calls, if any)."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    mode: Literal["none", "named", "required", "auto"] = "none"
    function: str | None = None


def tool_plan(body: ChatRequest, tool_parser: str | None) -> ToolPlan:
    """Read ``tools``/``tool_choice``; for ``required`` and a named function, constrain the
    output to the tools' JSON schema (as vLLM's server does), in ``body``.

    Raises:
        InvalidRequest: ``auto`` on a model without a tool parser.
    """
    choice = body.tool_choice
    if not body.tools or choice == "none" or choice is None:
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice == "auto":
        if tool_parser is None:
            raise InvalidRequest(
                f"model {body.model!r} has no tool_parser in its spec, so tool_choice 'auto' "
                "cannot read its tool calls; use tool_choice 'required' or a named function, "
                "or set the model's tool_parser"
            )
        return ToolPlan(tools, "auto")
    try:
        schema = get_json_schema_from_tools(choice, body.tools, body.parallel_tool_calls)
    except (ValueError, VLLMClientError) as e:
        raise InvalidRequest(f"invalid tool_choice: {e}") from None
    if body.structured_outputs is not None or (
        body.response_format is not None and body.response_format.type != "text"
    ):
        raise InvalidRequest(
            "response_format and structured_outputs cannot be combined with tool_choice "
            "'required' or a named function (the tools' schema already shapes the output)"
        )
    from vllm.sampling_params import StructuredOutputsParams

    body.structured_outputs = StructuredOutputsParams(json=schema)
    if choice == "required":
        return ToolPlan(tools, "required")
    return ToolPlan(tools, "named", choice.function.name)  # type: ignore[union-attr]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def read_tool_calls(
    plan: ToolPlan, text: str, body: ChatRequest, parser: Any
) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and tool calls, as the plan reads them."""
    if plan.mode == "named":
        assert plan.function is not None
        return None, [
            ToolCall(id=_call_id(), function=FunctionCall(name=plan.function, arguments=text))
        ]
    if plan.mode == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:  # the output was cut short (max_tokens)
            return text, []
        return None, [
            ToolCall(
                id=_call_id(),
                function=FunctionCall(
                    name=c["name"], arguments=json.dumps(c.get("parameters", {}))
                ),
            )
            for c in calls
            if isinstance(c, dict) and "name" in c
        ]
    if plan.mode == "auto":
        info = parser.extract_tool_calls(text, body)
        if info.tools_called:
            return info.content or None, list(info.tool_calls)
    return text, []


def tool_parser_for(name: str, tokenizer: Any, body: ChatRequest) -> Any:
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser(name)(tokenizer, body.tools)


# -- responses -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(positions: list[Position]) -> ChatCompletionLogProbs:
    return ChatCompletionLogProbs(
        content=[
            ChatCompletionLogProbsContent(
                token=tok,
                logprob=lp if lp is not None else -9999.0,
                bytes=_bytes(tok),
                top_logprobs=[
                    ChatCompletionLogProb(token=t, logprob=v, bytes=_bytes(t)) for t, v in top
                ],
            )
            for tok, lp, top in positions
        ]
    )


def completion_logprobs(positions: list[Position], offset: int = 0) -> CompletionLogProbs:
    """OpenAI's legacy completion logprobs; ``offset``: characters before these tokens."""
    out = CompletionLogProbs()
    for tok, lp, top in positions:
        out.text_offset.append(offset)
        offset += len(tok)
        out.tokens.append(tok)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(({tok: lp} | dict(top)) if lp is not None else None)
    return out


def chat_choice(
    index: int,
    content: str | None,
    tool_calls: list[ToolCall],
    finish: str | None,
    logprobs: ChatCompletionLogProbs | None,
) -> ChatCompletionResponseChoice:
    return ChatCompletionResponseChoice(
        index=index,
        message=ChatMessage(role="assistant", content=content, tool_calls=tool_calls),
        logprobs=logprobs,
        finish_reason=finish,
    )


def completion_choice(
    index: int, text: str, finish: str | None, logprobs: CompletionLogProbs | None
) -> CompletionResponseChoice:
    return CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)


def response(
    chat: bool, rid: str, created: int, model: str, choices: list[Any], use: UsageInfo
) -> dict[str, Any]:
    """A whole chat or completion response, as JSON."""
    cls = ChatCompletionResponse if chat else CompletionResponse
    r = cls(id=rid, created=created, model=model, choices=choices, usage=use)
    return r.model_dump(mode="json", exclude_none=True)


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    *,
    content: str | None = None,
    role: str | None = None,
    tool_calls: list[DeltaToolCall] | None = None,
    finish: str | None = None,
    logprobs: ChatCompletionLogProbs | None = None,
) -> str:
    delta = DeltaMessage(role=role, content=content, tool_calls=tool_calls or [])
    choice = ChatCompletionResponseStreamChoice(
        index=index, delta=delta, logprobs=logprobs, finish_reason=finish
    )
    chunk = ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[choice])
    return _event(chunk.model_dump_json(exclude_none=True))


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish: str | None,
    logprobs: CompletionLogProbs | None = None,
) -> str:
    choice = CompletionResponseStreamChoice(
        index=index, text=text, logprobs=logprobs, finish_reason=finish
    )
    chunk = CompletionStreamResponse(id=rid, created=created, model=model, choices=[choice])
    return _event(chunk.model_dump_json(exclude_none=True))


def usage_chunk(rid: str, created: int, model: str, chat: bool, use: UsageInfo) -> str:
    cls = ChatCompletionStreamResponse if chat else CompletionStreamResponse
    chunk = cls(id=rid, created=created, model=model, choices=[], usage=use)
    return _event(chunk.model_dump_json(exclude_none=True))


def tool_call_deltas(calls: list[ToolCall]) -> list[DeltaToolCall]:
    """Whole tool calls as stream deltas (one per call)."""
    return [
        DeltaToolCall(
            index=i,
            id=c.id,
            type="function",
            function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments),
        )
        for i, c in enumerate(calls)
    ]


def named_call_delta(text: str, first: bool, name: str, call_id: str) -> list[DeltaToolCall]:
    """A named function's arguments streamed as they are generated (vLLM streams them
    the same way): the first delta names the call, later ones add arguments."""
    if first:
        return [
            DeltaToolCall(
                index=0,
                id=call_id,
                type="function",
                function=DeltaFunctionCall(name=name, arguments=text),
            )
        ]
    return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]


def _event(data: str) -> str:
    return f"data: {data}\n\n"
