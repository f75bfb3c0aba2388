"""The scheduler's usage records on a real LanceDB folder (no Ray): the log (write,
reload, prune, compact) and its batching writer (batches, retries, a bounded buffer)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from airi_ray.core.accounting import UsageRecord
from airi_ray.data.usage import UsageLog
from airi_ray.runtime.usage_writer import UsageWriter


def record(rid: str, at: float, kind: str = "settle", tokens: int = 5) -> UsageRecord:
    return UsageRecord(kind, rid, "t", "m", tokens, tokens, at - 1.0, at)  # type: ignore[arg-type]


def test_the_log_reloads_appends_from_a_new_handle_and_prunes(tmp_path: Path) -> None:
    log = UsageLog(str(tmp_path))
    log.append([record("r1", 10.0), record("r2", 20.0, "open")])
    log.append([record("r3", 30.0)])
    log.append([])
    again = UsageLog(str(tmp_path))  # a restarted process
    assert sorted(again.load(), key=lambda r: r.at) == [
        record("r1", 10.0),
        record("r2", 20.0, "open"),
        record("r3", 30.0),
    ]
    assert sorted(r.request_id for r in again.load(since=20.0)) == ["r2", "r3"]
    again.prune(before=25.0)
    again.compact()
    assert [r.request_id for r in UsageLog(str(tmp_path)).load()] == ["r3"]


class FlakyLog:
    """A log whose first ``fail`` appends raise, then append for real."""

    def __init__(self, inner: UsageLog, fail: int) -> None:
        self.inner, self.fail, self.uri = inner, fail, inner.uri

    def append(self, records: list[UsageRecord]) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("storage unavailable")
        self.inner.append(records)

    def prune(self, before: float) -> None:
        self.inner.prune(before)

    def compact(self) -> None:
        self.inner.compact()


def test_flush_writes_in_batches_and_keeps_a_failed_batch_in_order(tmp_path: Path) -> None:
    log = UsageLog(str(tmp_path))
    flaky = FlakyLog(log, fail=1)
    w = UsageWriter(flaky, lambda now: 0.0, max_batch=2)  # type: ignore[arg-type]
    for i in range(5):
        w.add(record(f"r{i}", float(i + 1)))
    with pytest.raises(OSError):
        w.flush()
    assert w.pending() == 5  # the failed batch is back, ahead of the rest
    assert w.flush() == 5 and w.pending() == 0
    assert sorted(r.request_id for r in log.load()) == [f"r{i}" for i in range(5)]


def test_a_full_buffer_drops_the_oldest_and_never_blocks(tmp_path: Path) -> None:
    w = UsageWriter(UsageLog(str(tmp_path)), lambda now: 0.0, max_batch=2, max_buffer=3)
    for i in range(5):
        w.add(record(f"r{i}", float(i + 1)))
    assert w.pending() == 3 and w.dropped == 2
    w.flush()
    assert sorted(r.request_id for r in w.log.load()) == ["r2", "r3", "r4"]


def test_writer_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_buffer >= max_batch"):
        UsageWriter(UsageLog(str(tmp_path)), lambda now: 0.0, max_batch=10, max_buffer=5)


def test_the_background_writer_writes_within_the_interval_retries_and_prunes(
    tmp_path: Path,
) -> None:
    log = UsageLog(str(tmp_path))
    now = time.time()
    log.append([record("old", now - 10_000.0)])

    async def scenario() -> UsageWriter:
        w = UsageWriter(
            FlakyLog(log, fail=1),  # type: ignore[arg-type]
            lambda t: t - 5_000.0,
            interval_s=0.02,
            maintain_every_s=0.05,
        )
        assert w.start()
        w.add(record("r1", now))
        w.add(record("r2", now), urgent=True)
        deadline = time.monotonic() + 20
        while (w.pending() or w.written < 2 or _ids(log) != ["r1", "r2"]) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        await w.close()
        return w

    w = asyncio.run(scenario())
    assert w.failures == 1 and w.written == 2
    assert _ids(log) == ["r1", "r2"]  # written after one retry; the old record pruned


def _ids(log: UsageLog) -> list[str]:
    return sorted(r.request_id for r in log.load())


def test_start_without_an_event_loop_leaves_writing_to_flush(tmp_path: Path) -> None:
    assert not UsageWriter(UsageLog(str(tmp_path)), lambda now: 0.0).start()


def test_budget_totals_sum_each_tenants_window_before_a_time(tmp_path: Path) -> None:
    log = UsageLog(str(tmp_path))
    rows = [
        UsageRecord("settle", "r1", "a", "m", 10, 5, 99.0, 100.0),  # before a's window
        UsageRecord("settle", "r2", "a", "m", 10, 5, 199.0, 200.0),
        UsageRecord("open", "r3", "a", "m", 99, 0, 250.0, 250.0),  # not usage
        UsageRecord("settle", "r4", "a", "m", 1, 2, 299.0, 300.0),
        UsageRecord("settle", "r5", "b", "m", 7, 0, 299.0, 300.0),
        UsageRecord("settle", "r6", "a", "m", 50, 50, 399.0, 400.0),  # after ``before``
    ]
    log.append(rows)
    assert log.budget_totals({"a": 150.0, "b": 0.0, "c": 0.0}, before=350.0) == {"a": 18, "b": 7}
    assert log.budget_totals({}, before=350.0) == {}
