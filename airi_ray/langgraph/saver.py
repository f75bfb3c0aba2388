"""``AiriCheckpointSaver``: a LangGraph checkpointer on airi's context store.

LangGraph's own ``BaseCheckpointSaver`` interface, so a graph compiled with
``checkpointer=AiriCheckpointSaver.on_cluster("tenant-a")`` persists and resumes its threads
in airi's durable, tenant-scoped store. A write returns once the store has committed it
(group-committed with the store's other writes); a tenant sees only its own threads.

Checkpoints, metadata and channel values are serialized here with the saver's serde
(LangGraph's ``JsonPlusSerializer`` by default) and travel as ``"type:base64"`` strings; the
metadata also travels as JSON, which ``list(filter=...)`` matches against. The store keeps
each channel value once per version, as LangGraph's own savers do.

The store is either in this process (``AiriCheckpointSaver.local(uri, tenant)``: tests, a
laptop) or the cluster's context store actor (``on_cluster``). The async methods are native;
the sync ones (LangGraph's sync graph API calls them from worker threads) run the same
coroutines on a loop thread the saver owns.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        SerializerProtocol,
        get_checkpoint_id,
        get_checkpoint_metadata,
    )
except ImportError as e:  # the extra is optional
    raise ImportError(
        "AiriCheckpointSaver needs LangGraph: pip install 'airi-ray[langgraph]'"
    ) from e

from airi_ray.core.errors import InvalidRequest
from airi_ray.runtime import names
from airi_ray.runtime.context_store import ContextStore

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread: where sync calls (and an in-process store) run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="airi-checkpoint-saver", daemon=True
        )
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


class StoreClient(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalStore:
    """A ``ContextStore`` in this process; every call runs on the saver's loop, which owns
    the store's futures and its commit task."""

    def __init__(self, store: ContextStore, loop: _Loop) -> None:
        self.store = store
        self._loop = loop

    async def call(self, method: str, *args: Any) -> Any:
        coro = getattr(self.store, method)(*args)
        if asyncio.get_running_loop() is self._loop.loop:
            return await coro
        return await asyncio.wrap_future(self._loop.submit(coro))


