"""``Outbox``: what an actor has for one remote reader, sent as one list per wake-up.

A Ray message costs about as much as generating several tokens, so an actor never sends
one message per item: items pile up in the outbox while the reader's previous message is
on its way, and the next message carries all of them (replica channels, scheduler grants).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    def __init__(self) -> None:
        self._buffer: list[T] = []
        self._wake = asyncio.Event()
        self._closed = False

    def push(self, item: T) -> None:
        self._buffer.append(item)
        self._wake.set()

    def close(self) -> None:
        """End ``batches`` (what is still buffered is dropped: the owner takes it back)."""
        self._closed = True
        self._buffer = []
        self._wake.set()

    async def batches(self) -> AsyncIterator[list[T]]:
        """Yield what piled up, a list per wake-up, until ``close`` (or the reader closes
        the stream)."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            batch, self._buffer = self._buffer, []
            if batch and not self._closed:
                yield batch
