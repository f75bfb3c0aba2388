"""A dropped channel fails the requests still waiting on it (they used to wait forever).

A replica killed mid-load: one request's submit fails first, its caller drops the channel,
and the requests already streaming on that channel must hear of it too (retried elsewhere
if nothing was sent). Fakes stand in for the replica's actor handle; no Ray.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airi_ray.runtime.calls import ReplicaChannel, ReplicaDied


class _Silent:
    """A channel stream that never yields: the replica died without a word."""

    def __aiter__(self) -> _Silent:
        return self

    async def __anext__(self) -> Any:
        await asyncio.Event().wait()


class _Remote:
    def __init__(self, result: Any) -> None:
        self.result = result

    def options(self, **_: Any) -> _Remote:
        return self

    def remote(self, *_: Any) -> Any:
        return self.result


class _Pending:
    """An ObjectRef whose future never completes (the submit is in flight)."""

    def future(self) -> Any:
        return _NeverDone()


class _NeverDone:
    def add_done_callback(self, _: Any) -> None:
        pass


class _Handle:
    open_channel = _Remote(_Silent())
    submit = _Remote(_Pending())
    abort = _Remote(_Pending())


def test_closing_a_channel_fails_the_requests_waiting_on_it() -> None:
    async def run() -> None:
        channel = ReplicaChannel("r1", _Handle(), "c1")

        async def stream(rid: str) -> list[Any]:
            return [item async for item in channel.generate(rid, [1, 2], {})]

        waiting = [asyncio.create_task(stream(f"q{i}")) for i in range(3)]
        await asyncio.sleep(0.01)  # all three submitted and waiting for tokens
        assert not any(t.done() for t in waiting)
        channel.close()  # another request's caller saw the replica fail
        for t in waiting:
            with pytest.raises(ReplicaDied):
                await asyncio.wait_for(t, 1.0)
        with pytest.raises(ReplicaDied):  # and nothing new is sent to it
            await stream("later")

    asyncio.run(run())
