"""Request bodies of airi's own routes (pydantic), validated before any work. The OpenAI
routes use vLLM's request models (``serve/protocol.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    # Unknown fields are ignored, as on the OpenAI routes; known ones are validated strictly
    # so a wrong type or range is a 400, never a 500.
    model_config = ConfigDict(extra="ignore", strict=False)


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
    events: list[Any] = Field(
        min_length=1,
        max_length=10_000,
        description="Events to store, as the caller's tenant's (unless the view's `tenants` "
        "share them); an optional `event_id` per event makes a retried push count once.",
    )


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
