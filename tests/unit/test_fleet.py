"""The replica fleet: the reconcile plan (start, stop, respec, forget), the replicas each
version wants, what a deploy waits for, autoscaling steps, and the status views."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from airi_ray.config import ModelSpec
from airi_ray.core import fleet
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.fleet import Forget, ReplicaRecord, Respec, Start, Stop
from airi_ray.core.placement import Packer
from airi_ray.core.registry import Registry


def _spec(name: str = "m", version: str = "v1", **fields: Any) -> ModelSpec:
    return ModelSpec(name=name, version=version, model="x", **fields)


def _rec(rid: str, spec: ModelSpec, state: str = "ready", started_at: float = 0.0) -> ReplicaRecord:
    return ReplicaRecord(rid, spec, started_at, state=state)


def test_reconcile_stops_what_left_the_spec_and_starts_what_is_missing() -> None:
    v1, v2, v3 = _spec(), _spec(version="v2"), _spec(version="v3")
    records = [
        _rec("r1", v1),
        _rec("r2", v1, "loading", started_at=5.0),
        _rec("r3", v2, "failed"),
        _rec("r4", _spec("old")),
        _rec("r5", v3),
    ]
    targets = {"m@v1": (v1, 1), "m@v2": (v2, 2)}
    plan = fleet.plan_reconcile(records, targets, {"m"}, set())
    assert plan == [
        Respec("r1", v1),
        Respec("r2", v1),
        Respec("r3", v2),
        Stop("r4", "no longer in the spec"),
        Stop("r5", "version retired"),
        Stop("r2", "scaled down"),  # a loading replica goes before a ready one
        Forget("r3"),  # failed: dropped, its place freed, then replaced
        Start(v2, 2),
    ]


def test_scaling_down_stops_the_youngest_ready_replicas() -> None:
    v1 = _spec()
    records = [_rec("old", v1, started_at=1.0), _rec("young", v1, started_at=2.0)]
    plan = fleet.plan_reconcile(records, {"m@v1": (v1, 1)}, {"m"}, set())
    assert [a for a in plan if isinstance(a, Stop)] == [Stop("young", "scaled down")]


def test_replicas_whose_engine_changed_are_replaced_and_do_not_count() -> None:
    old, new = _spec(), _spec(engine={"max_model_len": 64})
    records = [_rec("r1", old)]
    plan = fleet.plan_reconcile(records, {"m@v1": (new, 1)}, {"m"}, set())
    assert plan == [Stop("r1", "its engine settings changed"), Start(new, 1)]


def test_a_spec_change_that_keeps_the_engine_keeps_the_replica() -> None:
    old, new = _spec(), _spec(max_batch_size=8)
    plan = fleet.plan_reconcile([_rec("r1", old)], {"m@v1": (new, 1)}, {"m"}, set())
    assert plan == [Respec("r1", new)]


def test_a_version_given_up_on_starts_nothing_and_a_draining_one_keeps_its_replicas() -> None:
    v1, v2 = _spec(), _spec(version="v2")
    records = [_rec("r1", v2), _rec("r2", v2, "failed")]
    targets = {"m@v1": (v1, 2), "m@v2": (v2, None)}
    plan = fleet.plan_reconcile(records, targets, {"m"}, {"m@v1"})
    assert plan == [Respec("r1", v2), Respec("r2", v2), Forget("r2")]


def test_the_wanted_count_is_the_autoscalers_within_the_spec_bounds() -> None:
    fixed = _spec(replicas=3)
    assert fleet.wanted(fixed, {"m": 9}) == 3
    scaled = _spec(replicas=1, autoscale={"min_replicas": 2, "max_replicas": 4})
    assert fleet.wanted(scaled, {}) == 2  # starts at its floor
    assert fleet.wanted(scaled, {"m": 4}) == 4
    cold = _spec(replicas=1, autoscale={"max_replicas": 4, "scale_to_zero": True})
    assert fleet.wanted(cold, {}) == 1


def test_a_record_tells_its_view_and_its_saved_form() -> None:
    r = _rec("r1", _spec(resources={"accelerator_type:L4": 1}), "loading")
    view = r.view()
    assert (view.accelerator, view.ready, view.starting, view.version) == ("L4", False, True, "v1")
    assert r.record()["key"] == "m@v1" and r.record()["lease"] is None
    assert _rec("r2", _spec(num_gpus=1)).view().accelerator == "GPU"


def test_the_status_views_show_versions_traffic_and_replicas() -> None:
    spec = _spec(replicas=2, versions={"v2": {}}, rollout={"strategy": "canary"})
    reg = Registry()
    reg.register([spec.all_versions()], reg.plan_deploy([spec], {}, []))
    reg.rollout("m", "v2", None, [50, 100], None, None, [])
    records = [_rec("r1", spec), _rec("r2", spec.at_version("v2"), "loading")]
    records[0].max_model_len = 128
    [view] = fleet.model_views(["m"], reg, records, {}, {"m@v1": "no room"}, {})
    assert (view["version"], view["ready_replicas"], view["replicas"]) == ("v1", 1, 2)
    assert (view["max_model_len"], view["pending"]) == (128, "no room")
    assert view["rollout"]["candidate"] == "v2" and view["rollout"]["candidate_percent"] == 0
    assert [(v["version"], v["traffic"], v["replicas"]) for v in view["versions"]] == [
        ("v1", 1.0, 1),
        ("v2", 0.0, 1),
    ]
    table = fleet.replica_table(reversed(records))
    assert [(r["replica_id"], r["model"], r["state"]) for r in table] == [
        ("r1", "m@v1", "ready"),
        ("r2", "m@v2", "loading"),
    ]


def test_a_deploy_waits_for_ready_replicas_but_not_for_a_model_without_room() -> None:
    spec = _spec(replicas=2)
    reg = Registry()
    reg.register([spec.all_versions()], reg.plan_deploy([spec], {}, []))
    one = [_rec("r1", spec)]
    assert fleet.deploy_waiting(reg, one, {}, {}, {}, {}, ()) == ["m"]
    assert fleet.deploy_waiting(reg, one, {}, {"m@v1": "no room"}, {}, {}, ()) == []
    loading = [*one, _rec("r2", spec, "loading")]
    assert fleet.deploy_waiting(reg, loading, {}, {"m@v1": "no room"}, {}, {}, ()) == ["m"]
    with pytest.raises(InvalidRequest, match="failed to start 3 times; last error: oom"):
        fleet.deploy_waiting(reg, one, {}, {}, {"m@v1": "oom"}, {}, ())


def test_a_deploy_waits_for_its_switches_and_for_a_canarys_first_step() -> None:
    spec = _spec(versions={"v2": {}}, rollout={"strategy": "canary", "steps": [50, 100]})
    reg = Registry()
    reg.register([spec.all_versions()], reg.plan_deploy([spec], {}, []))
    reg.rollout("m", "v2", None, None, None, None, [])
    records = [_rec("r1", spec)]
    moving = {"m": ("v2", "canary")}
    assert fleet.deploy_waiting(reg, records, {}, {}, {}, moving, ()) == ["m"]
    reg.models["m"].rollout = replace(reg.models["m"].rollout, step_index=0)  # type: ignore[arg-type]
    assert fleet.deploy_waiting(reg, records, {}, {}, {}, moving, ()) == []
    reg.rollback("m", [], 1.0)
    with pytest.raises(InvalidRequest, match="the rollout of m to v2: rolled back to v1"):
        fleet.deploy_waiting(reg, records, {}, {}, {}, moving, ())


def test_autoscaling_asks_the_policy_with_the_room_the_pools_have() -> None:
    spec = _spec(autoscale={"min_replicas": 1, "max_replicas": 3, "target_tokens_per_replica": 100})
    signals = {"m": {"queued_tokens": 1000, "requests_in_window": 5}}
    [s] = fleet.plan_autoscale([spec], signals, 0.0, {}, {}, lambda: Packer([]), {})
    assert (s.replicas, s.decision.direction) == (3, "up")
    [quiet] = fleet.plan_autoscale([spec], {}, 0.0, {"m": 3}, {}, lambda: Packer([]), {})
    assert quiet.decision.direction in ("hold", "down") and quiet.replicas <= 3
