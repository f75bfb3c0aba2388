"""The context store's process killed with SIGKILL during a burst of concurrent writes:
every acknowledged write is present exactly once afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import ray

from airi_ray.runtime import names
from tests.conftest import wait_for

WRITERS = 16
TURNS_PER_WRITER = 40


def test_acknowledged_writes_survive_a_sigkill_exactly_once(airi_app) -> None:
    store = names.get_actor(names.CONTEXT_STORE_NAME)
    pid = ray.get(store.stats.remote())["pid"]
    tenant, prefix = "tenant-a", f"chaos-{time.time_ns()}"
    acked: set[tuple[str, int]] = set()
    failures = {"n": 0}

    async def writer(w: int) -> None:
        conversation = f"{prefix}-{w}"
        for seq in range(TURNS_PER_WRITER):
            turn = {"role": "user", "content": f"{w}/{seq}", "seq": seq}
            while True:  # a client retries until acknowledged; the seq makes retries safe
                try:
                    await store.append_turns.remote(tenant, conversation, [turn])
                    acked.add((conversation, seq))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                    failures["n"] += 1
                    await asyncio.sleep(0.05)

    async def killer() -> None:
        while len(acked) < WRITERS * TURNS_PER_WRITER // 4:
            await asyncio.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    async def burst() -> None:
        await asyncio.gather(killer(), *[writer(w) for w in range(WRITERS)])

    asyncio.run(burst())
    assert failures["n"] > 0  # the kill landed mid-burst
    assert ray.get(store.stats.remote())["pid"] != pid

    def conversation(w: int) -> list[dict[str, Any]]:
        return ray.get(store.conversation.remote(tenant, f"{prefix}-{w}"))

    for w in range(WRITERS):
        turns = wait_for(lambda w=w: conversation(w), what="the restarted store")
        seqs = [t["seq"] for t in turns]
        assert seqs == list(range(TURNS_PER_WRITER)), (w, seqs)  # each once, none missing
        assert [t["content"] for t in turns] == [f"{w}/{s}" for s in seqs]
    assert len(acked) == WRITERS * TURNS_PER_WRITER