class ActorStore:
    """The cluster's context store actor, by its handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)


def _dump(typed: tuple[str, bytes]) -> str:
    kind, data = typed
    return f"{kind}:{base64.b64encode(data).decode('ascii')}"


def _undump(text: str) -> tuple[str, bytes]:
    kind, _, data = text.rpartition(":")  # base64 has no ':'
    return kind, base64.b64decode(data)


def _jsonable(value: Any) -> Any:
    """``value`` as the JSON the store compares filters with (non-JSON leaves as text)."""
    return json.loads(json.dumps(value, default=str))


def _configurable(config: RunnableConfig) -> dict[str, Any]:
    conf = config.get("configurable") if isinstance(config, dict) else None
    if not isinstance(conf, dict) or not conf.get("thread_id"):
        raise InvalidRequest(
            'a checkpointer config needs {"configurable": {"thread_id": ...}}, got '
            f"{config!r:.200}"
        )
    return conf


class AiriCheckpointSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose threads live in airi's context store, for one tenant.

    Args:
        client: the store: a ``LocalStore`` or an ``ActorStore`` (see ``local`` and
            ``on_cluster``).
        tenant: the tenant whose threads this saver reads and writes.
        serde: LangGraph serializer (default: ``JsonPlusSerializer``).
    """

    def __init__(
        self,
        client: StoreClient,
        tenant: str,
        *,
        serde: SerializerProtocol | None = None,
        loop: _Loop | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidRequest("tenant must be a non-empty string")
        self.client = client
        self.tenant = tenant
        self._owns_loop = loop is None
        self._loop = loop or _Loop()

    @classmethod
    def local(
        cls, uri: str, tenant: str, *, serde: SerializerProtocol | None = None
    ) -> AiriCheckpointSaver:
        """A saver over a context store in this process, on the LanceDB storage ``uri``."""
        return cls.over(ContextStore(uri), tenant, serde=serde)

    @classmethod
    def over(
        cls, store: ContextStore, tenant: str, *, serde: SerializerProtocol | None = None
    ) -> AiriCheckpointSaver:
        """A saver over an existing in-process ``ContextStore``, which then runs on the
        saver's loop: use it only through this saver (and ``for_tenant`` of it)."""
        loop = _Loop()
        saver = cls(LocalStore(store, loop), tenant, serde=serde, loop=loop)
        saver._owns_loop = True
        return saver

    @classmethod
    def on_cluster(
        cls, tenant: str, *, serde: SerializerProtocol | None = None
    ) -> AiriCheckpointSaver:
        """A saver over the context store actor of the airi app on the connected Ray cluster.

        Raises:
            ValueError: no airi context store runs on the cluster (deploy the app first).
        """
        return cls(ActorStore(names.get_actor(names.CONTEXT_STORE_NAME)), tenant, serde=serde)

    def for_tenant(self, tenant: str) -> AiriCheckpointSaver:
        """A saver of another tenant over the same store, sharing this one's loop (an
        in-process store must stay on one loop); close this one last."""
        return AiriCheckpointSaver(self.client, tenant, serde=self.serde, loop=self._loop)

    def close(self) -> None:
        """Stop the saver's loop thread (a saver from ``for_tenant`` leaves it running)."""
        if self._owns_loop:
            self._loop.close()

    # -- async (native) --------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = _configurable(config)
        got = await self.client.call(
            "lg_get",
            self.tenant,
            conf["thread_id"],
            conf.get("checkpoint_ns", ""),
            get_checkpoint_id(config),
        )
        return None if got is None else self._tuple(got)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        conf = _configurable(config) if config is not None else {}
        found = await self.client.call(
            "lg_list",
            self.tenant,
            conf.get("thread_id"),
            conf.get("checkpoint_ns"),
            conf.get("checkpoint_id"),
            _jsonable(filter) if filter else None,
            get_checkpoint_id(before) if before else None,
            limit,
        )
        for got in found:
            yield self._tuple(got)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        conf = _configurable(config)
        thread_id, ns = conf["thread_id"], conf.get("checkpoint_ns", "")
        c = dict(checkpoint)
        values: dict[str, Any] = c.pop("channel_values", {})  # stored per version, as blobs
        meta = get_checkpoint_metadata(config, metadata)
        blobs = [
            [k, str(v), _dump(self.serde.dumps_typed(values[k])) if k in values else None]
            for k, v in new_versions.items()
        ]
        await self.client.call(
            "lg_put",
            self.tenant,
            thread_id,
            ns,
            {
                "checkpoint_id": checkpoint["id"],
                "parent_id": conf.get("checkpoint_id"),
                "checkpoint": _dump(self.serde.dumps_typed(c)),
                "metadata": _dump(self.serde.dumps_typed(meta)),
                "meta": _jsonable(meta),
                "versions": {k: str(v) for k, v in checkpoint["channel_versions"].items()},
            },
            blobs,
        )
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        conf = _configurable(config)
        await self.client.call(
            "lg_put_writes",
            self.tenant,
            conf["thread_id"],
            conf.get("checkpoint_ns", ""),
            conf.get("checkpoint_id"),
            task_id,
            [
                [channel, WRITES_IDX_MAP.get(channel, idx), _dump(self.serde.dumps_typed(value))]
                for idx, (channel, value) in enumerate(writes)
            ],
            task_path,
        )

    async def adelete_thread(self, thread_id: str) -> None:
        await self.client.call("lg_delete_thread", self.tenant, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self.client.call("lg_delete_for_runs", self.tenant, list(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self.client.call("lg_copy_thread", self.tenant, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads: ``keep_latest`` keeps each namespace's newest checkpoint (with its
        writes and values), ``delete`` deletes them. Ancestors are dropped, so a graph with
        LangGraph's ``DeltaChannel`` should not be pruned with ``keep_latest``."""
        await self.client.call("lg_prune", self.tenant, list(thread_ids), strategy)

    # -- sync (the same coroutines on the saver's loop thread) -----------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop.loop:
            coro.close()
            raise RuntimeError("call the async methods of AiriCheckpointSaver from its loop")
        return self._loop.submit(coro).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._run(self.aget_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        yield from self._run(collect())

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._run(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._run(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(self.aprune(thread_ids, strategy=strategy))

    # -- helpers ---------------------------------------------------------------------------

    def get_next_version(self, current: str | None, channel: None) -> str:
        """A new channel version: the counter, then a random fraction, as LangGraph's own
        savers do, so that versions written on two forks of a thread never collide."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    def _tuple(self, got: dict[str, Any]) -> CheckpointTuple:
        thread_id, ns = got["thread_id"], got["ns"]
        checkpoint = self.serde.loads_typed(_undump(got["checkpoint"]))
        checkpoint["channel_values"] = {
            ch: self.serde.loads_typed(_undump(v)) for ch, v in got["values"].items()
        }
        parent = got["parent_id"]
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": ns,
                    "checkpoint_id": got["checkpoint_id"],
                }
            },
            checkpoint=checkpoint,
            metadata=self.serde.loads_typed(_undump(got["metadata"])),
            parent_config=(
                {
                    "configurable": {
                        "thread_id": thread_id,
                        "checkpoint_ns": ns,
                        "checkpoint_id": parent,
                    }
                }
                if parent
                else None
            ),
            pending_writes=[
                (task_id, channel, self.serde.loads_typed(_undump(v)))
                for task_id, channel, v in got["writes"]
            ],
        )
