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
