"""The pure half of ``AiriChatModel``: LangChain messages and tools to airi's chat call,
and airi's answer back to LangChain's ``AIMessage``, with no Ray and no I/O.

Messages are converted by LangChain's own ``convert_to_openai_messages``, tools by its
``convert_to_openai_tool``; what is left here is what airi's chat call needs besides: the
JSON schema that constrains an answer to the tools (``tool_choice`` "required" or a named
function, as vLLM's OpenAI server builds it), reading tool calls out of the answer's text
(invalid JSON becomes an ``invalid_tool_call``, as LangChain's OpenAI models do), and the
run identity a LangGraph run's config carries (``thread_id``, budget, deadline).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.runs import RunOptions

# Keys of ``config["configurable"]`` that give a LangGraph run airi's run limits.
BUDGET_KEY = "airi_token_budget"
DEADLINE_KEY = "airi_deadline_s"
PRIORITY_KEY = "airi_priority"
# Hermes-style tool calls (Qwen, Hermes, many others): ``<tool_call>{json}</tool_call>``.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def to_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the OpenAI-style dicts airi's chat call takes."""
    out = convert_to_openai_messages(list(messages))
    return [dict(m) for m in (out if isinstance(out, list) else [out])]


def tool_choice_name(tool_choice: Any) -> str | None:
    """``tool_choice`` in OpenAI's form ("none", "auto", "required", or a function name),
    from what LangChain's ``bind_tools`` passes (a name, "any", True, or OpenAI's dict).

    Raises:
        InvalidRequest: any other value.
    """
    if tool_choice is None:
        return None
    if tool_choice is True or tool_choice == "any":
        return "required"
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if isinstance(name, str):
            return name
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' (or 'any'), a tool's name, or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}; got {tool_choice!r}"
    )


def tools_schema(tools: Sequence[Mapping[str, Any]], choice: str | None) -> dict[str, Any] | None:
    """The JSON schema the answer is generated to for ``choice`` ("required": a list of
    ``{"name", "parameters"}`` calls; a name: that function's arguments), as vLLM's OpenAI
    server constrains it; None for "auto" and "none" (the answer is free text).

    Raises:
        InvalidRequest: ``choice`` names no bound tool, or tools are needed and none bound.
    """
    if choice in (None, "auto", "none"):
        return None
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if not functions:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools: bind some with bind_tools")
    if choice == "required":
        return {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [name]},
                            "parameters": f.get("parameters") or {"type": "object"},
                        },
                        "required": ["name", "parameters"],
                    }
                    for name, f in functions.items()
                ]
            },
        }
    if choice not in functions:
        raise InvalidRequest(
            f"tool_choice names {choice!r}, which is not a bound tool; bound: "
            + ", ".join(sorted(functions))
        )
    return dict(functions[choice].get("parameters") or {"type": "object"})


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _read_call(name: str | None, raw: str) -> ToolCall | InvalidToolCall:
    """One call's arguments (JSON text) as a ``tool_call``, or an ``invalid_tool_call``."""
    try:
        args = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        return invalid_tool_call(name=name, args=raw, id=_call_id(), error=f"invalid JSON: {e}")
    if not isinstance(args, dict) or name is None:
        return invalid_tool_call(
            name=name, args=raw, id=_call_id(), error="arguments must be a JSON object"
        )
    return tool_call(name=name, args=args, id=_call_id())


@dataclass(frozen=True)
class ToolAnswer:
    """An answer read for tools: its text (None when it is only calls) and its calls."""

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]


def read_tool_calls(text: str, choice: str | None, bound: bool) -> ToolAnswer:
    """The tool calls of an answer generated under ``choice`` (see ``tools_schema``):
    a named function's arguments, a "required" list of calls, or for "auto" the Hermes
    ``<tool_call>{"name", "arguments"}</tool_call>`` blocks in the text."""
    calls: list[ToolCall] = []
    bad: list[InvalidToolCall] = []

    def add(call: ToolCall | InvalidToolCall) -> None:
        (bad if call.get("type") == "invalid_tool_call" else calls).append(call)  # type: ignore[arg-type]

    if not bound or choice == "none":
        return ToolAnswer(text, [], [])
    if choice not in (None, "auto", "required"):
        add(_read_call(choice, text))
        return ToolAnswer("", calls, bad)
    if choice == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:  # cut short (max_tokens)
            bad.append(invalid_tool_call(args=text, id=_call_id(), error=f"invalid JSON: {e}"))
            return ToolAnswer("", [], bad)
        for item in items if isinstance(items, list) else [items]:
            name = item.get("name") if isinstance(item, dict) else None
            add(_read_call(name, json.dumps(item.get("parameters", {})) if name else str(item)))
        return ToolAnswer("", calls, bad)
    for block in _TOOL_CALL.findall(text):
        try:
            item = json.loads(block)
        except json.JSONDecodeError as e:
            bad.append(invalid_tool_call(args=block, id=_call_id(), error=f"invalid JSON: {e}"))
            continue
        name = item.get("name") if isinstance(item, dict) else None
        args = item.get("arguments", item.get("parameters", {})) if name else item
        add(_read_call(name, args if isinstance(args, str) else json.dumps(args)))
    return ToolAnswer(_TOOL_CALL.sub("", text).strip(), calls, bad)


def usage_metadata(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def ai_message(
    answer: ToolAnswer,
    model: str,
    finish_reason: str | None,
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> AIMessage:
    """The ``AIMessage`` of a finished airi chat call."""
    finish = "tool_calls" if answer.tool_calls else finish_reason
    return AIMessage(
        content=answer.content,
        tool_calls=answer.tool_calls,
        invalid_tool_calls=answer.invalid_tool_calls,
        id=request_id,
        usage_metadata=usage_metadata(prompt_tokens, completion_tokens),
        response_metadata={"model_name": model, "finish_reason": finish},
    )


@dataclass(frozen=True)
class RunIdentity:
    """What a LangGraph run carries into each of its model calls: its id (the thread id),
    the node calling, and the airi run options (budget, deadline, priority)."""

    run_id: str
    node: str
    options: RunOptions


def run_identity(config: Mapping[str, Any] | None) -> RunIdentity | None:
    """The run identity in a LangGraph ``RunnableConfig``: ``configurable.thread_id`` is
    the run id, ``airi_token_budget`` / ``airi_deadline_s`` / ``airi_priority`` its limits;
    None outside a thread (a plain call).

    Raises:
        InvalidRequest: a bad thread id or limit.
    """
    configurable = (config or {}).get("configurable") or {}
    thread = configurable.get("thread_id")
    if thread is None:
        return None
    if not isinstance(thread, str | int) or not 0 < len(str(thread)) <= 256:
        raise InvalidRequest(f"thread_id must be a string of 1 to 256 characters, got {thread!r}")
    metadata = (config or {}).get("metadata") or {}
    node = metadata.get("langgraph_node") or "-"
    options = RunOptions(
        priority=configurable.get(PRIORITY_KEY, "interactive"),
        token_budget=configurable.get(BUDGET_KEY),
        deadline_s=configurable.get(DEADLINE_KEY),
    )
    return RunIdentity(str(thread), str(node), options)


def trace_id(run_id: str) -> int:
    """The OpenTelemetry trace id of an external run: every call of the run, in any
    process and across resumes, lands in one trace."""
    return int.from_bytes(hashlib.sha256(f"airi-run:{run_id}".encode()).digest()[:16], "big") or 1
