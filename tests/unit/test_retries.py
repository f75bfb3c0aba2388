"""The call path's one retry rule, branch by branch."""

import pytest

from airi_ray.core.retries import (
    MAX_ATTEMPTS,
    MAX_SCHEDULER_RETRY_S,
    SCHEDULER_WAIT_S,
    Failure,
    Migration,
    Replay,
    Retry,
    after_failure,
    continued_params,
    migration,
    replayable,
    scheduler_retry_delay,
)


def rule(failure: Failure, canary: bool = False, tokens: int = 0, requeues: int = 0) -> Retry:
    return after_failure(failure, canary=canary, tokens_sent=tokens, requeues=requeues)


def test_a_refusal_fails_alone_on_a_stable_version() -> None:
    assert rule(Failure.REFUSED) is Retry.RAISE
    assert rule(Failure.OTHER) is Retry.RAISE


def test_a_dead_replica_sends_the_call_to_another_of_its_version() -> None:
    assert rule(Failure.REPLICA_DIED) is Retry.SAME_VERSION


@pytest.mark.parametrize("failure", list(Failure))
def test_any_canary_failure_goes_to_the_stable_version(failure: Failure) -> None:
    """A refusal too: the canary may refuse what the stable serves (a smaller window)."""
    assert rule(failure, canary=True) is Retry.STABLE_VERSION


@pytest.mark.parametrize("canary", [False, True])
def test_sent_tokens_cannot_be_taken_back(canary: bool) -> None:
    assert rule(Failure.REFUSED, canary, tokens=5) is Retry.RAISE
    assert rule(Failure.OTHER, canary, tokens=1) is Retry.RAISE


@pytest.mark.parametrize("canary", [False, True])
def test_at_most_max_attempts_replicas_are_tried(canary: bool) -> None:
    failure = Failure.REPLICA_DIED
    tried = [rule(failure, canary, requeues=n) for n in range(MAX_ATTEMPTS)]
    assert tried[-1] is Retry.GIVE_UP
    assert Retry.GIVE_UP not in tried[:-1]
    # A failure the rule would not retry is raised as it is, whatever the count.
    assert rule(Failure.REFUSED, requeues=MAX_ATTEMPTS) is Retry.RAISE


def test_a_dead_replica_mid_stream_migrates_until_the_last_attempt() -> None:
    assert rule(Failure.REPLICA_DIED, tokens=5) is Retry.MIGRATE
    assert rule(Failure.REPLICA_DIED, True, tokens=5) is Retry.MIGRATE  # on its own version
    assert rule(Failure.REPLICA_DIED, tokens=5, requeues=MAX_ATTEMPTS - 1) is Retry.DIED_MIDWAY


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        {"temperature": 0.0, "seed": 7},  # greedy: the seed plays no part
        {"temperature": 0.8},  # unseeded sampling: any continuation is a fair sample
        {"temperature": 0.8, "presence_penalty": 0.0, "repetition_penalty": 1.2},
    ],
)
def test_streams_without_sampling_state_continue(params: dict) -> None:
    assert migration(params) is Migration.CONTINUE


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8, "seed": 0},
        {"temperature": 0.0, "structured_outputs": {"json": {"type": "object"}}},
        {"temperature": 0.0, "presence_penalty": 0.5},
        {"temperature": 0.0, "frequency_penalty": -0.5},
        {"temperature": 0.0, "stop": ["\n\n"]},  # held back, or split across engines
    ],
)
def test_streams_with_sampling_state_replay(params: dict) -> None:
    assert migration(params) is Migration.REPLAY


def test_a_sampled_stream_with_stop_strings_gets_a_seed_to_replay_from() -> None:
    draws = iter([41, 42])
    sampled = {"temperature": 0.8, "stop": ["END"], "seed": None}
    assert replayable(sampled, lambda: next(draws)) == sampled | {"seed": 41}
    assert sampled["seed"] is None  # the caller's own parameters are left alone
    assert migration(replayable(sampled, lambda: next(draws))) is Migration.REPLAY
    for kept in (
        {"temperature": 0.8, "stop": ["END"], "seed": 7},  # its own seed
        {"temperature": 0.0, "stop": ["END"], "seed": None},  # greedy replays without
        {"temperature": 0.8, "stop": [], "seed": None},  # continues: nothing held back
    ):
        assert replayable(kept, lambda: 1 / 0) is kept


def test_a_continued_request_spends_what_is_left_of_its_budget() -> None:
    params = {"max_tokens": 64, "min_tokens": 10, "prompt_logprobs": 2, "logprobs": 1}
    out = continued_params(params, 24)
    assert out == {"max_tokens": 40, "min_tokens": 0, "logprobs": 1}
    assert params["max_tokens"] == 64  # the caller's own parameters are left alone
    assert continued_params({"max_tokens": 64, "min_tokens": 30}, 24)["min_tokens"] == 6


def test_a_replay_skips_what_the_client_has_even_mid_step() -> None:
    replay = Replay(chars=5, tokens=2)
    assert replay.take("Hel", [1]) == ("", [], 1)
    # This step straddles the point where the dead replica stopped.
    assert replay.take("lo wor", [2, 3]) == (" wor", [3], 1)
    assert replay.take("ld", [4]) == ("ld", [4], 0)


def test_a_lost_scheduler_is_asked_again_sooner_first_then_once_a_second() -> None:
    delays = [scheduler_retry_delay(a, 0.0) for a in range(8)]
    assert delays[0] is not None and delays[0] < 0.1
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))  # type: ignore[operator]
    assert delays[-1] == MAX_SCHEDULER_RETRY_S
    # A restart of a few seconds is noticed within a second of its end.
    clock, attempt = 0.0, 0
    while clock < 4.0:
        delay = scheduler_retry_delay(attempt, clock)
        assert delay is not None
        clock, attempt = clock + delay, attempt + 1
    assert clock < 4.0 + MAX_SCHEDULER_RETRY_S


def test_the_wait_for_a_lost_scheduler_is_bounded() -> None:
    assert scheduler_retry_delay(40, SCHEDULER_WAIT_S - 0.2) == pytest.approx(0.2)
    assert scheduler_retry_delay(3, SCHEDULER_WAIT_S) is None
    assert scheduler_retry_delay(0, SCHEDULER_WAIT_S + 5) is None
    assert scheduler_retry_delay(10_000, 1.0) == MAX_SCHEDULER_RETRY_S
    with pytest.raises(ValueError):
        scheduler_retry_delay(-1, 0.0)
