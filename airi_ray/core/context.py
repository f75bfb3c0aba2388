"""Fit retrieved chunks and conversation turns into a model's token budget.

``build_context`` returns the messages to send: one system message holding the system prompt
and the chosen chunks, each prefixed by its citation id (``[doc-3#2] ...``) so the model can
cite it, then the most recent turns that fit. What goes in, in this order of priority:

1. the system prompt and the last user turn (with any turn after it): always, or
   ``ContextWindowExceeded`` when even they do not fit;
2. chunks, best score first; a chunk that does not fit is skipped, and a smaller one after
   it may still fit (retrieved knowledge is what the answer is grounded on, so it comes
   before old conversation);
3. earlier turns, newest first, until one does not fit: that one and everything older are
   dropped (a conversation with a hole in the middle reads as a different conversation).

Tokens are counted with the caller's ``count_tokens`` on each message's content, and the
system message is recounted whole whenever a chunk is tried, so the total is exact for the
given counter even when a tokenizer merges text across a chunk boundary. Both the data
plane (retrieval) and the conversation store build their prompts with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from airi_ray.core.errors import Conflict, ContextWindowExceeded, InvalidRequest

CONTEXT_HEADER = "Context (cite a source by its [id]):"
_ROLES = ("system", "user", "assistant", "tool")


class ChunkLike(Protocol):
    """What the builder needs of a retrieved chunk (a search hit satisfies it)."""

    @property
    def id(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class Chunk:
    """A chunk as the builder takes it, from a hit as a graph's state holds it (a dict)."""

    id: str
    text: str
    score: float = 0.0

    @classmethod
    def of(cls, hit: ChunkLike | Mapping[str, Any]) -> ChunkLike:
        """``hit`` itself, or the chunk of a ``{"id", "text", "score"}`` mapping."""
        if not isinstance(hit, Mapping):
            return hit
        try:
            return cls(str(hit["id"]), str(hit["text"]), float(hit.get("score", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequest(
                f"a chunk needs an 'id', a 'text' and a numeric 'score', got {sorted(hit)}"
            ) from e


@dataclass(frozen=True)
class ContextWindow:
    """The prompt to send and what was left out of it.

    Attributes:
        messages: ``{"role", "content"}`` dicts: the system message (when it has content),
            then the kept turns in their original order.
        cited_ids: ids of the chunks placed in the system message, best score first.
        tokens_used: tokens of all messages' contents, by ``count_tokens``.
        dropped_chunk_ids: chunks that did not fit, best score first.
        dropped_turns: how many of the oldest turns were left out.
    """

    messages: tuple[dict[str, str], ...]
    cited_ids: tuple[str, ...]
    tokens_used: int
    dropped_chunk_ids: tuple[str, ...]
    dropped_turns: int


def format_chunk(chunk: ChunkLike) -> str:
    """One chunk as it appears in the system message: ``[id] text``."""
    return f"[{chunk.id}] {chunk.text}"


def _system_content(system: str, chunks: Sequence[ChunkLike]) -> str:
    if not chunks:
        return system
    block = "\n\n".join([CONTEXT_HEADER, *(format_chunk(c) for c in chunks)])
    return f"{system}\n\n{block}" if system else block


def _check_turns(turns: Sequence[Mapping[str, str]]) -> int:
    """Index of the last user turn, after checking every turn's shape."""
    last_user = -1
    for i, turn in enumerate(turns):
        role, content = turn.get("role"), turn.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise InvalidRequest(
                f"turn {i} must have a role in {', '.join(_ROLES)} and a string content; "
                f"got role={role!r} and content of type {type(content).__name__}"
            )
        if role == "user":
            last_user = i
    if last_user < 0:
        raise InvalidRequest("the conversation needs at least one user turn; got none")
    return last_user


def build_context(
    system: str,
    chunks: Sequence[ChunkLike],
    turns: Sequence[Mapping[str, str]],
    budget_tokens: int,
    count_tokens: Callable[[str], int],
    reserve_output: int = 0,
) -> ContextWindow:
    """Choose the chunks and turns that fit in ``budget_tokens - reserve_output`` tokens.

    Args:
        system: the system prompt (may be empty).
        chunks: retrieved chunks, in any order (they are ranked by score here; equal scores
            keep the given order).
        turns: the conversation, oldest first, as ``{"role", "content"}`` dicts.
        budget_tokens: the model's context window (or the share of it for the prompt).
        count_tokens: tokens of a string, in the target model's tokenizer.
        reserve_output: tokens kept free for the answer.

    Raises:
        InvalidRequest: a turn is malformed, there is no user turn, or ``reserve_output``
            is negative.
        ContextWindowExceeded: the system prompt and the last user turn alone do not fit.
    """
    if reserve_output < 0:
        raise InvalidRequest(f"reserve_output must not be negative, got {reserve_output}")
    last_user = _check_turns(turns)
    budget = budget_tokens - reserve_output

    required_turns = list(turns[last_user:])
    turn_tokens = [count_tokens(t["content"]) for t in turns]
    used_by_turns = sum(turn_tokens[last_user:])
    system_tokens = count_tokens(system) if system else 0
    if system_tokens + used_by_turns > budget:
        raise ContextWindowExceeded(
            f"the system prompt ({system_tokens} tokens) and the last user message "
            f"({used_by_turns} tokens) need {system_tokens + used_by_turns} tokens, more than "
            f"the {budget} allowed (context of {budget_tokens} minus {reserve_output} "
            "reserved for the answer); shorten the message or the system prompt"
        )

    ranked = sorted(chunks, key=lambda c: -c.score)  # stable: ties keep the given order
    chosen: list[ChunkLike] = []
    dropped: list[str] = []
    for chunk in ranked:
        tokens = count_tokens(_system_content(system, [*chosen, chunk]))
        if tokens + used_by_turns <= budget:
            chosen.append(chunk)
            system_tokens = tokens
        else:
            dropped.append(chunk.id)

    kept_from = last_user
    while kept_from > 0 and system_tokens + used_by_turns + turn_tokens[kept_from - 1] <= budget:
        kept_from -= 1
        used_by_turns += turn_tokens[kept_from]

    content = _system_content(system, chosen)
    head = [{"role": "system", "content": content}] if content else []
    kept = [dict(t) for t in turns[kept_from:last_user]] + [dict(t) for t in required_turns]
    return ContextWindow(
        messages=tuple(head + kept),
        cited_ids=tuple(c.id for c in chosen),
        tokens_used=system_tokens + used_by_turns,
        dropped_chunk_ids=tuple(dropped),
        dropped_turns=kept_from,
    )


@dataclass(frozen=True)
class Retry:
    """What a conversation holds of a request named by an idempotency key."""

    history: list[Mapping[str, Any]]  # the conversation without the request's own turns
    answer: Mapping[str, Any] | None  # its stored answer, if its first attempt completed


def retried(
    history: Sequence[Mapping[str, Any]], request_id: str, asked: Sequence[Mapping[str, Any]]
) -> Retry:
    """Split the turns a request stored already (its first attempt's) from the rest of
    the conversation: the model reads the exchange once, and a completed one is the
    retry's answer. ``asked`` are the retry's turns as they would be stored (filtered).

    Raises:
        Conflict: the stored turns of ``request_id`` are not ``asked`` (the key was used
            for other messages).
    """
    first = [t for t in history if t.get("request_id") == request_id]
    rest = [t for t in history if t.get("request_id") != request_id]
    if not first:
        return Retry(rest, None)
    done = first[-1]["role"] == "assistant"
    said = first[:-1] if done else first
    if [(t["role"], t["content"]) for t in said] != [(t["role"], t["content"]) for t in asked]:
        raise Conflict(
            f"Idempotency-Key {request_id!r} was used for other messages in this conversation; "
            "a retry must resend the same messages, a new request needs a new key"
        )
    return Retry(rest, first[-1] if done else None)
