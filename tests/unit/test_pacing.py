import pytest

from airi_ray.core.pacing import RefusalPacer


def test_a_burst_is_answered_at_once_and_the_rest_at_the_rate() -> None:
    pacer = RefusalPacer(rate_per_s=10, burst=3)
    assert [pacer.delay("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [round(pacer.delay("a", 0.0), 3) for _ in range(3)] == [0.1, 0.2, 0.3]


def test_the_bucket_refills_with_time() -> None:
    pacer = RefusalPacer(rate_per_s=10, burst=2)
    pacer.delay("a", 0.0)
    pacer.delay("a", 0.0)
    assert pacer.delay("a", 0.0) == pytest.approx(0.1)
    # 0.5 s later: the debt of one is paid and the bucket holds 2 again (its burst).
    assert pacer.delay("a", 0.5) == 0.0
    assert pacer.delay("a", 0.5) == 0.0
    assert pacer.delay("a", 0.5) == pytest.approx(0.1)


def test_one_keys_flood_does_not_delay_another_key() -> None:
    pacer = RefusalPacer(rate_per_s=10, burst=1)
    for _ in range(50):
        pacer.delay("flood", 0.0)
    assert pacer.delay("quiet", 0.0) == 0.0


def test_the_wait_is_capped_however_long_the_flood() -> None:
    pacer = RefusalPacer(rate_per_s=10, burst=1, max_delay_s=2.0)
    delays = [pacer.delay("a", 0.0) for _ in range(1000)]
    assert max(delays) == pytest.approx(2.0)
    # The capped debt is paid back at the rate: 2 s later the next refusal is free.
    assert pacer.delay("a", 2.0 + 0.1) == 0.0


def test_keys_beyond_the_cap_forget_the_least_recently_refused() -> None:
    pacer = RefusalPacer(rate_per_s=1, burst=1, max_keys=2)
    pacer.delay("a", 0.0)
    pacer.delay("b", 0.0)
    pacer.delay("a", 0.0)  # a is the more recent
    pacer.delay("c", 0.0)  # b is forgotten
    assert pacer.delay("a", 0.0) > 0.0  # still remembered: its bucket is empty
    assert pacer.delay("b", 0.0) == 0.0  # forgotten: a fresh bucket


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_per_s": 0, "burst": 1},
        {"rate_per_s": 1, "burst": 0},
        {"rate_per_s": 1, "burst": 1, "max_delay_s": 0},
    ],
)
def test_settings_must_be_positive(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="refusal pacer needs"):
        RefusalPacer(**kwargs)
