"""``UsageWriter``: the scheduler's usage records, written to the ``UsageLog`` in batches.

The scheduler's hot path (``enter``, ``acquire``, ``release``) only appends a record to a
bounded buffer; a background task writes what piled up as one LanceDB commit every
``interval_s``, or at once when the buffer holds ``max_batch`` records or a record is
urgent (its tenant is near its budget or concurrency limit). The write runs on a worker
thread, so the event loop never waits for storage. A failed write is logged and retried
with backoff, its records kept ahead of the newer ones; when the buffer is full (storage
down for long) the oldest records are dropped and counted, never the caller blocked.

What a kill loses: the records not yet written, i.e. at most ``interval_s`` of usage (one
write's latency for an urgent record). Old records are pruned (``keep_since``) and the
table compacted when the writer starts and every ``maintain_every_s`` after.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from airi_ray.core.accounting import UsageRecord
from airi_ray.data.usage import UsageLog
from airi_ray.runtime.background import spawn

logger = logging.getLogger(__name__)

INTERVAL_S = 0.1
MAX_BATCH = 1024
MAX_BUFFER = 200_000
MAINTAIN_EVERY_S = 120.0  # ~1,000 one-batch fragments at most between compactions
_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class UsageWriter:
    """Batches usage records for ``log``; ``keep_since(now)`` says what pruning keeps.

    Raises:
        ValueError: a setting is not positive.
    """

    def __init__(
        self,
        log: UsageLog,
        keep_since: Callable[[float], float],
        *,
        interval_s: float = INTERVAL_S,
        max_batch: int = MAX_BATCH,
        max_buffer: int = MAX_BUFFER,
        maintain_every_s: float = MAINTAIN_EVERY_S,
    ) -> None:
        if not (interval_s > 0 and max_batch > 0 and max_buffer >= max_batch):
            raise ValueError(
                "a usage writer needs interval_s > 0, max_batch > 0 and max_buffer >= "
                f"max_batch; got {interval_s}, {max_batch}, {max_buffer}"
            )
        self.log = log
        self._keep_since = keep_since
        self.interval_s = interval_s
        self.max_batch = max_batch
        self._buffer: deque[UsageRecord] = deque(maxlen=max_buffer)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.maintain_every_s = maintain_every_s
        self._maintained = -math.inf  # first thing after a (re)start: what piled up before
        self.written = 0
        self.dropped = 0
        self.failures = 0

    def add(self, record: UsageRecord, urgent: bool = False) -> None:
        """Buffer ``record``; ``urgent`` has it written at once instead of within the
        interval. Never blocks; with the buffer full, the oldest record is dropped."""
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                logger.error(
                    "usage buffer full (%d records not written): dropped %d records so far; "
                    "a restart would forget that usage",
                    len(self._buffer),
                    self.dropped,
                )
        self._buffer.append(record)
        if self._wake is not None and (urgent or len(self._buffer) >= self.max_batch):
            self._wake.set()

    def pending(self) -> int:
        """Records buffered and not yet written."""
        return len(self._buffer)

    def start(self) -> bool:
        """Start the background writer if an event loop runs here (else ``flush`` does the
        writing: tests, synchronous use). Returns whether it runs."""
        if self._task is not None and not self._task.done():
            return True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._wake = asyncio.Event()
        self._task = spawn(self._run())
        return True

    def flush(self) -> int:
        """Write everything buffered now, on this thread, in batches; returns how many
        records were written. Raises what the storage raises (the batch stays buffered)."""
        n = 0
        while self._buffer:
            batch = self._take()
            try:
                self.log.append(batch)
            except Exception:
                self._put_back(batch)
                raise
            n += len(batch)
        self.written += n
        return n

    async def close(self) -> None:
        """Stop the background task and write what is left (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self.flush)

    def _take(self) -> list[UsageRecord]:
        n = min(self.max_batch, len(self._buffer))
        return [self._buffer.popleft() for _ in range(n)]

    def _put_back(self, batch: list[UsageRecord]) -> None:
        """A batch whose write failed goes back ahead of the newer records (as many as fit:
        the newest are kept when the buffer overflows, as ``add`` does)."""
        room = (self._buffer.maxlen or 0) - len(self._buffer)
        keep = batch[-room:] if room < len(batch) else batch
        self.dropped += len(batch) - len(keep)
        self._buffer.extendleft(reversed(keep))

    async def _run(self) -> None:
        """Write a batch per wake-up (an interval, a full batch or an urgent record), and
        prune and compact now and then; a failure is logged and retried, never fatal."""
        assert self._wake is not None
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            while self._buffer:
                batch = self._take()
                try:
                    await asyncio.to_thread(self.log.append, batch)
                except Exception as e:
                    self._put_back(batch)
                    self.failures += 1
                    delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                    failures += 1
                    logger.warning(
                        "writing %d usage records failed (%s); retrying in %gs, %d buffered",
                        len(batch),
                        e,
                        delay,
                        len(self._buffer),
                    )
                    await asyncio.sleep(delay)
                    break
                failures = 0
                self.written += len(batch)
            now = time.time()
            if now - self._maintained >= self.maintain_every_s:
                self._maintained = now
                try:
                    await asyncio.to_thread(self._maintain, now)
                except Exception as e:
                    logger.warning("pruning the usage records failed (%s); next time", e)

    def _maintain(self, now: float) -> None:
        """Delete the records no rebuild needs any more, then merge the fragments."""
        self.log.prune(self._keep_since(now))
        self.log.compact()
