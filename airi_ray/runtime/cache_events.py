"""A replica's engine tells the scheduler what its prefix cache holds (``prefix_cache_view:
engine``).

The engine core publishes vLLM's KV cache events on a ZMQ socket of this replica's own (an
``ipc://`` path). ``CacheReporter`` reads them on a thread, keeps a ``core.kv_events``
mirror in the router's block hashes, and every ``REPORT_PERIOD_S`` sends the scheduler
what changed. The scheduler answers False when it cannot apply a change (it restarted,
or does not know this replica yet), and the next report is then a full snapshot; a gap in
the events' sequence numbers (missed events) starts the mirror over the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import uuid
from typing import Any

from airi_ray.core.kv_events import CacheMirror
from airi_ray.runtime import names

logger = logging.getLogger(__name__)

REPORT_PERIOD_S = 0.05
# After a report the scheduler could not take: a snapshot next, but not sooner than this
# (a replica's snapshot can be megabytes; a restarting scheduler should not get 20 a second).
SNAPSHOT_RETRY_S = 1.0
_RECV_TIMEOUT_MS = 200  # how often the reader thread looks at its stop flag


def new_endpoint() -> str:
    """A fresh ``ipc://`` address for one engine's events (the path's length stays well
    under the 107 bytes a Unix socket allows)."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'airi-kv-{uuid.uuid4().hex[:12]}')}"


def _own_tier(e: Any) -> bool:
    """An event about this engine's own device cache, in its first KV cache group: not an
    offloading tier's, not a remote one's, and not a hybrid model's other groups (whose
    blocks share their hashes with the first group's, so their evictions would take the
    first group's blocks out of the mirror)."""
    return (
        e.medium in (None, "GPU")
        and getattr(e, "locality", None) != "REMOTE"
        and getattr(e, "group_idx", None) in (None, 0)
    )


def _mirrored(e: Any) -> bool:
    """A stored block the router can key: one of ``_own_tier``, and hashed from its tokens
    alone. Blocks hashed with more than tokens (a LoRA adapter, images, a cache salt,
    prompt embeddings) or from a sliding window are left out, with their children (whose
    parent the mirror then does not hold): the router's hashes cannot tell them apart
    from a plain prompt's."""
    return (
        _own_tier(e)
        and not e.lora_name
        and not any(getattr(e, "extra_keys", None) or ())
        and getattr(e, "kv_cache_spec_sliding_window", None) is None
    )


class CacheReporter:
    """Follows one engine's KV cache events and reports them to the scheduler."""

    def __init__(self, replica_id: str, endpoint: str) -> None:
        import zmq

        self.replica_id = replica_id
        self.endpoint = endpoint
        self.mirror = CacheMirror()
        self.events = 0
        self.gaps = 0
        self.failed = False  # the reader died: the view is empty from then on
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._snapshot_next = True
        # Subscribed before the engine starts publishing, so no early event is missed.
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, _RECV_TIMEOUT_MS)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._read, name="airi-kv-events", daemon=True)
        self._thread.start()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reporting (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._report_loop())

    def stop(self) -> None:
        """Stop reading and reporting, and remove the socket's file (the engine, stopped
        first, leaves it behind)."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint.removeprefix("ipc://"))

    def _read(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import (
            AllBlocksCleared,
            BlockRemoved,
            BlockStored,
            KVEventBatch,
        )

        decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        last_seq: int | None = None
        try:
            while not self._stop.is_set():
                try:
                    _topic, seq_bytes, payload = self._sock.recv_multipart()
                except zmq.Again:
                    continue
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                batch = decode(payload)
                with self._lock:
                    m = self.mirror
                    if last_seq is not None and seq != last_seq + 1:
                        # Events were missed: what the mirror holds is unknown. Start over.
                        self.gaps += 1
                        logger.warning(
                            "replica %s missed KV cache events %d..%d; its cache view starts over",
                            self.replica_id,
                            last_seq + 1,
                            seq - 1,
                        )
                        m.cleared()
                    last_seq = seq
                    for e in batch.events:
                        self.events += 1
                        if isinstance(e, BlockStored):
                            if _mirrored(e):
                                m.stored(
                                    e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size
                                )
                        elif isinstance(e, BlockRemoved):
                            if _own_tier(e):
                                m.removed(e.block_hashes)
                        elif isinstance(e, AllBlocksCleared):
                            m.cleared()
        except Exception:
            # The view can no longer follow the engine: empty it, and the next report has
            # the scheduler forget it too, so routing to this replica falls back on load
            # instead of on blocks the engine may long have evicted.
            logger.exception("replica %s stopped reading its KV cache events", self.replica_id)
            with self._lock:
                self.mirror.cleared()
                self.failed = True
        finally:
            self._sock.close(linger=0)

    async def _report_loop(self) -> None:
        scheduler: Any = None
        applied = True
        while True:
            await asyncio.sleep(REPORT_PERIOD_S if applied else SNAPSHOT_RETRY_S)
            with self._lock:
                snapshot = self._snapshot_next
                delta = self.mirror.snapshot() if snapshot else self.mirror.take()
            if not delta:
                continue
            try:
                if scheduler is None:
                    scheduler = names.get_actor(names.SCHEDULER_NAME)
                applied = await scheduler.observe_cache.remote(self.replica_id, delta)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # restarting: the next report is a snapshot
                logger.info("replica %s: cache report not delivered: %s", self.replica_id, e)
                scheduler, applied = None, False
            self._snapshot_next = not applied

    def stats(self) -> dict[str, int]:
        return {
            "kv_events": self.events,
            "kv_event_gaps": self.gaps,
            "kv_blocks_mirrored": len(self.mirror),
            "kv_unknown_parents": self.mirror.unknown_parents,
            "kv_events_failed": int(self.failed),
        }
