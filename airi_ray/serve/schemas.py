"""Request bodies of the OpenAI-compatible API (pydantic), validated before any work."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    # Unknown OpenAI parameters are ignored, as OpenAI-compatible servers do; known ones are
    # validated strictly so a wrong type or range is a 400, never a 500.
    model_config = ConfigDict(extra="ignore", strict=False)


class StreamOptions(_Body):
    include_usage: bool = False


def _refuse_unsupported(data: Any, unsupported: dict[str, Any]) -> Any:
    """Refuse OpenAI parameters this server knows but does not serve yet, when a request
    sets them to anything but their neutral value: a caller asking for JSON, tool calls or
    log-probabilities must not get a 200 without them. ``unsupported`` maps each name to
    a predicate that is true for the neutral values."""
    if isinstance(data, dict):
        used = sorted(k for k, neutral in unsupported.items() if k in data and not neutral(data[k]))
        if used:
            raise ValueError(
                f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by this "
                "server yet; leave out (or unset) these parameters"
            )
    return data


def _unset(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, list | dict) and not v)


_CHAT_UNSUPPORTED = {
    "logprobs": _unset,
    "top_logprobs": lambda v: v is None or v == 0,
    "tools": _unset,
    "functions": _unset,
    "tool_choice": lambda v: v is None or v == "none",
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": _unset,
}
_COMPLETION_UNSUPPORTED = {
    "logprobs": lambda v: v is None,
    "echo": _unset,
    "best_of": lambda v: v is None or (v == 1 and v is not True),
    "suffix": lambda v: v is None or v == "",
    "logit_bias": _unset,
}


class SamplingRequest(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Output token limit.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS.")
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="airi extension: priority class within the tenant's queue."
    )
    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="airi extension: conversation id; later turns go to the same replica.",
    )

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def options(self) -> dict[str, Any]:
        return {"priority": self.priority, "session_id": self.session_id}

    def params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="airi extension: a stored conversation; its earlier turns go before "
        "`messages`, and the new turns and the answer are appended to it.",
    )

    _unsupported = model_validator(mode="before")(
        lambda data: _refuse_unsupported(data, _CHAT_UNSUPPORTED)
    )

    def params(self) -> dict[str, Any]:
        return super().params() | {"max_tokens": self.max_completion_tokens or self.max_tokens}


class CompletionRequest(SamplingRequest):
    prompt: str

    _unsupported = model_validator(mode="before")(
        lambda data: _refuse_unsupported(data, _COMPLETION_UNSUPPORTED)
    )


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    priority: Literal["interactive", "batch"] = "interactive"


class GraphRunRequest(_Body):
    input: dict[str, Any] = Field(default_factory=dict, description="The graph's input fields.")
    priority: Literal["interactive", "batch"] = "interactive"
    token_budget: int | None = Field(None, ge=1, description="Tokens all the run's calls may use.")
    deadline_s: float | None = Field(None, gt=0, le=86400, description="End-to-end deadline.")
    wait: bool = Field(True, description="Answer when the run ends; false: 202 with its id.")

    def options(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "token_budget": self.token_budget,
            "deadline_s": self.deadline_s,
        }


class FeatureEventsRequest(_Body):
    events: list[Any] = Field(min_length=1, max_length=10_000, description="Events to store.")


class FeedbackRequest(_Body):
    id: str = Field(
        min_length=1,
        max_length=256,
        description="A completion's `id` (chatcmpl-...) or a graph run's `run_id`.",
    )
    score: float | None = Field(None, ge=-1, le=1, description="From -1 (bad) to 1 (good).")
    rating: Literal["up", "down"] | None = Field(None, description="Thumbs: up is 1, down -1.")

    @model_validator(mode="after")
    def _one_score(self) -> FeedbackRequest:
        if (self.score is None) == (self.rating is None):
            raise ValueError("give either score (-1 to 1) or rating ('up' or 'down')")
        return self

    def value(self) -> float:
        if self.rating is not None:
            return 1.0 if self.rating == "up" else -1.0
        assert self.score is not None
        return self.score
