"""Block hashes, bounded LRUs and the replica choice, without a scheduler around them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airi_ray.core.routing import (
    BoundedLRU,
    ReplicaState,
    ReplicaView,
    block_hashes,
    choose_replica,
)


def state(
    rid: str, cap: int = 8, in_flight: int = 0, accel: str = "CPU", kv: int | None = None
) -> ReplicaState:
    return ReplicaState(
        ReplicaView(rid, "m", cap, accel, kv_capacity_tokens=kv), BoundedLRU(64), in_flight
    )


# -- block hashes ---------------------------------------------------------------------------


def test_same_prefix_gives_same_leading_hashes() -> None:
    base = list(range(100))
    a = block_hashes(base + [1] * 40)
    b = block_hashes(base + [2] * 40)
    assert len(a) == len(b) == 8
    assert a[:6] == b[:6]  # 100 shared tokens = 6 full blocks
    assert a[6] != b[6]


def test_partial_block_is_ignored() -> None:
    assert block_hashes(list(range(15))) == ()
    assert len(block_hashes(list(range(47)))) == 2
    assert block_hashes(list(range(47))) == block_hashes(list(range(32)))
    assert len(block_hashes(list(range(10)), block_size=4)) == 2


def test_hashes_are_chained() -> None:
    # Equal second blocks after different first blocks must not hash alike.
    x = block_hashes([1] * 16 + [7] * 16)
    y = block_hashes([2] * 16 + [7] * 16)
    assert x[1] != y[1]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], block_size=0)


def test_hashes_agree_across_processes() -> None:
    code = "from airi_ray.core.routing import block_hashes; print(block_hashes(list(range(64))))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == str(block_hashes(list(range(64))))


@given(st.lists(st.integers(0, 50_000), max_size=200), st.lists(st.integers(0, 9), max_size=60))
def test_shared_blocks_equal_shared_hashes(prefix: list[int], tail: list[int]) -> None:
    a, b = block_hashes(prefix + tail), block_hashes(prefix + [t + 10 for t in tail])
    shared = len(prefix) // 16
    assert a[:shared] == b[:shared]


# -- bounded LRU ----------------------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert "b" not in lru and "a" in lru and len(lru) == 2
    assert lru.pop("a") == 1 and lru.get("a") is None
    with pytest.raises(ValueError):
        BoundedLRU(0)


def test_remembered_prefix_drops_tails_first() -> None:
    r = ReplicaState(ReplicaView("a", "m", 1), BoundedLRU(3))
    r.remember_prefix((1, 2, 3, 4, 5))
    assert r.prefix_match((1, 2, 3, 4, 5)) == 3  # the first three blocks survive


# -- replica choice ---------------------------------------------------------------------------


def test_no_candidates_no_choice() -> None:
    assert choose_replica([]) is None


def test_load_then_id() -> None:
    choice = choose_replica([state("b", 8, 1), state("c", 4, 0), state("a", 8, 1)])
    assert choice is not None and (choice.replica.replica_id, choice.reason) == ("c", "load")
    choice = choose_replica([state("b"), state("a")])
    assert choice is not None and choice.replica.replica_id == "a"


def test_kv_fill_is_part_of_load() -> None:
    full_kv = state("a", 8, 1, kv=100)
    full_kv.in_flight_tokens = 90
    choice = choose_replica([full_kv, state("b", 8, 2)])
    assert choice is not None and choice.replica.replica_id == "b"  # 0.25 < 0.9


def test_session_wins_when_it_is_a_candidate() -> None:
    choice = choose_replica([state("a"), state("b", 8, 5)], session_replica="b")
    assert choice is not None and (choice.replica.replica_id, choice.reason) == ("b", "session")
    choice = choose_replica([state("a")], session_replica="gone")
    assert choice is not None and choice.reason == "load"


def test_prefix_margin_is_inclusive() -> None:
    hot = state("a", 4, 1)  # load 0.25
    hot.remember_prefix((11, 12))
    pick = choose_replica([hot, state("b", 4, 0)], prefix_hashes=(11, 12), prefix_load_margin=0.25)
    assert pick is not None and (pick.replica.replica_id, pick.reason, pick.prefix_blocks) == (
        "a",
        "prefix",
        2,
    )
    pick = choose_replica([hot, state("b", 4, 0)], prefix_hashes=(11, 12), prefix_load_margin=0.2)
    assert pick is not None and (pick.replica.replica_id, pick.reason) == ("b", "load")


def test_equal_prefix_matches_go_to_the_less_loaded() -> None:
    a, b = state("a", 8, 3), state("b", 8, 1)
    for r in (a, b):
        r.remember_prefix((5, 6))
    pick = choose_replica([a, b], prefix_hashes=(5, 6, 7))
    assert pick is not None and pick.replica.replica_id == "b" and pick.reason == "prefix"


def test_hardware_rank_orders_preferred_types_and_unlisted_last() -> None:
    cands = [state("a", accel="CPU"), state("b", accel="L4"), state("c", accel="H100")]
    pick = choose_replica(cands, preferred_accelerators=["H100", "L4"])
    assert pick is not None and (pick.replica.replica_id, pick.reason) == ("c", "hardware")
    pick = choose_replica(cands[:2], preferred_accelerators=["H100", "L4"])
    assert pick is not None and (pick.replica.replica_id, pick.reason) == ("b", "hardware")
    # All on the same type: the preference decided nothing.
    pick = choose_replica(
        [state("x", accel="L4"), state("y", accel="L4")], preferred_accelerators=["L4"]
    )
    assert pick is not None and pick.reason == "load"


def test_fits_rules() -> None:
    r = state("a", 2, 0, kv=100)
    assert r.fits(10_000)  # idle: takes anything once
    r.in_flight, r.in_flight_tokens = 1, 60
    assert r.fits(40) and not r.fits(41)
    r.in_flight = 2
    assert not r.fits(1)  # no slot
    unready = ReplicaState(ReplicaView("u", "m", 1, ready=False), BoundedLRU(1))
    assert not unready.fits(1) and not unready.has_slot()


def test_view_validation() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        ReplicaView("a", "m", 0)
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        ReplicaView("a", "m", 1, kv_capacity_tokens=0)
    v = ReplicaView("a", "m", 4, in_flight=1, kv_capacity_tokens=100, in_flight_tokens=50)
    assert (v.free_slots, v.load) == (3, 0.5)
