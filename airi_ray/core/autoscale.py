"""Replica autoscaling per model: a pure ``policy(ctx) -> (replicas, state, decision)``.

The shape is Ray Serve's custom autoscaling policy, ``policy(ctx) -> (num_replicas,
state)``, plus a decision record whose reason says what was seen and what was done
(``queued+running 9,000 tokens > 2 x 4,000 target: 2 -> 3 replicas``).

Rules, checked in this order:

1. Bounds: above ``max_replicas`` goes down to it at once; below ``min_replicas`` goes up
   to it (as far as the pools have room). A model scaled to zero stays there while idle.
2. Up: when queued-plus-running tokens exceed ``replicas x target_tokens_per_replica``
   (to as many replicas as the tokens need), or the TTFT p99 exceeds its objective (one
   more replica); not again within ``upscale_cooldown_s`` of the last scale-up, since new
   replicas need time to load before their effect shows.
3. Down: one replica at a time, when the load has stayed low for ``scale_down_delay_s``;
   each further step waits a full delay again. Not while replicas are still loading: the
   delay starts once the last scale-up has taken effect. With ``scale_to_zero`` the last replica
   goes once nothing was queued, running or requested for the delay.
4. Never above ``max_replicas`` nor beyond the replicas the pools can still host
   (``pool_free_replicas``); the reason says which cap applied.

Hysteresis: "low" means the load would fit in one replica fewer at 80% of the target, so a
load hovering around the target scales up once and then stays (it never fits at 80%), and
any reading that is not low restarts the delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# A replica is removed only if the rest would run at most this share of their target.
_DOWN_UTILIZATION = 0.8


class AutoscaleError(ValueError):
    """An autoscaling config or context value is out of range."""


@dataclass(frozen=True)
class AutoscaleConfig:
    """One model's autoscaling settings.

    Attributes:
        min_replicas: the floor while the model has traffic (at least 1).
        max_replicas: the ceiling.
        target_tokens_per_replica: queued plus running tokens one replica should carry.
        ttft_p99_objective_s: time to first token (p99) not to exceed.
        scale_down_delay_s: how long the load must stay low before each step down.
        scale_to_zero: whether an idle model may go below ``min_replicas`` to 0.
        upscale_cooldown_s: the least time between two scale-ups.
    """

    min_replicas: int = 1
    max_replicas: int = 4
    target_tokens_per_replica: int = 4_000
    ttft_p99_objective_s: float = 2.0
    scale_down_delay_s: float = 300.0
    scale_to_zero: bool = False
    upscale_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise AutoscaleError(
                f"min_replicas must be at least 1, got {self.min_replicas}; to let an idle "
                "model go to 0 replicas set scale_to_zero"
            )
        if self.max_replicas < self.min_replicas:
            raise AutoscaleError(
                f"max_replicas must be at least min_replicas ({self.min_replicas}), "
                f"got {self.max_replicas}"
            )
        if self.target_tokens_per_replica < 1:
            raise AutoscaleError(
                f"target_tokens_per_replica must be at least 1, got "
                f"{self.target_tokens_per_replica}"
            )
        if self.ttft_p99_objective_s <= 0:
            raise AutoscaleError(
                f"ttft_p99_objective_s must be positive, got {self.ttft_p99_objective_s}"
            )
        if self.scale_down_delay_s < 0 or self.upscale_cooldown_s < 0:
            raise AutoscaleError(
                f"scale_down_delay_s and upscale_cooldown_s must not be negative, got "
                f"{self.scale_down_delay_s} and {self.upscale_cooldown_s}"
            )


@dataclass(frozen=True)
class AutoscaleState:
    """What the policy remembers between calls (the caller keeps it and passes it back).

    Attributes:
        last_upscale_at: when it last scaled up, None if never.
        low_since: since when the load has been low enough to drop a replica.
        idle_since: since when nothing was queued, running or requested.
    """

    last_upscale_at: float | None = None
    low_since: float | None = None
    idle_since: float | None = None


@dataclass(frozen=True)
class AutoscaleContext:
    """One model's situation at ``now``.

    Attributes:
        config: the model's autoscaling settings.
        now: the caller's clock, in seconds.
        current_replicas: replicas the model has (loading ones included).
        queued_tokens, running_tokens: tokens waiting for and held by its replicas.
        ttft_p99_s: TTFT p99 over the recent window, None when nothing was measured.
        requests_in_window: requests that arrived in the recent window.
        pool_free_replicas: how many more replicas of this model the pools can host.
        state: what the previous call returned, None on the first call.
        loading_replicas: replicas started but not ready yet; while there are any, the
            model is not scaled down (the last scale-up has not taken effect).
    """

    config: AutoscaleConfig
    now: float
    current_replicas: int
    queued_tokens: int = 0
    running_tokens: int = 0
    ttft_p99_s: float | None = None
    requests_in_window: int = 0
    pool_free_replicas: int = 0
    state: AutoscaleState | None = None
    loading_replicas: int = 0

    def __post_init__(self) -> None:
        counts = {
            "current_replicas": self.current_replicas,
            "queued_tokens": self.queued_tokens,
            "running_tokens": self.running_tokens,
            "requests_in_window": self.requests_in_window,
            "pool_free_replicas": self.pool_free_replicas,
            "loading_replicas": self.loading_replicas,
        }
        negative = [f"{k}={v}" for k, v in counts.items() if v < 0]
        if negative:
            raise AutoscaleError(f"counts must not be negative, got {', '.join(negative)}")


@dataclass(frozen=True)
class ScaleDecision:
    """The policy's answer: from ``current`` to ``replicas``, and why."""

    current: int
    replicas: int
    reason: str

    @property
    def direction(self) -> str:
        """``up``, ``down`` or ``hold``."""
        if self.replicas > self.current:
            return "up"
        return "down" if self.replicas < self.current else "hold"


