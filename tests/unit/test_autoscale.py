"""The autoscaling policy: up under burst, down after idle, caps, scale to zero, no flapping."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from airi_ray.core.autoscale import (
    AutoscaleConfig,
    AutoscaleContext,
    AutoscaleError,
    AutoscaleState,
    ScaleDecision,
    policy,
)

CFG = AutoscaleConfig(
    min_replicas=1,
    max_replicas=5,
    target_tokens_per_replica=4_000,
    ttft_p99_objective_s=1.0,
    scale_down_delay_s=60.0,
    upscale_cooldown_s=20.0,
)


@dataclass
class Sim:
    """Feeds the policy its own output back, as the controller's loop does."""

    config: AutoscaleConfig = CFG
    replicas: int = 1
    pool_free: int = 100  # replicas the pools can still host beyond the current ones
    state: AutoscaleState | None = None
    decisions: list[ScaleDecision] = field(default_factory=list)

    def tick(
        self,
        now: float,
        tokens: int = 0,
        ttft: float | None = None,
        requests: int | None = None,
    ) -> ScaleDecision:
        ctx = AutoscaleContext(
            self.config,
            now,
            self.replicas,
            queued_tokens=tokens // 2,
            running_tokens=tokens - tokens // 2,
            ttft_p99_s=ttft,
            requests_in_window=(1 if tokens else 0) if requests is None else requests,
            pool_free_replicas=self.pool_free,
            state=self.state,
        )
        before = self.replicas
        self.replicas, self.state, decision = policy(ctx)
        self.pool_free -= self.replicas - before
        self.decisions.append(decision)
        return decision

    @property
    def changes(self) -> int:
        return sum(d.direction != "hold" for d in self.decisions)


def test_scales_up_under_a_token_burst_with_a_reason() -> None:
    s = Sim(replicas=2)
    d = s.tick(0.0, tokens=9_000)
    assert (d.current, d.replicas, d.direction) == (2, 3, "up")
    assert d.reason == "queued+running 9,000 tokens > 2 x 4,000 target: 2 -> 3 replicas"
    # A bigger burst jumps straight to what the tokens need (after the cooldown).
    d = s.tick(5.0, tokens=20_000)
    assert d.direction == "hold" and "upscale cooldown (15 s left)" in d.reason
    d = s.tick(20.0, tokens=20_000)
    assert (d.replicas, s.replicas) == (5, 5)


def test_scales_up_on_ttft_one_replica_at_a_time() -> None:
    s = Sim(replicas=2)
    d = s.tick(0.0, tokens=1_000, ttft=2.5)
    assert d.reason == "TTFT p99 2.50 s > objective 1.00 s: 2 -> 3 replicas"
    # A stale TTFT (no request in the window) is ignored.
    d = s.tick(100.0, tokens=0, ttft=2.5, requests=0)
    assert d.direction == "hold"


def test_never_past_max_replicas_and_says_so() -> None:
    s = Sim(replicas=4)
    d = s.tick(0.0, tokens=40_000)
    assert d.replicas == 5
    assert d.reason.endswith("4 -> 5 replicas (wants 10; max_replicas is 5)")
    d = s.tick(100.0, tokens=40_000)
    assert d.direction == "hold" and "but max_replicas is 5: stays at 5" in d.reason
    # Above max (the config shrank): down to it at once.
    d = Sim(replicas=8).tick(0.0, tokens=40_000)
    assert (d.replicas, d.reason) == (5, "above max_replicas 5: 8 -> 5 replicas")


def test_never_beyond_pool_capacity_and_says_so() -> None:
    s = Sim(replicas=1, pool_free=1)
    d = s.tick(0.0, tokens=16_000)
    assert d.replicas == 2 and "(wants 4; the pools have room for 1 more)" in d.reason
    d = s.tick(30.0, tokens=16_000)
    assert d.direction == "hold" and "the pools have room for 0 more: stays at 2" in d.reason


def test_scales_down_one_step_at_a_time_after_the_idle_delay() -> None:
    s = Sim(replicas=4)
    assert (
        s.tick(0.0, tokens=1_000).reason
        == "load low for 0 s of the 60 s scale-down delay: stays at 4"
    )
    assert s.tick(59.0, tokens=1_000).direction == "hold"
    d = s.tick(60.0, tokens=1_000)
    assert (d.replicas, d.reason) == (
        3,
        "queued+running 1,000 tokens fit in 3 x 4,000 target at 80% for 60 s: 4 -> 3 replicas",
    )
    # The next step waits a whole delay again.
    assert s.tick(100.0, tokens=1_000).direction == "hold"
    assert s.tick(120.0, tokens=1_000).replicas == 2
    assert s.tick(180.0, tokens=1_000).replicas == 1
    # Never below min_replicas without scale_to_zero, however long it stays idle.
    for t in range(240, 2000, 60):
        assert s.tick(float(t)).replicas == 1


