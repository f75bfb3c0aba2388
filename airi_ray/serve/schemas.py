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

    def params(self) -> dict[str, Any]:
        return super().params() | {"max_tokens": self.max_completion_tokens or self.max_tokens}


class CompletionRequest(SamplingRequest):
    prompt: str


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
