"""What a model call asks for, validated once for every surface (HTTP, Python, graphs).

Each check raises ``InvalidRequest`` with a message that names the field, the value and
what is allowed, so the HTTP layer and the Python client report the same thing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from airi_ray.core.errors import ContextWindowExceeded, InvalidRequest

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_MESSAGES = 512  # a conversation longer than this is a client bug or abuse
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed seed, as vLLM's server takes it
MAX_STOP = 4  # stop strings per request, as OpenAI allows

# vLLM ``SamplingParams`` arguments a call may set besides the basic ones, passed to the
# engine as given: the engine validates them (a bad value fails that request alone with
# 400), and the HTTP API has already checked them with vLLM's own request models.
SAMPLING_EXTRAS = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "top_k",
        "min_p",
        "min_tokens",
        "stop_token_ids",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "logprobs",  # top log-probabilities per output token (0: the sampled token's only)
        "prompt_logprobs",  # the same for the prompt's tokens
        "structured_outputs",  # a dict of vLLM's StructuredOutputsParams fields
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    }
)


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one generation; ``max_tokens=None`` means "up to the window"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # names in SAMPLING_EXTRAS

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest(f"stop must be at most {MAX_STOP} non-empty strings")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise InvalidRequest(
                f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {self.seed!r}"
            )
        unknown = sorted(set(self.extra) - SAMPLING_EXTRAS)
        if unknown:
            raise InvalidRequest(
                f"unknown generation arguments {', '.join(unknown)}; besides max_tokens, "
                "temperature, top_p, stop, seed and ignore_eos the allowed ones are "
                + ", ".join(sorted(SAMPLING_EXTRAS))
            )
        logprobs = self.extra.get("logprobs")
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0
        ):
            raise InvalidRequest(f"logprobs must be a whole number >= 0, got {logprobs!r}")

    @property
    def logprobs(self) -> int | None:
        """Top log-probabilities asked for per output token (None: none at all)."""
        return self.extra.get("logprobs")

    def with_seed(self, seed: int | None) -> GenerationParams:
        return dataclasses.replace(self, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.extra) | {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }


def generation_params(kwargs: dict[str, Any]) -> GenerationParams:
    """``GenerationParams`` from keyword arguments (``stop`` may be one string; names in
    ``SAMPLING_EXTRAS`` go to ``extra``).

    Raises:
        InvalidRequest: an unknown argument or a bad value.
    """
    kwargs = dict(kwargs)
    stop = kwargs.pop("stop", None)
    extra = dict(kwargs.pop("extra", None) or {})
    extra |= {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_EXTRAS}
    try:
        return GenerationParams(
            stop=tuple([stop] if isinstance(stop, str) else stop or ()), extra=extra, **kwargs
        )
    except TypeError as e:
        raise InvalidRequest(f"unknown generation argument: {e}") from None


def structured_output(fmt: Any) -> tuple[dict[str, Any], Callable[[str], Any]]:
    """What ``response_format`` asks of the engine (vLLM ``structured_outputs`` fields)
    and how to read the answer: a pydantic model class (the answer is parsed into it), or
    OpenAI's ``{"type": "json_object"}`` / ``{"type": "json_schema", "json_schema":
    {"schema": ...}}`` (the answer is parsed as JSON).

    Raises:
        InvalidRequest: any other value.
    """
    if isinstance(fmt, type) and issubclass(fmt, BaseModel):
        return {"json": fmt.model_json_schema()}, fmt.model_validate_json
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"json_object": True}, json.loads
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema")
        if isinstance(schema, dict):
            return {"json": schema}, json.loads
    raise InvalidRequest(
        "response_format must be a pydantic model class, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
    )


# Priority classes of a call, most urgent first.
PRIORITIES: tuple[str, ...] = ("interactive", "batch")


def check_priority(priority: object) -> None:
    """Raise ``InvalidRequest`` unless ``priority`` is one of ``PRIORITIES``."""
    if priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")


def cap_priority(requested: str, cap: str) -> str:
    """``requested``, or ``cap`` if ``requested`` is more urgent than it."""
    return max(requested, cap, key=PRIORITIES.index)


@dataclass(frozen=True)
class CallOptions:
    """How the scheduler treats one call: its priority class within the tenant's queue, a
    deadline to start by (seconds from now; it orders the queue), and a conversation id for
    session affinity (later turns go to the replica that holds the conversation's cache)."""

    priority: str = "interactive"
    deadline_s: float | None = None
    session_id: str | None = None
    version: str | None = None  # pins the call to one version, whatever the traffic split
    # (the runtime's data jobs: a collection is embedded by one version only)

    def __post_init__(self) -> None:
        check_priority(self.priority)
        if self.deadline_s is not None and (
            isinstance(self.deadline_s, bool)
            or not isinstance(self.deadline_s, int | float)
            or not self.deadline_s > 0
        ):
            raise InvalidRequest(f"deadline_s must be a positive number, got {self.deadline_s!r}")
        if self.session_id is not None and (
            not isinstance(self.session_id, str) or not 0 < len(self.session_id) <= 256
        ):
            raise InvalidRequest("session_id must be a string of 1 to 256 characters")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # An assistant turn's calls of tools (OpenAI ``tool_calls`` objects), and a tool
    # turn's answer to one of them (``tool_call_id``): the chat template renders both.
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None

    def turn(self, content: str | None = None) -> dict[str, Any]:
        """The message as a chat template reads it, with ``content`` in place of its own."""
        out: dict[str, Any] = {
            "role": self.role,
            "content": self.content if content is None else content,
        }
        if self.tool_calls:
            out["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _tool_calls(i: int, calls: Any) -> tuple[dict[str, Any], ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        for c in calls
    ):
        raise InvalidRequest(
            f"messages[{i}].tool_calls must be a list of "
            '{"id", "type": "function", "function": {"name", "arguments"}} objects'
        )
    out = []
    for c in calls:
        args = c["function"].get("arguments", "{}")
        if isinstance(args, str):  # templates iterate arguments as a mapping
            try:
                args = json.loads(args) if args else {}
            except json.JSONDecodeError:
                raise InvalidRequest(
                    f"messages[{i}].tool_calls: arguments of {c['function']['name']!r} "
                    "are not valid JSON"
                ) from None
        out.append(
            {
                "id": str(c.get("id", "")),
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": args},
            }
        )
    return tuple(out)


def parse_messages(messages: Any) -> list[ChatMessage]:
    """Validate OpenAI-style chat messages (a non-empty list of ``{role, content}``; an
    assistant turn may carry ``tool_calls`` instead of content, a tool turn names the call
    it answers with ``tool_call_id``)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(
            f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are allowed"
        )
    parsed = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            parsed.append(m)
            continue
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        calls = _tool_calls(i, m.get("tool_calls")) if role == "assistant" else ()
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequest(f"messages[{i}].content parts must all be of type 'text'")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(
                f"messages[{i}].content must be a string, got {type(content).__name__}"
            )
        call_id = m.get("tool_call_id") if role == "tool" else None
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidRequest(f"messages[{i}].tool_call_id must be a string")
        parsed.append(ChatMessage(role, content, calls, call_id))
    if not any(m.content or m.tool_calls for m in parsed):
        raise InvalidRequest("every message's content is empty; send some text")
    return parsed


def resolve_max_tokens(
    model: str, prompt_tokens: int, max_tokens: int | None, max_model_len: int
) -> int:
    """The output budget of a request, refusing what can never fit the context window.

    Raises:
        ContextWindowExceeded: prompt plus ``max_tokens`` is longer than ``max_model_len``.
    """
    if max_tokens is None:
        if prompt_tokens >= max_model_len:
            raise ContextWindowExceeded(
                f"model {model!r} has a context window of {max_model_len} tokens; the prompt "
                f"alone has {prompt_tokens} tokens, which leaves no room for output"
            )
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextWindowExceeded(
            f"model {model!r} has a context window of {max_model_len} tokens; the prompt has "
            f"{prompt_tokens} tokens and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} "
            f"in all). Shorten the prompt or lower max_tokens to at most "
            f"{max(max_model_len - prompt_tokens, 0)}."
        )
    return max_tokens


# One position's log-probabilities: the token's text, its log-probability (None for the
# first prompt token) and the most likely tokens there, most likely first.
Position = tuple[str, float | None, list[tuple[str, float]]]


@dataclass
class Logprobs:
    """Log-probabilities of one step's new tokens (and, on the first step, the prompt's)."""

    tokens: list[Position]
    prompt: list[Position] | None = None


@dataclass
class Usage:
    """Token counts and timings of one finished call, reported at release."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


