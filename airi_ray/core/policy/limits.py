"""Rate limits and budgets as plain counters over a clock passed in (``now``, seconds).

- ``TokenBucket``: holds up to ``burst`` tokens and refills at ``rate_per_s``. A request
  for ``n`` is allowed when the bucket holds ``min(n, burst)`` (so a request larger than
  the burst is not refused forever: it waits for a full bucket); taking may leave the level
  negative, a debt that delays the next request. ``charge`` adjusts after the fact, so a
  tokens/minute bucket takes an estimate at admission and the real count at release.
- ``Budget``: tokens per fixed window aligned to the period (``floor(now / period)``; with
  ``now`` from ``time.time()`` a daily budget resets at midnight UTC).

The clock may step backwards (a wall clock adjusted by NTP): buckets then just do not
refill, and a budget keeps its current window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """A token bucket: ``rate_per_s`` refill, ``burst`` capacity, starts full."""

    rate_per_s: float
    burst: float
    level: float = field(default=math.nan)
    updated: float | None = None

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.burst > 0):
            raise ValueError(
                f"a token bucket needs rate_per_s > 0 and burst > 0, got {self.rate_per_s}, "
                f"{self.burst}"
            )
        if math.isnan(self.level):
            self.level = self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate_per_s)
        if self.updated is None or now > self.updated:
            self.updated = now

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until ``n`` could be taken (0 if now), without taking anything."""
        self._refill(now)
        need = min(n, self.burst)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate_per_s

    def charge(self, n: float, now: float) -> None:
        """Take ``n`` unconditionally (negative ``n`` gives back); the level may go negative."""
        self._refill(now)
        self.level = min(self.burst, self.level - n)

    def try_take(self, n: float, now: float) -> float:
        """Take ``n`` if allowed and return 0, else take nothing and return the seconds to wait."""
        wait = self.wait_s(n, now)
        if wait == 0.0:
            self.level -= n
        return wait


@dataclass(slots=True)
class Budget:
    """``limit`` tokens per fixed window of ``period_s`` seconds, charged with real counts."""

    limit: int
    period_s: float
    spent: int = 0
    window_start: float = -math.inf

    def __post_init__(self) -> None:
        if self.limit < 0 or not self.period_s > 0:
            raise ValueError(
                f"a budget needs limit >= 0 and period_s > 0, got {self.limit}, {self.period_s}"
            )

    def _roll(self, now: float) -> None:
        start = math.floor(now / self.period_s) * self.period_s
        if start > self.window_start:
            self.window_start = start
            self.spent = 0

    def exhausted(self, now: float) -> bool:
        """Whether the current window's budget is spent."""
        self._roll(now)
        return self.spent >= self.limit

    def remaining(self, now: float) -> int:
        """Tokens left in the current window (0 when spent or overspent)."""
        self._roll(now)
        return max(0, self.limit - self.spent)

    def resets_at(self, now: float) -> float:
        """When the current window ends."""
        self._roll(now)
        return self.window_start + self.period_s

    def charge(self, tokens: int, now: float) -> None:
        """Add ``tokens`` to the current window (it may go over: the next request is refused)."""
        self._roll(now)
        self.spent += tokens
