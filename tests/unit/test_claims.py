"""Fencing tokens of run claims: each claim gets a new token, an older one is refused."""

from __future__ import annotations

import pytest

from airi_ray.core.claims import FIRST_TOKEN, check_token, next_token
from airi_ray.core.errors import Conflict, Fenced, InvalidRequest


def test_each_claim_gets_a_token_above_the_committed_and_the_pending_one() -> None:
    assert next_token(FIRST_TOKEN) == FIRST_TOKEN + 1
    assert next_token(3) == 4
    # A second claim while the first is still being committed does not get its token.
    assert next_token(3, pending=4) == 5
    assert next_token(5, pending=4) == 6


def test_the_current_token_writes() -> None:
    check_token("r1", FIRST_TOKEN, FIRST_TOKEN)
    check_token("r1", 4, 4)


def test_an_older_token_is_fenced_with_a_conflict() -> None:
    with pytest.raises(
        Fenced, match=r"run 'r1' was claimed by another execution \(fencing token 2\)"
    ):
        check_token("r1", 1, 2)
    assert issubclass(Fenced, Conflict) and Fenced.status == 409 and Fenced.code == "fenced"


@pytest.mark.parametrize(
    ("token", "current", "message"),
    [
        (-1, 0, "integer >= 0"),
        ("1", 1, "integer >= 0"),
        (True, 1, "integer >= 0"),
        (3, 2, "token 3 was never issued"),
    ],
)
def test_bad_tokens_are_refused(token: object, current: int, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_token("r1", token, current)
