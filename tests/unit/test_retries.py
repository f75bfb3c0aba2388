"""The call path's one retry rule, branch by branch."""

import pytest

from airi_ray.core.retries import MAX_ATTEMPTS, Failure, Retry, after_failure


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
    assert rule(Failure.REPLICA_DIED, canary, tokens=5) is Retry.DIED_MIDWAY
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