def test_a_busy_reading_restarts_the_scale_down_delay() -> None:
    s = Sim(replicas=3)
    s.tick(0.0, tokens=1_000)
    s.tick(50.0, tokens=9_000)  # 9,000 > 2 x 4,000 x 0.8: not low
    assert s.tick(70.0, tokens=1_000).direction == "hold"
    assert s.tick(129.0, tokens=1_000).direction == "hold"
    assert s.tick(130.0, tokens=1_000).replicas == 2


def test_scale_to_zero_after_idle_and_back_on_traffic() -> None:
    cfg = AutoscaleConfig(
        min_replicas=2,
        max_replicas=4,
        target_tokens_per_replica=4_000,
        scale_down_delay_s=60.0,
        scale_to_zero=True,
    )
    s = Sim(config=cfg, replicas=2)
    # Low but not idle: the floor is min_replicas.
    for t in range(0, 300, 30):
        assert s.tick(float(t), tokens=500).replicas == 2
    # Idle: steps down one at a time, each after the delay, to zero.
    s.tick(300.0)
    assert s.tick(360.0).replicas == 1
    d = s.tick(420.0)
    assert (d.replicas, d.reason) == (
        0,
        "idle for 120 s (nothing queued, running or requested): 1 -> 0 replicas (scale to zero)",
    )
    assert s.tick(1000.0).reason == "scaled to zero and idle: stays at 0"
    # A request arrives: cold start to min_replicas (or what the tokens need).
    d = s.tick(1001.0, tokens=100)
    assert (d.replicas, d.reason) == (
        2,
        "cold start with 100 tokens and 1 requests: 0 -> 2 replicas",
    )


def test_last_replica_waits_a_full_idle_delay() -> None:
    cfg = AutoscaleConfig(min_replicas=1, scale_down_delay_s=60.0, scale_to_zero=True)
    s = Sim(config=cfg, replicas=1)
    s.tick(0.0, tokens=100)
    s.tick(50.0)  # idle from here
    assert s.tick(100.0).replicas == 1
    assert s.tick(110.0).replicas == 0


def test_below_min_goes_up_to_it() -> None:
    cfg = AutoscaleConfig(min_replicas=3, max_replicas=6)
    d = Sim(config=cfg, replicas=1).tick(0.0)
    assert (d.replicas, d.reason) == (3, "below min_replicas 3: 1 -> 3 replicas")


def test_no_flapping_around_the_target() -> None:
    s = Sim(replicas=2)
    # Load hovers around 2 x 4,000 for ten minutes: up once, then it stays.
    for i in range(600):
        s.tick(float(i), tokens=8_100 if i % 2 else 7_900, ttft=0.5)
    assert s.changes == 1 and s.replicas == 3
    # Load hovering around the scale-down line never stays low long enough to flap either.
    t = 1000.0
    for i in range(600):
        s.tick(t + i, tokens=6_300 if i % 20 else 6_500, ttft=0.5)
    assert s.changes == 1 and s.replicas == 3


def test_ttft_spikes_within_the_cooldown_do_not_stack_up() -> None:
    s = Sim(replicas=1)
    for i in range(20):
        s.tick(float(i), tokens=1_000, ttft=3.0)
    assert s.replicas == 2 and s.changes == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"min_replicas": 0}, "set scale_to_zero"),
        ({"min_replicas": 3, "max_replicas": 2}, "at least min_replicas"),
        ({"target_tokens_per_replica": 0}, "at least 1"),
        ({"ttft_p99_objective_s": 0}, "positive"),
        ({"scale_down_delay_s": -1}, "must not be negative"),
    ],
)
def test_bad_configs_are_refused(kw: dict[str, object], match: str) -> None:
    with pytest.raises(AutoscaleError, match=match):
        AutoscaleConfig(**kw)  # type: ignore[arg-type]


def test_bad_context_is_refused() -> None:
    with pytest.raises(AutoscaleError, match="queued_tokens=-1"):
        AutoscaleContext(CFG, 0.0, 1, queued_tokens=-1)


def test_no_scale_down_while_replicas_are_still_loading() -> None:
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=3, scale_down_delay_s=5)
    state = None
    for t in range(0, 60, 5):
        ctx = AutoscaleContext(cfg, float(t), 2, loading_replicas=1, state=state)
        replicas, state, decision = policy(ctx)
        assert replicas == 2 and "still loading" in decision.reason
    # Once loaded, the delay starts from then.
    replicas, state, _ = policy(AutoscaleContext(cfg, 60.0, 2, state=state))
    assert replicas == 2
    replicas, state, _ = policy(AutoscaleContext(cfg, 65.0, 2, state=state))
    assert replicas == 1
