"""``Cached``: shared fetches, stale values while refreshing, and failed refreshes said aloud."""

from __future__ import annotations

import asyncio
import logging

import pytest

from airi_ray.runtime.calls import Cached


def test_a_failed_refresh_keeps_the_stale_value_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[object] = ["ring-1", RuntimeError("controller restarting"), "ring-2"]

    async def fetch() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    async def run() -> None:
        cached = Cached(fetch, ttl_s=0.0, what="the API key ring")
        assert await cached.get() == "ring-1"
        with (
            caplog.at_level(logging.WARNING, logger="airi_ray.runtime.calls"),
            pytest.raises(RuntimeError, match="restarting"),
        ):
            await cached.get(fresh=True)
        assert "refreshing the API key ring failed" in caplog.text
        assert "controller restarting" in caplog.text
        assert await cached.get() == "ring-1"  # stale at once; the refresh runs behind it
        await asyncio.sleep(0.01)
        assert await cached.get() == "ring-2"

    asyncio.run(run())


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failed_refreshes_back_off_and_a_too_old_value_is_refused() -> None:
    from airi_ray.core.errors import StaleState

    calls: list[float] = []
    up = True
    clock = _Clock()

    async def fetch() -> str:
        calls.append(clock.now)
        if not up:
            raise ConnectionError("controller unreachable")
        return f"ring@{clock.now:.0f}"

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def run() -> None:
        nonlocal up
        cached = Cached(fetch, ttl_s=2.0, what="the API key ring", max_age_s=60.0, clock=clock)
        assert await cached.get() == "ring@0"
        up = False
        # A request every 100 ms for 50 s: the refresh is tried with a doubling backoff
        # (4, 8, 16, 30 s...), not once per request.
        for step in range(1, 501):
            clock.now = step * 0.1
            assert await cached.get() == "ring@0"
            await settle()
        assert len(calls) - 1 <= 5, calls
        gaps = [b - a for a, b in zip(calls[1:], calls[2:], strict=False)]
        assert all(later >= earlier for earlier, later in zip(gaps, gaps[1:], strict=False))
        clock.now = 61.0  # older than max_age_s: refused, saying why
        with pytest.raises(StaleState, match="could not be refreshed for 61s.*unreachable"):
            await cached.get()
        up = True
        clock.now = 200.0  # a request past the backoff waits for its refresh
        assert await cached.get() == "ring@200"

    asyncio.run(run())
