"""A ``GlobalScheduler`` replaced by a new one (a restart, without Ray) on a real LanceDB
folder: it keeps refusing what the old one refused (issue 21), holds the concurrency
slots of the calls still running, and charges their releases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from airi_ray.config import AppSpec
from airi_ray.core.accounting import UsageRecord
from airi_ray.core.errors import AiriError, SchedulerStarting
from airi_ray.core.policy import BudgetExceeded
from airi_ray.core.routing import ReplicaView
from airi_ray.core.scheduling import AcquireRequest, Lease
from airi_ray.data.usage import UsageLog
from airi_ray.runtime import scheduler as scheduler_module
from airi_ray.runtime.scheduler import GlobalScheduler


def spec(storage: Path, **tenant: Any) -> dict[str, Any]:
    app = {
        "models": [{"name": "m", "model": "x"}],
        "tenants": [{"name": "t", **tenant}, {"name": "u"}],
        "storage": {"uri": str(storage)},
    }
    return AppSpec.model_validate(app).model_dump()


def start(storage: Path, durable: bool = True, **tenant: Any) -> GlobalScheduler:
    s = GlobalScheduler(durable=durable)
    s.configure(spec(storage, **tenant))
    s.set_replicas("m", [ReplicaView("m-0", "m", max_concurrency=8)], [])
    return s


def call(s: GlobalScheduler, rid: str, prompt: int, completion: int, tenant: str = "t") -> None:
    """One whole call: enter, acquire, release with its real tokens."""
    assert s.enter("c", [AcquireRequest(rid, "m", tenant)]) == [None]
    [lease] = s.acquire("c", [AcquireRequest(rid, "m", tenant, prompt, completion)])
    assert isinstance(lease, Lease)
    s.release([(rid, {"prompt_tokens": prompt, "completion_tokens": completion}, False)], "c")


def refused(s: GlobalScheduler, rid: str) -> AiriError | None:
    [result] = s.enter("c", [AcquireRequest(rid, "m", "t")])
    if result is None:
        s.release([(rid, {}, False)], "c")
    return result


def test_a_spent_budget_is_still_spent_after_a_restart(tmp_path: Path) -> None:
    # Issue 21: 287 of 400 spent, the scheduler restarted, then 246 more without refusal.
    s = start(tmp_path, budget_tokens=400)
    call(s, "r1", 100, 187)
    call(s, "r2", 40, 33)  # 360: 90% of the budget
    assert s.usage is not None and s.usage.pending() == 4  # per call: entered, settled
    s.usage.flush()
    restarted = start(tmp_path, budget_tokens=400)
    assert restarted.policy.usage("t", time.time()).budget_spent == 360
    call(restarted, "r3", 30, 20)  # 410: the call that crosses the budget ran
    error = refused(restarted, "r4")
    assert isinstance(error, BudgetExceeded) and "410 used" in error.message
    # Without durable accounting the restart forgets it all (the bug).
    forgetful = start(tmp_path, durable=False, budget_tokens=400)
    assert refused(forgetful, "r5") is None


def test_a_tenant_near_its_budget_has_its_usage_written_at_once(tmp_path: Path) -> None:
    s = start(tmp_path, budget_tokens=400)
    assert s.usage is not None
    flags: list[bool] = []
    add = s.usage.add

    def spy(r: UsageRecord, urgent: bool = False) -> None:
        flags.append(urgent)
        add(r, urgent)

    s.usage.add = spy  # type: ignore[method-assign]
    call(s, "r1", 100, 100)  # 200: half the budget, the interval will do
    call(s, "r2", 100, 50)  # 350: 87.5%, its settle is written at once
    assert flags == [False, False, False, True]


def test_calls_in_flight_at_the_restart_keep_their_concurrency_slots(tmp_path: Path) -> None:
    s = start(tmp_path, max_concurrent=2)
    for rid in ("a", "b"):
        assert s.enter("c", [AcquireRequest(rid, "m", "t")]) == [None]
        [lease] = s.acquire("c", [AcquireRequest(rid, "m", "t", 10, 5)])
        assert isinstance(lease, Lease)
    assert s.usage is not None
    s.usage.flush()  # then the process dies with both calls running
    r = start(tmp_path, max_concurrent=2)
    error = refused(r, "x")
    assert error is not None and error.rule == "concurrency"  # not 2x the limit
    assert r.usage_stats()["orphans"] == 2
    assert r.heartbeat("c", ["a"]) == 0  # the caller still runs a
    assert r.usage_stats()["adopted"] == 1
    # b is named by no caller: after the grace period its slot is free again.
    r._sweep_orphans(time.monotonic() + scheduler_module.ORPHAN_GRACE_S + 1)
    assert r.usage_stats()["orphans"] == 0
    assert refused(r, "y") is None
    # a's release reaches the new process: its real tokens are charged, its slot freed.
    r.release([("a", {"prompt_tokens": 10, "completion_tokens": 5}, False)], "c")
    assert r.policy.in_flight("t") == 0 and r.usage_stats()["adopted"] == 0
    assert r.outstanding()["admissions"] == 0 and r.outstanding()["callers"] == {}


def test_calls_running_at_the_restart_keep_their_replicas_load(tmp_path: Path) -> None:
    """Before: the restarted scheduler counted adopted calls against their tenant's
    concurrency only, and saw their replica as idle."""
    s = start(tmp_path)
    placed = {}
    for rid in ("a", "b"):
        assert s.enter("c", [AcquireRequest(rid, "m", "t")]) == [None]
        [lease] = s.acquire("c", [AcquireRequest(rid, "m", "t", 100, 50)])
        assert isinstance(lease, Lease)
        placed[rid] = (lease.replica_id, lease.cost_tokens)
    assert s.usage is not None
    s.usage.flush()
    r = start(tmp_path)
    assert r.replica_in_flight("m") == {"m-0": 0}  # nobody has said what runs yet
    r.heartbeat("c", ["a", "b"], placed)
    assert r.replica_in_flight("m") == {"m-0": 2}
    [view] = r.core.replicas("m")
    assert view.in_flight_tokens == 300
    r.release([("a", {"prompt_tokens": 100, "completion_tokens": 50}, False)], "c")
    assert r.replica_in_flight("m") == {"m-0": 1}
    r.caller_gone("c")  # b's caller is gone: its slot is free too
    assert r.replica_in_flight("m") == {"m-0": 0}


def test_an_adopted_call_its_caller_forgets_is_taken_back_after_the_ttl(tmp_path: Path) -> None:
    s = start(tmp_path, max_concurrent=1)
    assert s.enter("c", [AcquireRequest("a", "m", "t")]) == [None]
    assert s.usage is not None
    s.usage.flush()
    r = start(tmp_path, max_concurrent=1)
    r.heartbeat("c", ["a"])
    later = time.monotonic() + r.callers.ttl_s + 1
    lost = r.callers.unheld("c", [], r._granted_at, later)
    assert lost == ["a"]  # a later heartbeat without it takes it back, as for a lease
    r.release([("a", {"error": "release_lost"}, False)], "c")
    assert r.policy.in_flight("t") == 0


def test_a_release_before_the_rebuild_is_charged_once_the_log_is_read(tmp_path: Path) -> None:
    s = start(tmp_path, budget_tokens=100)
    assert s.enter("c", [AcquireRequest("a", "m", "t")]) == [None]
    assert s.usage is not None
    s.usage.flush()
    r = GlobalScheduler(durable=True)  # restarted; the controller has not configured it yet
    r.release([("a", {"prompt_tokens": 60, "completion_tokens": 50}, False)], "c")
    r.configure(spec(tmp_path, budget_tokens=100))
    assert r.policy.usage("t", time.time()).budget_spent == 110
    assert r.outstanding()["admissions"] == 0
    r.set_replicas("m", [ReplicaView("m-0", "m", max_concurrency=8)], [])
    assert isinstance(refused(r, "b"), BudgetExceeded)


def test_a_restarted_scheduler_asks_callers_to_wait_until_it_knows_the_app() -> None:
    """Before the controller has sent the spec and every model's replicas, a request would
    be refused for an unknown tenant or model: it is told to ask again instead."""
    r = GlobalScheduler()
    with pytest.raises(SchedulerStarting):
        r.enter("c", [AcquireRequest("a", "m", "t")])
    r.configure(
        AppSpec.model_validate(
            {
                "models": [{"name": "m", "model": "x"}, {"name": "n", "model": "x"}],
                "tenants": [{"name": "t"}],
            }
        ).model_dump()
    )
    r.set_replicas("m", [ReplicaView("m-0", "m", max_concurrency=8)], [])
    with pytest.raises(SchedulerStarting):
        r.acquire("c", [AcquireRequest("a", "m", "t", prompt_tokens=3)])
    r.set_replicas("n", [], [])
    assert r.enter("c", [AcquireRequest("a", "m", "t")]) == [None]
    assert r.heartbeat("c", []) == 0


def test_rate_limits_and_fairness_counters_survive_a_restart(tmp_path: Path) -> None:
    s = start(tmp_path, rpm=2)
    call(s, "r1", 300, 100)
    call(s, "r2", 1, 1)
    call(s, "r3", 10, 10, tenant="u")
    assert s.usage is not None
    s.usage.flush()
    r = start(tmp_path, rpm=2)
    error = refused(r, "r4")
    assert error is not None and error.rule == "rpm"
    # t was served 301 + 2 * 101 = 503 weighted tokens, u 30: t is ahead by 473.
    assert r.core.virtual_counter("m", "t") == 473.0
    assert r.core.virtual_counter("m", "u") == 0.0


def test_an_unreadable_storage_leaves_accounting_in_memory_and_asks_again(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    s = GlobalScheduler(durable=True)
    s.configure(spec(blocker / "state", budget_tokens=10), "v1")
    s.set_replicas("m", [ReplicaView("m-0", "m", max_concurrency=1)], [])
    assert s.usage is None and s.needs_config("v1")  # the controller configures it again
    call(s, "r1", 5, 5)  # serving goes on meanwhile


def test_a_running_calls_prompt_still_counts_for_tokens_per_minute(tmp_path: Path) -> None:
    s = start(tmp_path, tpm=1000)
    assert s.enter("c", [AcquireRequest("a", "m", "t")]) == [None]
    [lease] = s.acquire("c", [AcquireRequest("a", "m", "t", 900, 10)])
    assert isinstance(lease, Lease)
    assert s.usage is not None
    s.usage.flush()  # killed while a runs: its 900 prompt tokens were charged at admission
    r = start(tmp_path, tpm=1000)
    assert r.enter("c", [AcquireRequest("b", "m", "t")]) == [None]
    [error] = r.acquire("c", [AcquireRequest("b", "m", "t", 500, 10)])
    assert isinstance(error, AiriError) and error.rule == "tpm"


def test_a_call_entered_before_the_restart_is_acquired_in_its_held_slot(tmp_path: Path) -> None:
    s = start(tmp_path, max_concurrent=1)
    assert s.enter("c", [AcquireRequest("a", "m", "t")]) == [None]
    assert s.usage is not None
    s.usage.flush()  # killed while the caller tokenizes a's prompt
    r = start(tmp_path, max_concurrent=1)
    [lease] = r.acquire("c", [AcquireRequest("a", "m", "t", 10, 5)])
    assert isinstance(lease, Lease)  # not refused for the slot it holds itself
    assert r.policy.in_flight("t") == 1 and r.usage_stats()["orphans"] == 0
    r._sweep_orphans(time.monotonic() + scheduler_module.ORPHAN_GRACE_S + 1)
    assert r.policy.in_flight("t") == 1  # still a's: no sweep settles it
    r.release([("a", {"prompt_tokens": 10, "completion_tokens": 5}, False)], "c")
    assert r.policy.in_flight("t") == 0 and r.outstanding()["admissions"] == 0


def test_the_usage_log_writer_is_exported_as_metrics(tmp_path: Path) -> None:
    s = start(tmp_path)
    call(s, "r1", 5, 5)
    text = s.metrics_text().decode()
    assert "airi_usage_records_pending 2.0" in text
    assert "airi_usage_records_written_total 0.0" in text
    assert s.usage is not None and s.usage.flush() == 2
    assert "airi_usage_records_written_total 2.0" in s.metrics_text().decode()
    assert "airi_usage_records" not in GlobalScheduler().metrics_text().decode()


def test_usage_from_earlier_in_the_budget_window_counts_after_a_restart(tmp_path: Path) -> None:
    midnight = time.time() // 86_400 * 86_400  # hours ago, unless the test runs at 00:xx
    UsageLog(str(tmp_path)).append(
        [
            UsageRecord("settle", f"r{i}", "t", "m", 100, 30, midnight + i, midnight + 1 + i)
            for i in range(3)
        ]
    )
    r = start(tmp_path, budget_tokens=400)
    assert r.policy.usage("t", time.time()).budget_spent == 390
