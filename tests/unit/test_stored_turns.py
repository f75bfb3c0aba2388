"""What a conversation stores: turns pass the tenant's input filters before they are written."""

from __future__ import annotations

import pytest

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
