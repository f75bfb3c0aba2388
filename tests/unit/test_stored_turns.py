"""What a conversation stores: turns pass the tenant's input filters before they are written,
and a retried request (one idempotency key) is told apart from the rest of the conversation."""

from __future__ import annotations

import pytest

from airi_ray.core.context import retried
from airi_ray.core.errors import Conflict
from airi_ray.core.policy import ContentBlocked, FilterConfig, FilterSet, filter_turns


def test_turns_are_stored_as_the_filters_pass_them() -> None:
    filters = FilterSet(FilterConfig(email="redact", phone="off"))
    turns = [
        {"role": "user", "content": "mail jane.doe@example.com or call 415-555-0100", "seq": 4},
        {"role": "tool", "content": "owner: bob@example.org"},
        {"role": "assistant", "content": "noted"},
    ]
    stored = filter_turns(filters, turns)
    assert stored == [
        {"role": "user", "content": "mail [EMAIL] or call 415-555-0100", "seq": 4},
        {"role": "tool", "content": "owner: [EMAIL]"},
        {"role": "assistant", "content": "noted"},
    ]
    assert turns[0]["content"].startswith("mail jane.doe")  # the caller's turns are untouched


def test_no_filters_store_the_turns_as_given() -> None:
    turns = [{"role": "user", "content": "jane.doe@example.com"}]
    assert filter_turns(None, turns) == turns
    assert filter_turns(None, turns)[0] is not turns[0]


def test_a_blocked_turn_is_refused_and_names_where_it_was() -> None:
    filters = FilterSet(FilterConfig(blocklist=("zzyzx",)))
    with pytest.raises(ContentBlocked, match="blocked phrases"):
        filter_turns(filters, [{"role": "user", "content": "say zzyzx"}])
    with pytest.raises(ContentBlocked, match="document"):
        filter_turns(filters, [{"role": "tool", "content": "zzyzx"}])


def test_malformed_turns_are_left_for_the_store_to_refuse() -> None:
    filters = FilterSet(FilterConfig())
    odd = ["not a turn", {"role": "user", "content": 5}, {"role": "user"}]
    assert filter_turns(filters, odd) == odd


def turn(role: str, content: str, request_id: str | None = None, **extra: str) -> dict:
    return {"role": role, "content": content, **extra} | (
        {"request_id": request_id} if request_id else {}
    )


HISTORY = [
    turn("user", "hi", "k0"),
    turn("assistant", "hello", "k0"),
    turn("user", "mail [EMAIL]", "k1"),
    turn("assistant", "done", "k1", finish_reason="length"),
]


def test_a_completed_request_gives_its_answer_and_leaves_the_window() -> None:
    retry = retried(HISTORY, "k1", [turn("user", "mail [EMAIL]")])
    assert retry.history == HISTORY[:2]
    assert retry.answer == HISTORY[3]


def test_a_request_not_stored_yet_is_no_retry() -> None:
    retry = retried(HISTORY, "k9", [turn("user", "anything")])
    assert retry.history == HISTORY and retry.answer is None


def test_a_request_stored_without_its_answer_only_leaves_the_window() -> None:
    history = [*HISTORY[:2], turn("user", "half", "k2")]
    retry = retried(history, "k2", [turn("user", "half")])
    assert retry.history == HISTORY[:2] and retry.answer is None


def test_a_key_reused_for_other_messages_is_a_conflict() -> None:
    for asked in ([turn("user", "something else")], [], [turn("tool", "mail [EMAIL]")]):
        with pytest.raises(Conflict, match="Idempotency-Key 'k1' was used for other messages"):
            retried(HISTORY, "k1", asked)