def policy(ctx: AutoscaleContext) -> tuple[int, AutoscaleState, ScaleDecision]:
    """How many replicas the model should have now.

    Returns:
        The replica count, the state to pass back next time, and the decision with its
        reason.
    """
    cfg, now, n = ctx.config, ctx.now, ctx.current_replicas
    prev = ctx.state or AutoscaleState()
    load = ctx.queued_tokens + ctx.running_tokens
    idle = load == 0 and ctx.requests_in_window == 0
    state = replace(
        prev, idle_since=(prev.idle_since if prev.idle_since is not None else now) if idle else None
    )
    room = n + ctx.pool_free_replicas  # the most replicas the pools allow

    def decide(
        replicas: int, reason: str, st: AutoscaleState
    ) -> tuple[int, AutoscaleState, ScaleDecision]:
        return replicas, st, ScaleDecision(n, replicas, reason)

    # 1. bounds
    if n > cfg.max_replicas:
        return decide(
            cfg.max_replicas,
            f"above max_replicas {cfg.max_replicas}: {n} -> {cfg.max_replicas} replicas",
            replace(state, low_since=None),
        )
    # An idle model that may scale to zero has no floor; any traffic brings the floor back.
    floor = 0 if cfg.scale_to_zero and idle else cfg.min_replicas
    if n == 0 and floor == 0:
        return decide(0, "scaled to zero and idle: stays at 0", state)
    if n < floor:
        want = max(cfg.min_replicas, _needed(load, cfg))
        why = (
            f"cold start with {load:,} tokens and {ctx.requests_in_window} requests"
            if n == 0
            else f"below min_replicas {cfg.min_replicas}"
        )
        return _up(n, want, why, room, cfg, replace(state, low_since=None), now)

    # 2. up
    causes: list[str] = []
    want = n
    if load > n * cfg.target_tokens_per_replica:
        causes.append(
            f"queued+running {load:,} tokens > {n} x {cfg.target_tokens_per_replica:,} target"
        )
        want = max(want, _needed(load, cfg))
    ttft = ctx.ttft_p99_s
    # A TTFT with no request in the window is stale: it says nothing about the load now.
    if ttft is not None and ctx.requests_in_window > 0 and ttft > cfg.ttft_p99_objective_s:
        causes.append(f"TTFT p99 {ttft:.2f} s > objective {cfg.ttft_p99_objective_s:.2f} s")
        want = max(want, n + 1)
    if causes:
        why = " and ".join(causes)
        state = replace(state, low_since=None)
        last = prev.last_upscale_at
        if last is not None and now - last < cfg.upscale_cooldown_s:
            left = cfg.upscale_cooldown_s - (now - last)
            return decide(
                n, f"{why}, but within the upscale cooldown ({left:g} s left): stays at {n}", state
            )
        return _up(n, want, why, room, cfg, state, now)

    # 3. down, one step at a time after the delay
    fits_fewer = load <= (n - 1) * cfg.target_tokens_per_replica * _DOWN_UTILIZATION
    if n > floor and fits_fewer and ctx.loading_replicas > 0:
        # A scale-up not yet in effect cannot be judged: the delay starts once it is.
        return decide(
            n,
            f"load low, but {ctx.loading_replicas} replica(s) still loading: stays at {n}",
            replace(state, low_since=None),
        )
    if n > floor and fits_fewer:
        since = prev.low_since if prev.low_since is not None else now
        if n == 1:
            # The last replica goes only after the whole delay idle, not merely low.
            since = max(since, state.idle_since if state.idle_since is not None else now)
        waited = now - since
        if waited >= cfg.scale_down_delay_s:
            # Restart the clock: the next step down waits a full delay on the new count.
            st = replace(state, low_since=now)
            if n == 1:
                idle_s = now - (state.idle_since if state.idle_since is not None else now)
                return decide(
                    0,
                    f"idle for {idle_s:g} s (nothing queued, running or requested): "
                    "1 -> 0 replicas (scale to zero)",
                    st,
                )
            return decide(
                n - 1,
                f"queued+running {load:,} tokens fit in {n - 1} x "
                f"{cfg.target_tokens_per_replica:,} target at {_DOWN_UTILIZATION:.0%} for "
                f"{waited:g} s: {n} -> {n - 1} replicas",
                st,
            )
        return decide(
            n,
            f"load low for {waited:g} s of the {cfg.scale_down_delay_s:g} s scale-down "
            f"delay: stays at {n}",
            replace(state, low_since=since),
        )
    return decide(
        n,
        f"queued+running {load:,} tokens within {n} x {cfg.target_tokens_per_replica:,} "
        f"target: stays at {n}",
        replace(state, low_since=None),
    )


def _needed(load: int, cfg: AutoscaleConfig) -> int:
    """Replicas the tokens need at the target."""
    return math.ceil(load / cfg.target_tokens_per_replica)


def _up(
    n: int,
    want: int,
    why: str,
    room: int,
    cfg: AutoscaleConfig,
    state: AutoscaleState,
    now: float,
) -> tuple[int, AutoscaleState, ScaleDecision]:
    """Scale up to ``want``, capped by ``max_replicas`` and the pools; say which cap."""
    target = min(want, cfg.max_replicas, room)
    cap = ""
    if target < want:
        cap = (
            f"max_replicas is {cfg.max_replicas}"
            if cfg.max_replicas <= room
            else f"the pools have room for {room - n} more"
        )
    if target <= n:
        return n, state, ScaleDecision(n, n, f"{why}, but {cap}: stays at {n}")
    reason = f"{why}: {n} -> {target} replicas"
    if cap:
        reason += f" (wants {want}; {cap})"
    st = replace(state, last_upscale_at=now)
    return target, st, ScaleDecision(n, target, reason)
