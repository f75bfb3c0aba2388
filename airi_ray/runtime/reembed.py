"""Re-embedding jobs: the collections of an embedding model follow it to a new version.

When an embedding model rolls out to a new version, the controller runs ``prepare`` as a
Ray task once the new version's replicas are ready, and gives the version traffic only
after it finished: every collection whose active embedder is that model gets a complete
table for the new version (``Collection.reembed``: incremental, idempotent, restartable),
embedded by the new version's replicas alone (calls pinned to the version, whatever the
traffic split). A query is embedded by whichever version the split picks and searches
that version's table (``Retriever.retrieve``), so no query mixes vectors of two versions.

When the new version is promoted, ``activate`` catches the new tables up with what was
ingested meanwhile (ingestion writes to the active version, pinned to it) and makes them
the active ones; the old version drains only after that, since ingestion needed it until
then. The jobs run as the runtime's own tenant: they are scheduled like any call, at
batch priority, and charged to no one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ray

from airi_ray.config import SYSTEM_TENANT
from airi_ray.core.registry import Job, JobKey, JobState
from airi_ray.core.requests import CallOptions
from airi_ray.data.collections import CollectionStore, collections_uri
from airi_ray.runtime.calls import CallPath
from airi_ray.runtime.retrieval import embed_from_thread


def collections_of(uri: str, model: str) -> list[str]:
    """Collections under ``uri`` whose active embedder is ``model``."""
    store = CollectionStore(collections_uri(uri), progress=False)
    return [n for n in store.names() if store.open(n).active().model == model]


async def _run(uri: str, model: str, version: str, activate: bool) -> dict[str, int]:
    path = CallPath()
    options = CallOptions(priority="batch", version=version)
    store = CollectionStore(collections_uri(uri), progress=False)
    embed = embed_from_thread(path, asyncio.get_running_loop(), model, SYSTEM_TENANT, options)

    try:
        probe, _ = await path.embed(model, ["dimension probe"], SYSTEM_TENANT, options)
        done: dict[str, int] = {}
        for name in await asyncio.to_thread(collections_of, uri, model):
            collection = store.open(name)
            if (await asyncio.to_thread(collection.active)).version == version:
                continue  # activated by an earlier try of this job
            done[name] = await asyncio.to_thread(
                collection.reembed, model, version, embed, dim=len(probe[0]), progress=False
            )
            if activate:
                await asyncio.to_thread(collection.activate, model, version)
        return done
    finally:
        await path.close()


@ray.remote(num_cpus=0, max_retries=2)
def prepare(uri: str, model: str, version: str) -> dict[str, int]:
    """Build every collection of ``model``'s table for ``version``; chunks embedded, by
    collection."""
    return asyncio.run(_run(uri, model, version, activate=False))


@ray.remote(num_cpus=0, max_retries=2)
def activate(uri: str, model: str, version: str) -> dict[str, int]:
    """Catch ``version``'s tables up and make them the active ones."""
    return asyncio.run(_run(uri, model, version, activate=True))


class Jobs:
    """The jobs the controller started, by (kind, model, version), and their states.

    Not saved: a restarted controller runs them again (they are idempotent).
    """

    def __init__(self, describe: Callable[[BaseException], str]) -> None:
        self.states: dict[JobKey, Job] = {}
        self._refs: dict[JobKey, Any] = {}
        self._describe = describe  # a failed job's error, for people

    def start(self, kind: str, model: str, version: str, uri: str) -> bool:
        """Start ``kind`` (``prepare`` or ``activate``) for a version unless it ran
        already; whether it started now."""
        key = (kind, model, version)
        if key in self.states:
            return False
        task = prepare if kind == "prepare" else activate
        self._refs[key] = task.remote(uri, model, version)
        self.states[key] = Job(JobState.RUNNING)
        return True

    def poll(self) -> list[str]:
        """Take in the outcome of the jobs that finished; a line for each that succeeded."""
        notes = []
        for key, ref in list(self._refs.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del self._refs[key]
            kind, model, version = key
            try:
                counts = ray.get(ref)
            except Exception as e:
                self.states[key] = Job(JobState.FAILED, self._describe(e))
            else:
                self.states[key] = Job(JobState.DONE)
                embedded = (
                    ", ".join(f"{n} {c} chunks" for n, c in counts.items()) or "no collections"
                )
                notes.append(f"{kind} collections of {model} for version {version}: {embedded}")
        return notes
