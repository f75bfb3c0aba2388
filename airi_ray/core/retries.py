"""What the call path does when a model call fails on its replica: the one retry rule for
generation and embeddings alike, and how a stream whose replica died moves to another;
and how long a call waits for a scheduler that died and is being restarted.

The call path classifies the failure (``Failure``) and applies the ``Retry`` this module
returns; the rule itself has no I/O, so every branch is unit-tested.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_SCHEDULER_RETRY_S",
    "SCHEDULER_WAIT_S",
    "Failure",
    "Migration",
    "Replay",
    "Retry",
    "after_failure",
    "continued_params",
    "migration",
    "replayable",
    "scheduler_retry_delay",
]

MAX_ATTEMPTS = 3  # replicas a request may use, migrations included
# How long calls wait for the scheduler after losing it (its actor died and Ray restarts
# it: a restart takes a few seconds, and the usage log rebuilds its accounting).
SCHEDULER_WAIT_S = 30.0
FIRST_SCHEDULER_RETRY_S = 0.05
MAX_SCHEDULER_RETRY_S = 1.0


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
    MIGRATE = "migrate"  # the replica died mid-stream: go on on another of its version
    DIED_MIDWAY = "died_midway"  # died mid-stream on the last replica it may use


def after_failure(failure: Failure, *, canary: bool, tokens_sent: int, requeues: int) -> Retry:
    """The rule, for a call whose lease has been requeued ``requeues`` times so far.

    - Tokens already sent cannot be taken back. A dead replica's stream moves to another
      replica of the same version (``MIGRATE``: the tokens are that version's), so the
      client sees one stream; any other failure reaches the caller.
    - A refusal is the request's fault and is not retried, but on a canary: a canary may
      refuse what the stable version serves (a smaller window, a stricter engine), which
      is the version's fault. Any canary failure goes to the stable version, so clients do
      not pay for a bad canary; the rollout sees it in the canary's error rate. A request
      the stable refuses too fails there.
    - A dead replica's call goes to another replica of the same version.
    - Either way, at most ``MAX_ATTEMPTS`` replicas are used, migrations included: a
      request that kills every replica it reaches stops there.
    """
    last = requeues + 1 >= MAX_ATTEMPTS
    if tokens_sent:
        if failure is not Failure.REPLICA_DIED:
            return Retry.RAISE
        return Retry.DIED_MIDWAY if last else Retry.MIGRATE
    if canary:
        wanted = Retry.STABLE_VERSION
    elif failure is Failure.REPLICA_DIED:
        wanted = Retry.SAME_VERSION
    else:
        return Retry.RAISE
    return Retry.GIVE_UP if last else wanted


class Migration(enum.Enum):
    """How a stream goes on on another replica after ``MIGRATE``."""

    # The tokens sent join the prompt and the engine generates the rest: a prefill of
    # the sent tokens, not a decode of them again. Greedy decoding gives the text it
    # would have given.
    CONTINUE = "continue"
    # Generated again from the start with the same parameters; the part already sent is
    # skipped. For sampling whose state a new request cannot take over (below).
    REPLAY = "replay"


def migration(params: Mapping[str, Any]) -> Migration:
    """How a stream with these sampling parameters goes on after its replica died.

    ``REPLAY`` where a continued request would lose sampling state and so give another
    text: a seeded sampler restarts from its seed, a grammar (structured outputs) from
    its start, and presence and frequency penalties count output tokens only (the sent
    tokens would become prompt tokens). Greedy decoding needs no seed.

    Stop strings replay too. The dead engine held back the text a stop string might
    begin (up to the longest one's length less a character), which the client never got;
    a continued request starts after those tokens, so that text would be lost, and a
    stop string split across the two engines would match in neither. A sampled stream
    with stop strings has a seed to replay from: ``replayable`` draws it at the start.
    """
    seeded = params.get("seed") is not None and params.get("temperature", 1.0) != 0
    if (
        seeded
        or params.get("stop")
        or params.get("structured_outputs") is not None
        or params.get("presence_penalty")
        or params.get("frequency_penalty")
    ):
        return Migration.REPLAY
    return Migration.CONTINUE


def replayable(params: dict[str, Any], draw_seed: Callable[[], int]) -> dict[str, Any]:
    """``params``, with a seed from ``draw_seed()`` where the stream would migrate by
    replay and has none: sampled (temperature above 0) with stop strings. Any seed is as
    fair a sample as none, and with it a replay gives the text the client was being
    sent. Other parameters come back as they are (the same dict)."""
    if params.get("stop") and params.get("seed") is None and params.get("temperature", 1.0) != 0:
        return params | {"seed": draw_seed()}
    return params


def continued_params(params: Mapping[str, Any], sent: int) -> dict[str, Any]:
    """The parameters of a ``CONTINUE`` request after ``sent`` tokens: the output budget
    less what was sent, and no prompt logprobs (the first attempt gave them; the new
    prompt would give the sent tokens' too). ``max_tokens`` is at least 1: a stream whose
    budget was spent has ended, which the caller checks first."""
    out = dict(params)
    out["max_tokens"] = max(1, int(params["max_tokens"]) - sent)
    if out.get("min_tokens"):
        out["min_tokens"] = max(0, int(out["min_tokens"]) - sent)
    out.pop("prompt_logprobs", None)
    return out


@dataclass
class Replay:
    """What a ``REPLAY`` stream must skip: the text and tokens the client already has.

    A replay makes the same text again (same seed, same weights), so the first ``chars``
    characters and ``tokens`` tokens it yields are dropped, and the stream goes on where
    the dead replica stopped. Text is cut by characters, not tokens: a replayed step may
    end in the middle of what was sent.
    """

    chars: int
    tokens: int

    def take(self, text: str, ids: list[int]) -> tuple[str, list[int], int]:
        """The new part of a replayed step: ``(text, token ids, tokens dropped)``."""
        cut = min(self.chars, len(text))
        k = min(self.tokens, len(ids))
        self.chars -= cut
        self.tokens -= k
        return text[cut:], ids[k:], k


def scheduler_retry_delay(attempt: int, lost_for_s: float) -> float | None:
    """Seconds to wait before asking the scheduler again, ``attempt`` (0, 1, ...) asks
    after it was lost ``lost_for_s`` seconds ago; None once it has been gone for
    ``SCHEDULER_WAIT_S``: the calls waiting on it fail.

    A call admitted or queued when the scheduler died is not the caller's fault: it waits
    for the restarted scheduler and is queued there again (its admission, rebuilt from the
    usage log, is not charged twice). The waits double from ``FIRST_SCHEDULER_RETRY_S`` to
    ``MAX_SCHEDULER_RETRY_S``, so a restart a few seconds long is found within a second of
    its end, and the last wait ends at the bound.
    """
    if attempt < 0 or lost_for_s < 0:
        raise ValueError("attempt and lost_for_s must not be negative")
    left = SCHEDULER_WAIT_S - lost_for_s
    if left <= 0:
        return None
    return min(FIRST_SCHEDULER_RETRY_S * 2 ** min(attempt, 32), MAX_SCHEDULER_RETRY_S, left)
