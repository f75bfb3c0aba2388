"""What the call path does when a model call fails on its replica: the one retry rule for
generation and embeddings alike.

The call path classifies the failure (``Failure``) and applies the ``Retry`` this module
returns; the rule itself has no I/O, so every branch is unit-tested.
"""

from __future__ import annotations

import enum

__all__ = ["MAX_ATTEMPTS", "Failure", "Retry", "after_failure"]

MAX_ATTEMPTS = 3  # replicas a request may try before the caller gets ReplicaUnavailable


class Failure(enum.Enum):
    """How a call failed on its replica."""

    REFUSED = "refused"  # the engine refused the request (InvalidRequest); it serves on
    REPLICA_DIED = "replica_died"  # the replica or its engine is gone
    OTHER = "other"  # anything else: a bug or a transient error of that call


class Retry(enum.Enum):
    """What to do with the failed call."""

    RAISE = "raise"  # the caller gets the error as it is
    SAME_VERSION = "same_version"  # requeue on another replica (the failed one sits out)
    STABLE_VERSION = "stable_version"  # requeue off the canary, onto the stable version
    GIVE_UP = "give_up"  # MAX_ATTEMPTS replicas failed: ReplicaUnavailable
    DIED_MIDWAY = "died_midway"  # the replica died after tokens were sent: not resumable


def after_failure(failure: Failure, *, canary: bool, tokens_sent: int, requeues: int) -> Retry:
    """The rule, for a call whose lease has been requeued ``requeues`` times so far.

    - Tokens already sent cannot be taken back: a dead replica then ends the call
      (``DIED_MIDWAY``), and any other failure reaches the caller.
    - A refusal is the request's fault and is not retried, but on a canary: a canary may
      refuse what the stable version serves (a smaller window, a stricter engine), which
      is the version's fault. Any canary failure goes to the stable version, so clients do
      not pay for a bad canary; the rollout sees it in the canary's error rate. A request
      the stable refuses too fails there.
    - A dead replica's call goes to another replica of the same version.
    - Either way, at most ``MAX_ATTEMPTS`` replicas are tried.
    """
    if tokens_sent:
        return Retry.DIED_MIDWAY if failure is Failure.REPLICA_DIED else Retry.RAISE
    if canary:
        wanted = Retry.STABLE_VERSION
    elif failure is Failure.REPLICA_DIED:
        wanted = Retry.SAME_VERSION
    else:
        return Retry.RAISE
    return Retry.GIVE_UP if requeues + 1 >= MAX_ATTEMPTS else wanted
