"""The scheduler's front door (``GlobalScheduler.enter``): what it charges before a prompt
is tokenized, and that every way a request can end hands its entry back."""

from __future__ import annotations

import time
from typing import Any

import pytest

from airi_ray.config import AppSpec
from airi_ray.core.errors import AiriError
from airi_ray.core.routing import ReplicaView
from airi_ray.core.scheduling import AcquireRequest, Lease
from airi_ray.runtime.scheduler import GlobalScheduler


def scheduler(**tenant: Any) -> GlobalScheduler:
    s = GlobalScheduler()
    spec = {"models": [{"name": "m", "model": "x"}], "tenants": [{"name": "t", **tenant}]}
    s.configure(AppSpec.model_validate(spec).model_dump())
    s.set_replicas("m", [ReplicaView("m-0", "m", max_concurrency=4)], [])
    return s


def books(s: GlobalScheduler) -> dict[str, Any]:
    out = s.outstanding()
    return {k: out[k] for k in ("callers", "admissions", "entered")}


EMPTY = {"callers": {}, "admissions": 0, "entered": 0}


def test_an_entry_refused_later_is_handed_back_and_counted_as_a_request() -> None:
    s = scheduler(rpm=2)
    assert s.enter("c", [AcquireRequest("r1", "m", "t")]) == [None]
    assert books(s) == {"callers": {"c": 1}, "admissions": 1, "entered": 1}
    s.release([("r1", {"error": "refused"}, False)], "c")  # too long for the model
    assert books(s) == EMPTY
    assert s.enter("c", [AcquireRequest("r2", "m", "t")]) == [None]
    [refused] = s.enter("c", [AcquireRequest("r3", "m", "t")])
    assert isinstance(refused, AiriError) and "2 requests/minute" in refused.message


def test_acquire_after_enter_takes_the_same_slot_and_charges_the_tokens() -> None:
    s = scheduler(max_concurrent=1, tpm=1000)
    assert s.enter("c", [AcquireRequest("r1", "m", "t", messages=1, prompt_chars=5)]) == [None]
    [lease] = s.acquire("c", [AcquireRequest("r1", "m", "t", 10, 5)])
    assert isinstance(lease, Lease)
    assert s.policy.in_flight("t") == 1
    [busy] = s.enter("c", [AcquireRequest("r2", "m", "t")])
    assert isinstance(busy, AiriError) and busy.rule == "concurrency"
    s.release([("r1", {"prompt_tokens": 10, "completion_tokens": 5}, False)], "c")
    assert books(s) == EMPTY and s.policy.in_flight("t") == 0


def test_the_door_checks_the_request_shape() -> None:
    s = scheduler(max_messages=2)
    [refused] = s.enter("c", [AcquireRequest("r1", "m", "t", messages=3)])
    assert isinstance(refused, AiriError) and refused.status == 400
    assert "messages 3 is over the limit of 2" in refused.message
    assert books(s) == EMPTY


def test_an_entry_refused_at_acquire_is_settled_there() -> None:
    s = scheduler(tpm=100)
    assert s.enter("c", [AcquireRequest("r1", "m", "t")]) == [None]
    [lease] = s.acquire("c", [AcquireRequest("r1", "m", "t", 60, 5)])
    assert isinstance(lease, Lease)
    s.release([("r1", {"prompt_tokens": 60}, False)], "c")  # 40 tokens left this minute
    assert s.enter("c", [AcquireRequest("r2", "m", "t")]) == [None]
    [over] = s.acquire("c", [AcquireRequest("r2", "m", "t", 50, 5)])
    assert isinstance(over, AiriError) and over.rule == "tpm"
    assert books(s) == EMPTY and s.policy.in_flight("t") == 0


def test_a_caller_that_goes_away_loses_its_entries() -> None:
    s = scheduler(max_concurrent=1)
    assert s.enter("c", [AcquireRequest("r1", "m", "t")]) == [None]
    assert s.caller_gone("c") == 1
    assert books(s) == EMPTY and s.policy.in_flight("t") == 0


def test_an_entry_its_caller_no_longer_names_is_taken_back_after_the_ttl() -> None:
    s = scheduler()
    assert s.enter("c", [AcquireRequest("r1", "m", "t")]) == [None]
    assert s.heartbeat("c", held=[]) == 0  # too recent: its release may be on its way
    s._entered["r1"] = time.monotonic() - 60  # as if it entered a minute ago
    assert s.heartbeat("c", held=["r1"]) == 0  # still named: still the caller's
    assert s.heartbeat("c", held=[]) == 1
    assert books(s) == EMPTY


def test_an_id_already_in_the_scheduler_is_refused() -> None:
    s = scheduler()
    assert s.enter("c", [AcquireRequest("r1", "m", "t")]) == [None]
    [dup] = s.enter("c", [AcquireRequest("r1", "m", "t")])
    assert isinstance(dup, AiriError) and dup.status == 400


@pytest.mark.parametrize("tenant", ["nobody", ""])
def test_an_unknown_tenant_is_refused_at_the_door(tenant: str) -> None:
    s = scheduler()
    [refused] = s.enter("c", [AcquireRequest("r1", "m", tenant)])
    assert isinstance(refused, AiriError) and refused.status == 403
    assert books(s) == EMPTY
