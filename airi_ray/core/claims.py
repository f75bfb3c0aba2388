"""Claims on graph runs: at most one execution of a run writes its state at any time.

An executor that takes over a run (resumes it) claims it first and gets the next fencing
token; every write of the run's events and checkpoints carries the token of the execution
that makes it, and the store refuses one whose token is older than the run's current one.
So an executor that lost the run (it stalled, or a second one resumed the run meanwhile)
is told so on its next write and stops, instead of running the nodes a second time.

The execution that starts a run holds ``FIRST_TOKEN`` without a claim record: a start costs
no extra commit. Each claim raises the token by one.
"""

from __future__ import annotations

from airi_ray.core.errors import Fenced, InvalidRequest

FIRST_TOKEN = 0


def next_token(current: int, pending: int | None = None) -> int:
    """The token of a new claim on a run whose committed token is ``current`` and whose
    newest claim still being committed (if any) holds ``pending``: above both, so two
    claims made at the same time get different tokens."""
    return max(current, FIRST_TOKEN if pending is None else pending) + 1


def check_token(run_id: str, token: object, current: int) -> None:
    """Refuse a write of ``run_id`` made under ``token`` when the run's current token
    (committed or being committed) is ``current``.

    Raises:
        InvalidRequest: ``token`` is not a non-negative integer.
        Fenced: ``token`` is older than ``current``: another execution claimed the run.
    """
    if isinstance(token, bool) or not isinstance(token, int) or token < FIRST_TOKEN:
        raise InvalidRequest(
            f"a run write's fencing token must be an integer >= {FIRST_TOKEN}, got {token!r}"
        )
    if token < current:
        raise Fenced(
            f"run {run_id!r} was claimed by another execution (fencing token {current}); "
            f"this execution's writes (token {token}) are refused and it stops. Poll the run "
            "for its result"
        )
    if token > current:
        raise InvalidRequest(
            f"run {run_id!r} has fencing token {current}; token {token} was never issued "
            "(claim the run with claim_run to get one)"
        )
