"""The model registry: lifecycle moves, the saved form, and the rollout decisions its
steps take (canary, blue-green, group switches, draining) with a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airi_ray.config import ModelSpec
from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
from airi_ray.core.registry import (
    Job,
    JobState,
    Model,
    Note,
    Registry,
    RolloutActed,
    StartJob,
    version_key,
)
from airi_ray.core.rollout import Constraint, IllegalTransition, Rollout, RolloutLimits

ROLLOUT = {
    "strategy": "canary",
    "steps": [50, 100],
    "step_hold_s": 10,
    "min_requests_per_step": 10,
    "max_error_rate_delta": 0.01,
    "max_ttft_p99_ratio": 1.5,
    "drain_timeout_s": 30,
    "keep_warm_s": 0,
}
GOOD = {"requests": 20, "errors": 0, "ttft_p99_s": 0.1}


def _entry() -> Model:
    spec = ModelSpec(name="m", version="v1", model="x", versions={"v2": {"replicas": 2}})
    return Model("v1", {v.version: v for v in spec.all_versions()})


def _spec(name: str = "m", **fields: Any) -> ModelSpec:
    rollout = ROLLOUT | fields.pop("rollout", {})
    return ModelSpec(
        name=name, version="v1", model="x", versions={"v2": {}, "v3": {}}, rollout=rollout, **fields
    )


def _deployed(*specs: ModelSpec) -> Registry:
    """A registry that serves ``specs``, each version v1 ready."""
    reg = Registry()
    reg.register([s.all_versions() for s in specs], reg.plan_deploy(specs, {}, []))
    for s in specs:
        _ready(reg, s.name, "v1")
    return reg


def _ready(reg: Registry, name: str, version: str) -> None:
    entry = reg.models[name]
    entry.set_state(name, version, "loading")
    entry.set_state(name, version, "ready")


def _keys(reg: Registry) -> set[str]:
    """Every version key that is ready (as if each had a ready replica)."""
    return {
        version_key(n, v)
        for n, e in reg.models.items()
        for v, s in e.states.items()
        if s == "ready"
    }


def _step(
    reg: Registry,
    now: float,
    stats: dict[str, Any] | None = None,
    failed: dict[str, str | None] | None = None,
    jobs: dict[tuple[str, str, str], Job] | None = None,
) -> list[Any]:
    return reg.step_rollouts(now, stats or {}, failed or {}, _keys(reg), jobs or {})


def _notes(events: list[Any]) -> list[str]:
    return [e.text for e in events if isinstance(e, Note)]


def test_versions_follow_the_lifecycle() -> None:
    e = _entry()
    e.set_state("m", "v1", "loading")
    e.set_state("m", "v1", "ready")
    with pytest.raises(IllegalTransition, match="cannot go from ready to loading"):
        e.set_state("m", "v1", "loading")
    e.set_state("m", "v1", "draining")
    e.set_state("m", "v1", "retired")
    e.set_state("m", "v1", "loading")  # rolled back to: a new life, from pending
    assert e.states["v1"] == "loading"


def test_an_entry_survives_its_saved_form() -> None:
    e = _entry()
    e.set_state("m", "v1", "loading")
    e.rollout = Rollout("m", "v1", "v2", "canary", (25, 100), RolloutLimits(step_hold_s=5))
    e.history = ["v0"]
    e.drain_started = {"v0": 12.5}
    saved = json.loads(json.dumps(e.to_dict()))  # what ControlState stores
    again = Model.from_dict(saved, ModelSpec.model_validate)
    assert again == e
    assert again.specs["v2"].replicas == 2


def test_a_registry_with_a_group_switch_survives_its_saved_form() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    reg.rollout("a", "v2", None, None, {"b": "v2"}, "g", [])
    again = Registry.from_dict(json.loads(json.dumps(reg.to_dict())), ModelSpec.model_validate)
    assert again.models == reg.models
    assert again.groups == reg.groups
    assert again.candidate("b") == "v2"


def test_a_draining_version_comes_back_when_traffic_returns() -> None:
    e = _entry()
    for state in ("loading", "ready", "draining", "ready"):
        e.set_state("m", "v1", state)  # type: ignore[arg-type]
    assert e.states["v1"] == "ready"


def test_version_keys_match_the_spec_keys() -> None:
    assert version_key("m", "v2") == _spec().at_version("v2").key == "m@v2"


def test_a_canary_steps_up_holds_and_promotes_then_the_old_version_drains() -> None:
    reg = _deployed(_spec())
    started = reg.rollout("m", "v2", None, None, None, None, [])
    assert _notes(started) == ["rollout m v1 -> v2 (canary [50, 100]) started"]
    assert reg.models["m"].states["v2"] == "pending"
    assert _step(reg, 0.0) == []  # the candidate is not ready: it takes no traffic
    assert reg.splits()["m"] == ({"v1": 1.0, "v2": 0.0}, "v1")

    _ready(reg, "m", "v2")
    events = _step(reg, 1.0)
    assert events == [
        Note("rollout m v1 -> v2: candidate v2 is ready: 50% of traffic to v2"),
        RolloutActed("m", "advance"),
    ]
    assert reg.traffic("m") == ({"v1": 0.5, "v2": 0.5}, "v1")
    assert reg.serving() == {"m": {"v1", "v2"}}

    stats = {"m": {"v1": GOOD, "v2": GOOD}}
    assert _step(reg, 5.0, stats) == []  # within limits, holding the step
    events = _step(reg, 12.0, stats)
    assert RolloutActed("m", "promote") in events
    entry = reg.models["m"]
    assert (entry.stable, entry.rollout, entry.history) == ("v2", None, ["v1"])
    assert entry.states["v1"] == "draining" and entry.drain_started["v1"] == 12.0
    assert entry.last is not None
    assert (entry.last["outcome"], entry.last["finished_at"]) == ("promoted", 12.0)

    assert reg.drain(13.0, {"m@v1": 3}, {}) == []  # busy, and within its drain timeout
    events = reg.drain(43.0, {"m@v1": 3}, {})
    assert _notes(events) == ["m@v1 drained in 31.0 s and retired; 3 requests cut off after 30 s"]
    assert entry.states["v1"] == "retired"
    assert not reg.draining()


def test_a_canary_with_too_many_errors_rolls_back_at_once() -> None:
    reg = _deployed(_spec())
    reg.rollout("m", "v2", None, None, None, None, [])
    _ready(reg, "m", "v2")
    _step(reg, 1.0)
    bad = {"requests": 20, "errors": 5, "ttft_p99_s": 0.1}
    events = _step(reg, 2.0, {"m": {"v1": GOOD, "v2": bad}})
    assert RolloutActed("m", "rollback") in events
    [note] = _notes(events)
    assert note.startswith("rollout m v1 -> v2: rolled back to v1: candidate v2 error rate 25.0%")
    entry = reg.models["m"]
    assert (entry.stable, entry.rollout, entry.states["v2"]) == ("v1", None, "draining")
    assert entry.last is not None and entry.last["outcome"] == "rolled_back"


def test_a_slow_canary_rolls_back_on_its_ttft_ratio() -> None:
    reg = _deployed(_spec())
    reg.rollout("m", "v2", None, None, None, None, [])
    _ready(reg, "m", "v2")
    _step(reg, 1.0)
    slow = {"requests": 20, "errors": 0, "ttft_p99_s": 0.5}
    [note] = _notes(_step(reg, 2.0, {"m": {"v1": GOOD, "v2": slow}}))
    assert "TTFT p99 0.50 s is 5.00 x stable v1's 0.10 s, limit 1.50 x" in note
    assert reg.models["m"].stable == "v1"


def test_blue_green_switches_all_traffic_once_the_candidate_is_ready() -> None:
    reg = _deployed(_spec())
    started = reg.rollout("m", "v2", "blue-green", None, None, None, [])
    assert _notes(started) == ["rollout m v1 -> v2 (blue-green) started"]
    assert _step(reg, 0.0) == []
    _ready(reg, "m", "v2")
    events = _step(reg, 1.0)
    assert events[1] == RolloutActed("m", "promote")
    assert reg.traffic("m") == ({"v2": 1.0}, "v2")


def test_a_candidate_that_fails_to_start_is_rolled_back() -> None:
    reg = _deployed(_spec())
    reg.rollout("m", "v2", None, None, None, None, [])
    [note] = _notes(_step(reg, 1.0, failed={"m@v2": "out of memory"}))
    assert note == "rollout m v1 -> v2: rolled back to v1: candidate failed to start: out of memory"
    assert reg.models["m"].states["v2"] == "retired"  # it never served: no drain


def test_a_group_switches_together_once_every_candidate_is_ready() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    started = reg.rollout("a", "v2", None, None, {"b": "v2"}, "g", [])
    assert _notes(started) == ["group g switch started: a v1 -> v2, b v1 -> v2"]
    assert reg.candidate("a") == reg.candidate("b") == "v2"
    with pytest.raises(Conflict, match="switching with group g"):
        reg.rollout("b", "v3", None, None, None, None, [])
    _ready(reg, "a", "v2")
    assert _step(reg, 1.0) == []  # b is not ready: no member switches
    _ready(reg, "b", "v2")
    events = _step(reg, 2.0)
    assert _notes(events) == [
        "group g: every candidate is ready, all switch at once: a v1 -> v2, b v1 -> v2"
    ]
    assert reg.groups == {}
    for name in ("a", "b"):
        entry = reg.models[name]
        assert (entry.stable, entry.states["v1"]) == ("v2", "draining")
        assert entry.last is not None and entry.last["strategy"] == "group g"
    assert reg.splits() == {"a": ({"v2": 1.0}, "v2"), "b": ({"v2": 1.0}, "v2")}


def test_a_group_whose_member_fails_to_start_is_cancelled() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    reg.rollout("a", "v2", None, None, {"b": "v2"}, None, [])  # no spec group: named by members
    _ready(reg, "a", "v2")
    events = _step(reg, 1.0, failed={"b@v2": "boom"})
    assert _notes(events) == ["group a+b switch cancelled: b v2 failed to start: boom"]
    assert reg.models["a"].states["v2"] == "draining"
    assert reg.models["b"].states["v2"] == "retired"
    assert reg.candidate("a") is None


def test_a_group_moves_blue_green_only() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    with pytest.raises(InvalidRequest, match="switch at once"):
        reg.rollout("a", "v2", "canary", None, {"b": "v2"}, None, [])


def test_an_embedding_candidate_waits_for_its_collections() -> None:
    reg = _deployed(_spec("e", task="embed"))
    reg.rollout("e", "v2", "blue-green", None, None, None, [])
    _ready(reg, "e", "v2")
    assert _step(reg, 1.0) == [StartJob("prepare", "e", "v2")]  # no traffic before its tables
    running = {("prepare", "e", "v2"): Job(JobState.RUNNING)}
    assert _step(reg, 2.0, jobs=running) == []
    done = {("prepare", "e", "v2"): Job(JobState.DONE)}
    events = _step(reg, 3.0, jobs=done)
    assert RolloutActed("e", "promote") in events
    assert StartJob("activate", "e", "v2") in events
    activating = {("activate", "e", "v2"): Job(JobState.RUNNING)}
    assert reg.drain(100.0, {}, activating) == []  # ingestion still writes with v1
    assert _notes(reg.drain(100.0, {}, {})) == ["e@v1 drained in 97.0 s and retired"]


def test_an_embedding_candidate_whose_reembedding_fails_is_rolled_back() -> None:
    reg = _deployed(_spec("e", task="embed"))
    reg.rollout("e", "v2", None, None, None, None, [])
    failed = {("prepare", "e", "v2"): Job(JobState.FAILED, "disk full")}
    [note] = _notes(_step(reg, 1.0, jobs=failed))
    assert note.endswith("re-embedding its collections failed: disk full")


def test_a_drained_version_stays_warm_for_its_keep_warm_time() -> None:
    reg = _deployed(_spec(rollout={"strategy": "blue-green", "keep_warm_s": 60}))
    reg.rollout("m", "v2", None, None, None, None, [])
    _ready(reg, "m", "v2")
    _step(reg, 0.0)
    assert reg.drain(30.0, {"m@v1": 0}, {}) == []
    back = reg.rollback("m", [], 40.0)  # v1 is still warm: it is ready again at once
    assert _notes(back) == ["rollout m v2 -> v1 (blue-green) started"]
    assert reg.models["m"].states["v1"] == "ready"
    assert "v1" not in reg.models["m"].drain_started


def test_rollback_stops_a_running_rollout() -> None:
    reg = _deployed(_spec())
    reg.rollout("m", "v2", None, None, None, None, [])
    events = reg.rollback("m", [], 5.0)
    assert events[1] == RolloutActed("m", "rollback")
    assert "rolled back by request" in _notes(events)[0]
    with pytest.raises(InvalidRequest, match="no earlier version"):
        reg.rollback("m", [], 6.0)


def test_api_calls_are_checked_before_anything_changes() -> None:
    reg = _deployed(_spec())
    with pytest.raises(NotFound, match="deployed models: m"):
        reg.rollout("zz", "v2", None, None, None, None, [])
    with pytest.raises(NotFound, match="known versions: v1, v2, v3"):
        reg.rollout("m", "v9", None, None, None, None, [])
    with pytest.raises(InvalidRequest, match="already serves"):
        reg.rollout("m", "v1", None, None, None, None, [])
    with pytest.raises(InvalidRequest, match="steps"):
        reg.rollout("m", "v2", None, [50, 20], None, None, [])
    reg.rollout("m", "v2", None, None, None, None, [])
    with pytest.raises(Conflict, match="rolling out from v1 to v2"):
        reg.rollout("m", "v3", None, None, None, None, [])


def test_a_deploy_that_breaks_a_constraint_is_refused() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    rule = [Constraint("a", "v2*", "b", ">=v2")]
    new_a = _spec("a").at_version("v2")
    with pytest.raises(Conflict, match="deploy refused"):
        reg.plan_deploy([new_a, _spec("b")], {}, rule)
    # Together in a group, both move in the same instant: allowed.
    moves = reg.plan_deploy([new_a, _spec("b").at_version("v2")], {"a": "g", "b": "g"}, rule)
    assert moves[0] == {} and [g.group for g in moves[1]] == ["g"]


def test_a_deploy_takes_in_new_models_and_forgets_removed_ones() -> None:
    reg = _deployed(_spec("a"), _spec("b"))
    new_a = _spec("a").at_version("v2")
    events = reg.register([new_a.all_versions()], reg.plan_deploy([new_a], {}, []))
    assert set(reg.models) == {"a"}
    assert _notes(events) == ["rollout a v1 -> v2 (canary [50, 100]) started"]


def test_targets_and_states_follow_the_replicas() -> None:
    reg = Registry()
    s = _spec()
    reg.register([s.all_versions()], reg.plan_deploy([s], {}, []))
    targets = reg.targets(lambda spec: 2)
    assert {k: n for k, (_, n) in targets.items()} == {"m@v1": 2}
    assert reg.update_states(targets, {"m@v1": 2}, {"m@v1": 1}) == []
    assert reg.models["m"].states["v1"] == "loading"
    assert _notes(reg.update_states(targets, {"m@v1": 2}, {"m@v1": 2})) == ["m@v1 is ready"]
    reg.rollout("m", "v2", None, None, None, None, [])
    reg.models["m"].states["v3"] = "draining"
    targets = reg.targets(lambda spec: 1)
    assert {k: n for k, (_, n) in targets.items()} == {"m@v3": None, "m@v1": 1, "m@v2": 1}
