"""Model version lifecycle, canary and blue-green rollouts, constraints and group switches."""

from __future__ import annotations

import pytest

from airi_ray.core.rollout import (
    Constraint,
    GroupMember,
    IllegalTransition,
    IncompatibleRollout,
    ModelVersion,
    Rollout,
    RolloutError,
    RolloutLimits,
    VersionStats,
    check_compatible,
    plan_group_switch,
    plan_rollout,
    version_key,
)

LIMITS = RolloutLimits(
    max_error_rate_delta=0.01, max_ttft_p99_ratio=1.5, min_requests_per_step=100, step_hold_s=60
)
GOOD = VersionStats(requests=1000, errors=5, ttft_p99_s=0.30)
CANDIDATE_GOOD = VersionStats(requests=200, errors=1, ttft_p99_s=0.32)
NONE = VersionStats()


def canary(**kw: object) -> Rollout:
    return Rollout("llm", "v1", "v2", limits=LIMITS, **kw)  # type: ignore[arg-type]


# -- lifecycle --------------------------------------------------------------------------


def test_version_lifecycle_follows_the_allowed_transitions() -> None:
    v = ModelVersion("llm", "v2")
    assert v.state == "pending" and not v.serving
    v = v.to("loading").to("ready")
    assert v.serving
    v = v.to("draining").to("retired")
    assert v.state == "retired"
    assert ModelVersion("llm", "v3").to("loading").to("retired").state == "retired"


def test_illegal_transition_names_both_states_and_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition) as e:
        ModelVersion("llm", "v2", "ready").to("loading")
    assert str(e.value) == (
        "llm v2 cannot go from ready to loading; from ready it may go to draining"
    )
    with pytest.raises(IllegalTransition, match="retired is final"):
        ModelVersion("llm", "v2", "retired").to("ready")
    with pytest.raises(RolloutError, match="state must be one of"):
        ModelVersion("llm", "v2", "warm")  # type: ignore[arg-type]


# -- canary -----------------------------------------------------------------------------


def test_canary_takes_no_traffic_until_the_candidate_is_ready() -> None:
    r, d = canary().step(0.0, GOOD, NONE, candidate_ready=False)
    assert d.action == "wait" and "not ready" in d.reason
    assert r.traffic_split() == {"v1": 1.0, "v2": 0.0}


def test_canary_promotes_step_by_step_under_good_stats() -> None:
    r, d = canary().step(0.0, NONE, NONE, candidate_ready=True)
    assert (d.action, d.candidate_percent) == ("advance", 10)
    assert r.traffic_split() == {"v1": 0.9, "v2": 0.1}
    # Within limits but the step has not held long enough.
    r, d = r.step(30.0, GOOD, CANDIDATE_GOOD, True)
    assert d.action == "wait" and "30 s left" in d.reason and d.candidate_percent == 10
    # Not enough candidate requests yet to judge the step: wait, whatever the time.
    r, d = r.step(45.0, GOOD, VersionStats(requests=12), True)
    assert d.action == "wait" and "12 of the 100" in d.reason
    r, d = r.step(60.0, GOOD, CANDIDATE_GOOD, True)
    assert (d.action, d.candidate_percent) == ("advance", 50)
    assert r.step_started_at == 60.0
    r, d = r.step(120.0, GOOD, CANDIDATE_GOOD, True)
    assert (d.action, d.candidate_percent, d.drain) == ("promote", 100, ("v1",))
    assert r.outcome == "promoted" and r.traffic_split() == {"v1": 0.0, "v2": 1.0}
    # Finished: further steps wait and change nothing.
    again, d = r.step(500.0, GOOD, CANDIDATE_GOOD, True)
    assert again == r and d.action == "wait" and "finished" in d.reason


def test_canary_rolls_back_on_errors_with_the_numbers() -> None:
    r, _ = canary().step(0.0, NONE, NONE, True)
    bad = VersionStats(requests=200, errors=10, ttft_p99_s=0.3)
    r, d = r.step(5.0, GOOD, bad, True)
    assert d.action == "rollback" and d.candidate_percent == 0 and d.drain == ("v2",)
    assert d.reason == (
        "rolled back to v1: candidate v2 error rate 5.0% (10/200) exceeds stable v1's "
        "0.5% (5/1000) by 4.5 points, limit 1.0"
    )
    assert r.outcome == "rolled_back" and r.traffic_split() == {"v1": 1.0, "v2": 0.0}


