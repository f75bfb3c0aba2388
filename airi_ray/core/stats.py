"""Small statistics used by metrics and reports: sliding-window rates and percentiles."""

from __future__ import annotations

import math
from collections import deque


class RateWindow:
    """Events per second over the last ``window_s`` seconds (e.g. output tokens/s)."""

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def add(self, now: float, amount: float) -> None:
        self._events.append((now, amount))
        self._total += amount
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        return self._total / self.window_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._total -= self._events.popleft()[1]


class SampleWindow:
    """The samples of the last ``window_s`` seconds (e.g. TTFTs, for a recent p99)."""

    def __init__(self, window_s: float = 30.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        self._expire(now)

    def values(self, now: float) -> list[float]:
        self._expire(now)
        return [v for _, v in self._samples]

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._samples.popleft()


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
