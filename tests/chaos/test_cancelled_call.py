"""A call cancelled inside a process that serves many (Serve cancels an HTTP request when
its client hangs up) takes nothing of the others down with it.

In an async actor every Ray call started from a task that a call created is that call's
child, and cancelling the call cancels its children. The call path's grant stream and
replica channels are opened by whichever call comes first; before they were started in a
context of their own, cancelling that call cancelled them, and every other request
streaming on those channels failed (a hung-up HTTP client broke other clients' answers).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from airi_ray.runtime import names
from tests.conftest import KEY, wait_for

CALLER = "test-cancelled-call-caller"


@ray.remote(max_concurrency=100)
class _Caller:
    """A process serving several calls through one client, like the ingress."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.client: Any = None

    async def _client(self) -> Any:
        if self.client is None:
            from airi_ray.client import AsyncClient

            self.client = AsyncClient(api_key=self.api_key)
            await self.client.warm()
        return self.client

    async def open_everything_then_wait(self, replicas: list[str]) -> None:
        """The first call: opens the grant stream and a channel to every replica, then
        waits until it is cancelled."""
        client = await self._client()
        for _ in range(40):
            if set(client.backend._path._channels) >= set(replicas):
                break
            await asyncio.gather(
                *(client.chat("tiny-chat", f"warm {i}", max_tokens=1) for i in range(4))
            )
        assert set(client.backend._path._channels) >= set(replicas), "not every replica was reached"
        await asyncio.sleep(600)

    async def channels(self) -> list[str]:
        return sorted((await self._client()).backend._path._channels)

    async def long_answer(self, max_tokens: int) -> int:
        client = await self._client()
        done = await client.chat("tiny-chat", "go on", max_tokens=max_tokens, ignore_eos=True)
        return done.usage.completion_tokens

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _ready_replicas(client: Any) -> list[str]:
    return sorted(
        r["replica_id"]
        for r in client.status()["replicas"]
        if r["model"].split("@")[0] == "tiny-chat" and r["state"] == "ready"
    )


def test_a_cancelled_call_leaves_the_other_calls_of_its_process_running(airi_app, client) -> None:
    replicas = _ready_replicas(client)
    assert replicas
    caller = _Caller.options(name=CALLER, namespace="airi").remote(KEY)
    try:
        first = caller.open_everything_then_wait.remote(replicas)
        wait_for(
            lambda: set(ray.get(caller.channels.remote())) >= set(replicas),
            timeout=60,
            what="the first call to open a channel to every replica",
        )
        other = caller.long_answer.remote(300)
        scheduler = names.get_actor(names.SCHEDULER_NAME)

        def streaming() -> bool:
            leases = ray.get(scheduler.outstanding.remote())["models"]["tiny-chat"]["leases"]
            return any(CALLER in (x["caller"] or "") for x in leases)

        wait_for(streaming, timeout=30, what="the other call to hold a lease")
        ray.cancel(first)  # what Serve does when the first call's client hangs up

        # The other call streams on a channel the cancelled one opened: it finishes.
        assert ray.get(other, timeout=120) == 300
        assert ray.get(caller.long_answer.remote(5), timeout=60) == 5
        assert _ready_replicas(client) == replicas  # nobody took a replica for dead
    finally:
        ray.get(caller.close.remote(), timeout=30)
        ray.kill(caller)
