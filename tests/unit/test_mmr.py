"""Maximal marginal relevance over a candidate pool."""

import numpy as np
import pytest

from airi_ray.core.mmr import mmr_select

QUERY = np.array([1.0, 0.0, 0.0])
# 0 and 1 are near-duplicates and the most relevant; 2 is a bit less relevant but different.
CANDIDATES = np.array(
    [
        [0.95, 0.31, 0.0],
        [0.94, 0.34, 0.0],
        [0.90, 0.0, 0.43],
        [0.10, 0.99, 0.0],
    ]
)


def test_lambda_one_is_plain_relevance_order() -> None:
    assert mmr_select(QUERY, CANDIDATES, 4, 1.0) == [0, 1, 2, 3]


def test_diversity_skips_the_near_duplicate() -> None:
    assert mmr_select(QUERY, CANDIDATES, 2, 0.5) == [0, 2]


def test_first_pick_is_the_most_relevant_whatever_lambda() -> None:
    for lam in (0.0, 0.3, 1.0):
        assert mmr_select(QUERY, CANDIDATES, 1, lam) == [0]


def test_scale_does_not_matter_cosine() -> None:
    assert mmr_select(QUERY * 7, CANDIDATES * 3, 2, 0.5) == [0, 2]


def test_k_larger_than_pool_returns_every_candidate_once() -> None:
    picked = mmr_select(QUERY, CANDIDATES, 10, 0.5)
    assert sorted(picked) == [0, 1, 2, 3]


def test_empty_inputs() -> None:
    assert mmr_select(QUERY, np.zeros((0, 3)), 3, 0.5) == []
    assert mmr_select(QUERY, CANDIDATES, 0, 0.5) == []


def test_zero_vectors_do_not_produce_nan() -> None:
    cands = np.vstack([CANDIDATES, np.zeros(3)])
    assert len(mmr_select(QUERY, cands, 5, 0.5)) == 5


def test_random_pool_picks_are_distinct() -> None:
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((200, 16))
    picked = mmr_select(rng.standard_normal(16), pool, 20, 0.7)
    assert len(picked) == len(set(picked)) == 20


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_lambda_out_of_range(lam: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mmr_select(QUERY, CANDIDATES, 2, lam)


def test_shape_mismatch_and_negative_k() -> None:
    with pytest.raises(ValueError, match="shape"):
        mmr_select(QUERY, np.ones((2, 4)), 1, 0.5)
    with pytest.raises(ValueError, match="negative"):
        mmr_select(QUERY, CANDIDATES, -1, 0.5)
