"""The engine's KV cache events translated into the router's block hashes."""

from __future__ import annotations

import pytest

from airi_ray.core.kv_events import CacheDelta, CacheMirror
from airi_ray.core.routing import block_hashes

PROMPT = list(range(1000, 1000 + 300))


def test_stored_blocks_become_the_hashes_a_prompt_with_those_tokens_has() -> None:
    m = CacheMirror()
    # An engine with 128-token blocks stores the first two full blocks of PROMPT, one event
    # each (the second a child of the first), as vLLM does after a prefill.
    m.stored([b"e1"], None, PROMPT[:128], 128)
    m.stored([b"e2"], b"e1", PROMPT[128:256], 128)
    delta = m.take()
    assert delta.stored == block_hashes(PROMPT)[:16]  # 256 tokens = 16 router blocks
    assert delta.removed == () and not delta.cleared
    assert not m.take()  # taken: nothing changed since


def test_several_blocks_in_one_event_chain_from_each_other() -> None:
    m = CacheMirror()
    m.stored([1, 2], None, PROMPT[:64], 32)
    assert m.take().stored == block_hashes(PROMPT[:64])


def test_a_removed_block_takes_its_hashes_away() -> None:
    m = CacheMirror()
    m.stored([1, 2], None, PROMPT[:64], 32)
    m.take()
    m.removed([2, 99])  # 99 was never stored: ignored
    delta = m.take()
    assert delta.removed == block_hashes(PROMPT[:64])[2:] and delta.stored == ()
    assert len(m) == 1


def test_a_block_stored_and_evicted_between_reports_is_not_reported() -> None:
    m = CacheMirror()
    m.stored([1], None, PROMPT[:32], 32)
    m.take()
    m.stored([2], 1, PROMPT[32:64], 32)
    m.removed([2])
    delta = m.take()
    assert delta.stored == () and delta.removed == block_hashes(PROMPT[:64])[2:]


def test_a_block_whose_parent_was_never_seen_is_dropped_and_counted() -> None:
    m = CacheMirror()
    m.stored([7, 8], 6, PROMPT[:64], 32)
    assert not m.take() and m.unknown_parents == 2 and len(m) == 0


def test_a_clear_drops_what_came_before_and_a_snapshot_holds_everything() -> None:
    m = CacheMirror()
    m.stored([1], None, PROMPT[:32], 32)
    m.cleared()
    m.stored([3], None, PROMPT[100:132], 32)
    delta = m.take()
    assert delta == CacheDelta(block_hashes(PROMPT[100:132]), (), True)
    m.stored([4], 3, PROMPT[132:164], 32)
    snap = m.snapshot()
    assert snap.cleared and snap.removed == ()
    assert snap.stored == block_hashes(PROMPT[100:164])
    assert not m.take()  # the snapshot took the pending change too


def test_engine_blocks_must_be_whole_router_blocks() -> None:
    m = CacheMirror()
    with pytest.raises(ValueError, match="not a whole number of 16-token"):
        m.stored([1], None, PROMPT[:24], 24)
    with pytest.raises(ValueError, match="2 blocks of 32 tokens, got 40 ids"):
        m.stored([1, 2], None, PROMPT[:40], 32)


def test_block_hashes_from_a_parent_continue_the_chain() -> None:
    whole = block_hashes(PROMPT[:64])
    assert block_hashes(PROMPT[32:64], parent=whole[1]) == whole[2:]
