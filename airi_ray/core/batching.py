"""Dynamic batching window for embedding calls: gather requests, send them as one batch.

A pooling engine embeds 32 texts nearly as fast as one, so waiting a little to fill a
batch pays off, but only when more requests are actually coming. The window adapts to the
arrival rate:

- light load (few arrivals expected while waiting): wait ``min_wait_s``, since waiting
  longer would add latency without gathering anything;
- heavy load: wait up to ``max_wait_s``, linearly in the share of a full batch expected to
  arrive within ``max_wait_s``;
- a full batch (``max_batch``) goes at once;
- never past the earliest deadline of a queued item.

The arrival rate is an exponentially decayed count of arrivals (time constant
``rate_window_s``), read at ``now``: a burst raises it at once and a quiet spell lowers it
without needing further arrivals. The clock is an argument; the caller (an actor loop)
sleeps until ``next_flush_at`` or the next arrival, whichever comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Pending:
    item_id: str
    added_at: float
    deadline: float


class BatchWindow:
    """One engine's adaptive batching window.

    Args:
        max_batch: largest batch; reaching it flushes at once.
        min_wait_s: wait under light load (0 sends a lone request immediately).
        max_wait_s: longest wait under heavy load.
        rate_window_s: time constant of the arrival-rate estimate.

    Raises:
        ValueError: a bound is out of range.
    """

    def __init__(
        self,
        max_batch: int = 32,
        min_wait_s: float = 0.001,
        max_wait_s: float = 0.02,
        rate_window_s: float = 1.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not 0.0 <= min_wait_s <= max_wait_s:
            raise ValueError(
                f"need 0 <= min_wait_s <= max_wait_s, got {min_wait_s} and {max_wait_s}"
            )
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s}")
        self.max_batch = max_batch
        self.min_wait_s = min_wait_s
        self.max_wait_s = max_wait_s
        self.rate_window_s = rate_window_s
        self._pending: list[_Pending] = []
        self._rate = 0.0  # decayed arrivals per second, as of ``_rate_at``
        self._rate_at = 0.0
        self._earliest_deadline = math.inf
        # Batch sizes flushed so far, by size: a histogram bounded by ``max_batch`` keys.
        self.batch_sizes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item_id: str, now: float, deadline: float | None = None) -> None:
        """Queue one item.

        Args:
            deadline: the latest time the batch holding this item may be sent (the
                caller subtracts the expected embedding time from the answer's deadline).
        """
        self._rate = self.arrival_rate(now) + 1.0 / self.rate_window_s
        self._rate_at = now
        d = math.inf if deadline is None else deadline
        self._pending.append(_Pending(item_id, now, d))
        self._earliest_deadline = min(self._earliest_deadline, d)

    def arrival_rate(self, now: float) -> float:
        """Estimated arrivals per second at ``now``."""
        dt = max(now - self._rate_at, 0.0)
        return self._rate * math.exp(-dt / self.rate_window_s)

    def wait_s(self, now: float) -> float:
        """How long the window stays open after its first item, at the current load."""
        expected = self.arrival_rate(now) * self.max_wait_s  # arrivals within max_wait
        fill = min(expected / self.max_batch, 1.0)
        return self.min_wait_s + (self.max_wait_s - self.min_wait_s) * fill

    def next_flush_at(self, now: float) -> float | None:
        """When the current batch should go (may be <= now), or None if nothing is queued."""
        if not self._pending:
            return None
        if len(self._pending) >= self.max_batch:
            return now
        return min(self._pending[0].added_at + self.wait_s(now), self._earliest_deadline)

    def ready(self, now: float) -> bool:
        """Whether a batch should be sent now."""
        at = self.next_flush_at(now)
        return at is not None and at <= now

    def take(self, now: float) -> list[str]:
        """Remove and return the next batch (oldest first, at most ``max_batch`` ids).

        Call it when ``ready``; it returns whatever is queued regardless (e.g. at shutdown).
        """
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._earliest_deadline = min((p.deadline for p in self._pending), default=math.inf)
        if batch:
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        return [p.item_id for p in batch]