# A prompt over this many characters per token of the context window is first probed: its
# head alone is tokenized, and if that is already over the window the prompt is refused
# without tokenizing the rest (a megabyte flood then costs milliseconds, not seconds).
PROBE_CHARS_PER_TOKEN = 16


def probe_head(text: str, max_model_len: int) -> str | None:
    """The head of ``text`` to tokenize first, or None when the whole is short enough to
    tokenize at once. The head ends before a whitespace, where word-level pre-tokenizers
    split, so its tokens are tokens of the whole: if the head is over the window, so is
    the whole. A head with no whitespace to cut at is not probed (None)."""
    size = PROBE_CHARS_PER_TOKEN * max_model_len
    if len(text) <= 2 * size:
        return None
    cut = max(text.rfind(c, 0, size) for c in " \n\t")
    return text[:cut] if cut > 0 else None


# Pre-tokenizers (as the ``tokenizers`` library names them) that cut text at least at every
# run of Unicode white space: each word of the text is then at least one pre-token, and
# each pre-token at least one token, so a text has at least as many tokens as words.
# (Not Metaspace: it cuts at ASCII spaces only. Not a ByteLevel without its regex: one
# pre-token for the whole text.) With a normalizer in front the words are not counted.
WORD_SPLITTING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
)
# Characters ``str.split`` cuts at that are not Unicode white space: joined to the words
# next to them, so the count never exceeds the pre-tokenizer's.
_NOT_WHITE_SPACE = str.maketrans({c: "_" for c in "\x1c\x1d\x1e\x1f"})


def words_floor(text: str, pre_tokenizer: str | None, normalized: bool) -> int | None:
    """A number of tokens ``text`` has at least, counted without tokenizing it: its words,
    where the tokenizer cuts at white space (``WORD_SPLITTING_PRE_TOKENIZERS``, with no
    normalizer: ``normalized`` False), else None. Counting the words of a 16k-character
    head takes about a hundredth of the time tokenizing it does."""
    if normalized or pre_tokenizer not in WORD_SPLITTING_PRE_TOKENIZERS:
        return None
    return len(text.translate(_NOT_WHITE_SPACE).split())


def refuse_long_head(model: str, head: str, head_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt whose head (``probe_head``) alone fills the context window.

    Raises:
        ContextWindowExceeded: ``head_tokens`` is at least ``max_model_len``.
    """
    if head_tokens >= max_model_len:
        raise ContextWindowExceeded(
            f"model {model!r} has a context window of {max_model_len} tokens; the prompt's "
            f"first {len(head)} characters alone have at least {head_tokens} tokens, which "
            "leaves no room for output"
        )
