"""``ReplicaSet`` with fake replica actors (no Ray cluster): starts, failed starts, health
checks, stops and adoption after a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import ray

from airi_ray.config import ModelSpec
from airi_ray.core.fleet import ReplicaRecord
from airi_ray.runtime import launch, replicas
from airi_ray.runtime.replicas import ReplicaSet


class _Call:
    def __init__(self, result: Any) -> None:
        self.result = result

    def remote(self, *args: Any) -> Any:
        async def run() -> Any:
            if isinstance(self.result, BaseException):
                raise self.result
            return self.result

        return run()


class _Actor:
    def __init__(self, start: Any = None, probe: Any = True, stats: Any = None) -> None:
        self.start = _Call(start or {"max_model_len": 128, "kv_capacity_tokens": 1000})
        self.probe = _Call(probe)
        self.stats = _Call(stats if stats is not None else {"running": 1})
        self.shutdown = _Call(None)


class _World:
    """The fakes a ReplicaSet talks to, and what it told them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.notes: list[str] = []
        self.ready: list[str] = []
        self.killed: list[Any] = []
        self.actors: dict[str, _Actor] = {}
        self.next_actor = _Actor
        self.persisted = 0
        monkeypatch.setattr(launch, "start_replica", self._start_replica)
        monkeypatch.setattr(launch, "get_actor", lambda rid: self.actors[rid])
        monkeypatch.setattr(ray, "kill", lambda handle, no_restart=True: self.killed.append(handle))
        monkeypatch.setattr(replicas, "PROBE_PERIOD_S", 0.0)

        async def ready(r: ReplicaRecord) -> None:
            self.ready.append(r.replica_id)

        def persist() -> None:
            self.persisted += 1

        self.set = ReplicaSet(self.notes.append, persist, ready)

    def _start_replica(self, rid: str, spec: ModelSpec, placement: Any) -> _Actor:
        self.actors[rid] = actor = self.next_actor()
        return actor


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def _spec() -> ModelSpec:
    return ModelSpec(name="m", version="v1", model="x")


def test_a_started_replica_becomes_ready_and_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    world = _World(monkeypatch)

    async def run() -> None:
        assert world.set.start(_spec(), [])
        [r] = world.set.records.values()
        assert r.state == "loading" and world.set.saved() == {}  # no actor yet
        await _settle()
        assert (r.state, r.max_model_len, world.ready) == ("ready", 128, [r.replica_id])
        assert world.set.saved()[r.replica_id]["key"] == "m@v1" and world.persisted == 1
        assert world.notes == [f"start replica {r.replica_id}", f"replica {r.replica_id} ready"]

    asyncio.run(run())


def test_failed_starts_are_counted_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    world = _World(monkeypatch)
    world.next_actor = lambda: _Actor(start=RuntimeError("out of memory\nmore"))

    async def run() -> None:
        world.set.start(_spec(), [])
        world.set.start(_spec(), [])
        await _settle()
        assert world.set.start_failures == {"m@v1": 2}
        assert world.set.start_errors == {"m@v1": "RuntimeError: out of memory more"}
        assert all(r.state == "failed" for r in world.set.records.values())
        assert len(world.killed) == 2 and world.ready == []

    asyncio.run(run())


def test_health_checks_mark_dead_and_hung_replicas_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    world = _World(monkeypatch)

    async def run() -> None:
        world.set.start(_spec(), [])
        world.set.start(_spec(), [])
        await _settle()
        hung, dead = list(world.set.records.values())
        world.actors[hung.replica_id].probe = _Call(TimeoutError("probe"))
        world.actors[dead.replica_id].stats = _Call(ray.exceptions.RayActorError())
        assert await world.set.check()  # the dead one failed at once
        assert (dead.state, hung.state, hung.probe_failures) == ("failed", "ready", 1)
        await world.set.check()
        assert (hung.state, hung.error) == ("failed", "failed health checks")
        assert world.actors[hung.replica_id] in world.killed

    asyncio.run(run())


def test_a_stopped_replica_leaves_service_at_once_then_shuts_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = _World(monkeypatch)

    async def run() -> None:
        world.set.start(_spec(), [])
        await _settle()
        [r] = world.set.records.values()
        actor = world.actors[r.replica_id]
        task = world.set.stop_soon(r, "scaled down")
        assert r.state == "stopping" and world.set.records == {}
        assert r.replica_id in world.set.stopping
        await task
        assert world.set.stopping == {} and world.set.handles == {}
        assert world.killed == [actor]
        assert world.notes[-1] == f"stop replica {r.replica_id}: scaled down"

    asyncio.run(run())


def test_replicas_of_before_a_restart_are_adopted_or_reported_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = _World(monkeypatch)
    world.actors["m-v1-aaaaaa"] = _Actor()
    saved = {
        "m-v1-aaaaaa": {
            "key": "m@v1",
            "state": "ready",
            "started_at": 5.0,
            "max_model_len": 64,
            "kv_capacity_tokens": 10,
            "lease": None,
        },
        "m-v0-bbbbbb": {"key": "m@v0", "state": "ready", "started_at": 1.0, "lease": None},
    }
    spec = _spec()

    async def run() -> None:
        world.set.adopt(saved, lambda key: spec if key == "m@v1" else None)
        [r] = world.set.records.values()
        assert (r.replica_id, r.state, r.max_model_len, r.started_at) == (
            "m-v1-aaaaaa",
            "ready",
            64,
            5.0,
        )
        assert world.notes == [
            "adopted replica m-v1-aaaaaa (m@v1)",
            "replica m-v0-bbbbbb from before the restart is gone: "
            "LookupError: m@v0 is no longer in the registry",
        ]

    asyncio.run(run())