def test_canary_rolls_back_on_ttft() -> None:
    r, _ = canary().step(0.0, NONE, NONE, True)
    r, _ = r.step(60.0, GOOD, CANDIDATE_GOOD, True)  # now at 50%
    slow = VersionStats(requests=500, errors=2, ttft_p99_s=0.90)
    r, d = r.step(70.0, GOOD, slow, True)
    assert d.action == "rollback"
    assert "candidate v2 TTFT p99 0.90 s is 3.00 x stable v1's 0.30 s, limit 1.50 x" in d.reason


def test_canary_within_limits_at_the_edge_is_not_rolled_back() -> None:
    r, _ = canary().step(0.0, NONE, NONE, True)
    edge = VersionStats(requests=1000, errors=15, ttft_p99_s=0.45)  # +1.0 point, 1.5 x
    _, d = r.step(60.0, GOOD, edge, True)
    assert d.action == "advance"


def test_canary_rolls_back_if_the_candidate_stops_being_ready() -> None:
    r, _ = canary().step(0.0, NONE, NONE, True)
    r, d = r.step(10.0, GOOD, CANDIDATE_GOOD, candidate_ready=False)
    assert d.action == "rollback" and "stopped being ready at 10%" in d.reason


def test_manual_rollback_and_not_after_the_end() -> None:
    r, _ = canary().step(0.0, NONE, NONE, True)
    r, d = r.rollback("operator saw bad answers")
    assert d.action == "rollback" and d.reason == "rolled back to v1: operator saw bad answers"
    with pytest.raises(RolloutError, match="start a new rollout from v2 to v1"):
        r.rollback()


def test_a_single_full_step_promotes_at_once() -> None:
    r, d = canary(steps=(100,)).step(0.0, NONE, NONE, True)
    assert d.action == "promote" and r.candidate_percent == 100


# -- blue-green -------------------------------------------------------------------------


def test_blue_green_switches_everything_once_ready() -> None:
    r = Rollout("llm", "blue", "green", strategy="blue-green")
    r, d = r.step(0.0, GOOD, NONE, candidate_ready=False)
    assert d.action == "wait" and r.traffic_split() == {"blue": 1.0, "green": 0.0}
    r, d = r.step(1.0, GOOD, NONE, candidate_ready=True)
    assert (d.action, d.candidate_percent, d.drain) == ("promote", 100, ("blue",))
    assert r.traffic_split() == {"blue": 0.0, "green": 1.0}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": (10, 5, 100)}, "increasing percentages"),
        ({"steps": (10, 50)}, "ending at 100"),
        ({"steps": ()}, "increasing percentages"),
        ({"strategy": "shadow"}, "strategy must be one of canary, blue-green"),
        ({"candidate": "v1"}, "must differ"),
    ],
)
def test_bad_rollouts_are_refused(kw: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"model": "llm", "stable": "v1", "candidate": "v2", **kw}
    with pytest.raises(RolloutError, match=match):
        Rollout(**args)  # type: ignore[arg-type]


def test_bad_limits_and_stats_are_refused() -> None:
    with pytest.raises(RolloutError, match="at least 1"):
        RolloutLimits(max_ttft_p99_ratio=0.5)
    with pytest.raises(RolloutError, match="errors <= requests"):
        VersionStats(requests=1, errors=2)


# -- constraints and coordinated rollouts -----------------------------------------------

EMBED_NEEDS_INDEX = Constraint("embedder", "v2*", "index", "v2*")
INDEX_NEEDS_EMBED = Constraint("index", "v2*", "embedder", "v2*")
GUARD_NEEDS_LLM = Constraint("guard", "g2", "llm", ">=v3.1")


def test_version_comparisons() -> None:
    assert version_key("v2.10") > version_key("v2.9")
    serving = {"guard": {"g2"}, "llm": {"v3.0", "v3.2"}}
    assert check_compatible(serving, [GUARD_NEEDS_LLM]) == [
        "constraint 'guard g2 requires llm >=v3.1' forbids guard g2 serving together with llm v3.0"
    ]
    assert check_compatible({"guard": {"g2"}, "llm": {"v4"}}, [GUARD_NEEDS_LLM]) == []
    ranged = Constraint("a", "*", "b", ">=2, <3")
    assert check_compatible({"a": {"x"}, "b": {"2.5", "3.0"}}, [ranged]) == [
        "constraint 'a * requires b >=2, <3' forbids a x serving together with b 3.0"
    ]
    with pytest.raises(RolloutError, match="numbered version"):
        Constraint("a", "*", "b", ">=latest")


def test_incompatible_rollout_is_refused_naming_the_constraint() -> None:
    serving = {"embedder": {"v1"}, "index": {"v1"}}
    rollout = Rollout("embedder", "v1", "v2")
    with pytest.raises(IncompatibleRollout) as e:
        plan_rollout(rollout, serving, [EMBED_NEEDS_INDEX])
    assert "constraint 'embedder v2* requires index v2*'" in str(e.value)
    assert e.value.violations == (
        "constraint 'embedder v2* requires index v2*' forbids embedder v2 serving together "
        "with index v1",
    )
    # Once index v2 serves alone, the same rollout is fine.
    ok = {"embedder": {"v1"}, "index": {"v2"}}
    assert plan_rollout(rollout, ok, [EMBED_NEEDS_INDEX]) is rollout


def test_canary_is_refused_when_both_versions_serving_together_breaks_a_rule() -> None:
    # An index v2 that must not serve next to an index v1 (their layouts differ).
    alone = Constraint("index", "v2*", "index", "v2*")
    with pytest.raises(
        IncompatibleRollout, match="forbids index v2 serving together with index v1"
    ):
        plan_rollout(Rollout("index", "v1", "v2"), {"index": {"v1"}}, [alone])
    # Blue-green never serves both, so it is allowed.
    bg = Rollout("index", "v1", "v2", strategy="blue-green")
    assert plan_rollout(bg, {"index": {"v1"}}, [alone]) is bg


def test_mutual_requirement_needs_a_group_switch_which_is_atomic() -> None:
    serving = {"embedder": {"v1"}, "index": {"v1"}, "llm": {"v3"}}
    rules = [EMBED_NEEDS_INDEX, INDEX_NEEDS_EMBED]
    # Neither can move first on its own.
    for model in ("embedder", "index"):
        with pytest.raises(IncompatibleRollout):
            plan_rollout(Rollout(model, "v1", "v2", strategy="blue-green"), serving, rules)
    members = [GroupMember("embedder", "v1", "v2"), GroupMember("index", "v1", "v2")]
    g = plan_group_switch("retrieval", members, serving, rules)
    g, d = g.step({"embedder": True, "index": False})
    assert d.action == "wait" and d.reason == (
        "group retrieval waits for index v2 to be ready; no member switches before all are"
    )
    assert g.traffic_split() == {
        "embedder": {"v1": 1.0, "v2": 0.0},
        "index": {"v1": 1.0, "v2": 0.0},
    }
    g, d = g.step({"embedder": True, "index": True})
    assert d.action == "switch"
    assert d.drain == (("embedder", "v1"), ("index", "v1"))
    assert g.traffic_split() == {
        "embedder": {"v1": 0.0, "v2": 1.0},
        "index": {"v1": 0.0, "v2": 1.0},
    }
    _, d = g.step({"embedder": True, "index": True})
    assert d.action == "wait" and "switched already" in d.reason


def test_group_switch_refused_when_a_non_member_would_be_incompatible() -> None:
    serving = {"guard": {"g1"}, "llm": {"v3.0"}}
    with pytest.raises(IncompatibleRollout, match="guard g2 requires llm >=v3.1"):
        plan_group_switch("safety", [GroupMember("guard", "g1", "g2")], serving, [GUARD_NEEDS_LLM])
    # Moving the llm in the same group makes it compatible.
    members = [GroupMember("guard", "g1", "g2"), GroupMember("llm", "v3.0", "v3.1")]
    g = plan_group_switch("safety", members, serving, [GUARD_NEEDS_LLM])
    assert not g.switched


def test_existing_violations_do_not_block_unrelated_rollouts() -> None:
    serving = {"embedder": {"v2"}, "index": {"v1"}, "llm": {"v1"}}
    assert check_compatible(serving, [EMBED_NEEDS_INDEX])
    r = Rollout("llm", "v1", "v2")
    assert plan_rollout(r, serving, [EMBED_NEEDS_INDEX]) is r


def test_bad_groups_are_refused() -> None:
    with pytest.raises(RolloutError, match="each model once"):
        plan_group_switch("g", [GroupMember("a", "1", "2"), GroupMember("a", "2", "3")], {}, [])
    with pytest.raises(RolloutError, match="at least one member"):
        plan_group_switch("g", [], {}, [])
