"""Drift detection on synthetic traffic from seeded generators, PSI itself, and alert records.

Embeddings are unit vectors around a topic centre (32 dimensions, noise 0.2 per dimension,
so one topic is a broad cluster). The switch goes to a second centre at cosine 0.5 from the
first: unrelated text still shares the common component of sentence embeddings. With the
default ``DriftConfig`` (reference 1000, window 500, a check every 25 requests) the switch
raises an embedding drift alert within ``SWITCH_WITHIN`` = 200 requests, and 20,000
requests of unchanged traffic raise none.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.alerts import Alert, AlertGate, AlertLog, make_alert
from airi_ray.core.drift import (
    DriftConfig,
    DriftMonitor,
    psi,
    quantile_edges,
    random_projections,
)

DIM = 32
SWITCH_WITHIN = 200  # requests after the switch by which the embedding alert must come


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v)
    return out


class Traffic:
    """Seeded synthetic requests: topic embeddings, Poisson lengths, Bernoulli refusals."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.support = _unit(self.rng.standard_normal(DIM))
        other = self.rng.standard_normal(DIM)
        other = _unit(other - self.support * (other @ self.support))
        self.unrelated = 0.5 * self.support + np.sqrt(0.75) * other  # cosine 0.5
        self.t = 0.0

    def embedding(self, centre: np.ndarray, noise: float = 0.2) -> np.ndarray:
        return _unit(centre + noise * self.rng.standard_normal(DIM))

    def run(
        self,
        m: DriftMonitor,
        n: int,
        *,
        centre: np.ndarray | None = None,
        prompt_mean: float = 40.0,
        output_mean: float = 120.0,
        refusal_rate: float = 0.05,
    ) -> list[tuple[int, Alert]]:
        """Feed ``n`` requests (one every 0.1 s); the alerts with their request index."""
        c = self.support if centre is None else centre
        out: list[tuple[int, Alert]] = []
        for i in range(n):
            self.t += 0.1
            alerts = m.observe(
                self.t,
                self.embedding(c),
                int(self.rng.poisson(prompt_mean)),
                int(self.rng.poisson(output_mean)),
                bool(self.rng.random() < refusal_rate),
            )
            out.extend((i, a) for a in alerts)
        return out


# -- psi and projections --------------------------------------------------------------------


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 5000)
    assert psi(ref, ref) == 0.0
    assert psi(ref, rng.normal(0, 1, 5000)) < 0.02  # same law, other draw
    assert 0.1 < psi(ref, rng.normal(0.5, 1, 5000)) < 0.5  # moderate shift
    assert psi(ref, rng.normal(3, 1, 5000)) > 2  # disjoint: empty bins floored, finite


def test_psi_handles_ties_and_constant_references() -> None:
    # Token counts repeat: equal quantiles merge into fewer bins.
    assert list(quantile_edges([5, 5, 5, 5, 6, 7], bins=4)) == [5.0, 5.75]
    assert list(quantile_edges([3, 3, 3], bins=10)) == [3.0]
    assert psi([3, 3, 3], [3, 3]) == 0.0
    assert psi([3, 3, 3], [1, 2]) > 5  # all in a bin the reference never filled


def test_psi_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        psi([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        psi([1.0, 2.0], [float("nan")])
    with pytest.raises(ValueError, match="bins must be at least 2"):
        psi([1.0, 2.0], [1.0], bins=1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
    st.integers(2, 12),
)
def test_psi_is_non_negative_and_zero_on_identical_samples(
    ref: list[float], cur: list[float], bins: int
) -> None:
    assert psi(ref, cur, bins) >= 0.0
    assert psi(ref, list(ref), bins) == 0.0
    assert psi(ref, ref[::-1], bins) == 0.0  # order does not matter


def test_random_projections_are_seeded_unit_directions() -> None:
    p = random_projections(32, 16, seed=7)
    assert p.shape == (32, 16)
    assert np.allclose(np.linalg.norm(p, axis=0), 1.0)
    assert np.array_equal(p, random_projections(32, 16, seed=7))
    assert not np.allclose(p, random_projections(32, 16, seed=8))
    with pytest.raises(ValueError, match="dim and k must be positive"):
        random_projections(0, 16, seed=0)


# -- the monitor ----------------------------------------------------------------------------


def test_stationary_traffic_raises_no_alert() -> None:
    traffic = Traffic(seed=1)
    m = DriftMonitor("support-bot", "v1")
    alerts = traffic.run(m, 20_000)
    print(f"false positives over 20,000 stationary requests: {len(alerts)}")
    assert alerts == []
    s = m.scores()
    assert s.embedding_psi is not None and s.embedding_psi < 0.1
    assert s.mean_shift is not None and s.mean_shift < 0.01


def test_topic_switch_raises_embedding_drift_within_200_requests() -> None:
    traffic = Traffic(seed=2)
    m = DriftMonitor("support-bot", "v1")
    assert traffic.run(m, 2000) == []
    after = traffic.run(m, 1000, centre=traffic.unrelated)
    embedding = [(i, a) for i, a in after if a.kind == "drift.embedding"]
    assert embedding, "no embedding drift alert after the switch"
    first_at, first = embedding[0]
    print(f"embedding drift alert {first_at + 1} requests after the switch: {first.message}")
    assert first_at < SWITCH_WITHIN
    assert first.model == "support-bot" and first.version == "v1" and first.replica is None
    assert first.evidence["reference_n"] == 1000
    # Lengths and refusals did not change, so only embeddings alert.
    assert {a.kind for _, a in after} == {"drift.embedding"}
    s = m.scores()
    assert s.mean_shift is not None and s.mean_shift > 0.3


def test_one_shift_raises_one_alert_per_level() -> None:
    traffic = Traffic(seed=3)
    m = DriftMonitor("support-bot", "v1")
    traffic.run(m, 1500)
    after = traffic.run(m, 5000, centre=traffic.unrelated)  # 500 s of drifted traffic
    levels = [a.severity for _, a in after if a.kind == "drift.embedding"]
    # The first crossing, maybe an escalation from info to warning, then silence.
    assert levels in (["warning"], ["info", "warning"])


def test_shift_back_and_again_alerts_again_after_the_cooldown() -> None:
    traffic = Traffic(seed=4)
    m = DriftMonitor("bot", "v1", DriftConfig(cooldown_s=60.0))
    traffic.run(m, 1500)
    first = traffic.run(m, 800, centre=traffic.unrelated)
    assert [a.severity for _, a in first if a.kind == "drift.embedding"][-1] == "warning"
    assert traffic.run(m, 1000) == []  # back to normal: the episode ends, silently
    again = traffic.run(m, 800, centre=traffic.unrelated)  # 100 s later: past the cooldown
    assert any(a.kind == "drift.embedding" for _, a in again)


def test_length_shift_is_detected() -> None:
    traffic = Traffic(seed=5)
    m = DriftMonitor("bot", "v1")
    traffic.run(m, 2000)
    after = traffic.run(m, 600, prompt_mean=200.0, output_mean=30.0)
    kinds = {a.kind for _, a in after}
    assert {"drift.prompt_length", "drift.output_length"} <= kinds
    assert "drift.embedding" not in kinds
    prompt = next(a for _, a in after if a.kind == "drift.prompt_length")
    assert prompt.evidence["current_mean"] > prompt.evidence["reference_mean"]
    assert "prompt lengths of bot v1 drifted" in prompt.message


def test_refusal_rate_jump_is_detected() -> None:
    traffic = Traffic(seed=6)
    m = DriftMonitor("bot", "v1")
    traffic.run(m, 2000)
    after = traffic.run(m, 600, refusal_rate=0.35)
    refusals = [a for _, a in after if a.kind == "drift.refusal_rate"]
    assert len(refusals) == 1
    assert refusals[0].severity == "warning"
    assert refusals[0].evidence["delta"] >= 0.1
    assert "refusal rate of bot v1 moved from" in refusals[0].message


def test_set_reference_judges_from_the_first_full_window() -> None:
    traffic = Traffic(seed=7)
    cfg = DriftConfig(reference_size=1000, window_size=200, min_samples=200, check_every=50)
    m = DriftMonitor("bot", "v1", cfg)
    ref = np.stack([traffic.embedding(traffic.support) for _ in range(1000)])
    m.set_reference(
        embeddings=ref,
        prompt_tokens=list(traffic.rng.poisson(40, 1000)),
        refused=[False] * 990 + [True] * 10,
    )
    assert m.scores().embedding_psi is None
    traffic.run(m, 200)
    s = m.scores()
    assert s.embedding_psi is not None and s.prompt_len_psi is not None
    assert s.refusal_rate_delta is not None
    assert s.output_len_psi is None  # no reference given: still filling from traffic
    assert set(s.to_dict()) == {
        "embedding_psi",
        "embedding_psi_max",
        "mean_shift",
        "prompt_len_psi",
        "refusal_rate_delta",
    }


def test_requests_without_embedding_or_output_count_for_the_other_signals() -> None:
    cfg = DriftConfig(reference_size=100, window_size=100, min_samples=100, check_every=10)
    m = DriftMonitor("bot", "v1", cfg)
    for i in range(300):
        m.observe(float(i), None, 10 + i % 7, None, False)
    s = m.scores()
    assert s.prompt_len_psi is not None and s.refusal_rate_delta == 0.0
    assert s.embedding_psi is None and s.output_len_psi is None


def test_observe_rejects_bad_input() -> None:
    m = DriftMonitor("bot", "v1")
    m.observe(0.0, np.ones(4), 1, 1, False)
    with pytest.raises(ValueError, match="have 4 dimensions, got one with 5"):
        m.observe(1.0, np.ones(5), 1, 1, False)
    with pytest.raises(ValueError, match="1-D vector"):
        m.observe(1.0, np.ones((2, 2)), 1, 1, False)
    with pytest.raises(ValueError, match="finite"):
        m.observe(1.0, np.array([1.0, np.nan, 0.0, 0.0]), 1, 1, False)
    with pytest.raises(ValueError, match="must not be negative"):
        m.observe(1.0, None, -1, 1, False)
    with pytest.raises(ValueError, match="non-empty"):
        m.set_reference(prompt_tokens=[])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"window_size": 0}, "window_size must be at least 1"),
        ({"min_samples": 600}, "must not exceed window_size"),
        ({"bins": 1}, "bins must be at least 2"),
        ({"psi_warn": 0.3}, "0 < psi_warn <= psi_alert"),
        ({"length_psi_alert": 0.05}, "length_psi_warn <= length_psi_alert"),
        ({"mean_shift_alert": 0.0}, "cosine distance"),
        ({"refusal_delta_alert": 1.5}, "rate change"),
        ({"cooldown_s": -1.0}, "cooldown_s"),
    ],
)
def test_config_rejects_out_of_range_values(changes: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DriftConfig(**changes)  # type: ignore[arg-type]


# -- alerts ---------------------------------------------------------------------------------


def _alert(at: float = 1.0, severity: str = "warning", model: str = "m") -> Alert:
    return make_alert(
        at=at,
        kind="drift.embedding",
        severity=severity,  # type: ignore[arg-type]
        model=model,
        version="v1",
        message="drifted",
        evidence={"psi": 0.3},
    )


def test_alert_ids_are_stable_and_records_are_json() -> None:
    a, b = _alert(), _alert()
    assert a.id == b.id and len(a.id) == 16
    assert _alert(at=2.0).id != a.id
    d = json.loads(json.dumps(a.to_dict()))
    assert d["kind"] == "drift.embedding" and d["evidence"] == {"psi": 0.3}
    assert d["replica"] is None


def test_alert_rejects_unknown_kind_severity_and_non_finite_evidence() -> None:
    with pytest.raises(ValueError, match="alert kind must be one of"):
        Alert("x", 0.0, "drift.vibes", "info", "m", "v", None, "", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity must be one of"):
        Alert("x", 0.0, "drift.embedding", "bad", "m", "v", None, "", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z are not"):
        Alert("x", 0.0, "drift.embedding", "info", "m", "v", None, "", {"z": float("inf")})


def test_alert_evidence_is_a_private_copy() -> None:
    evidence = {"psi": 0.3}
    a = make_alert(
        at=0.0,
        kind="drift.embedding",
        severity="info",
        model="m",
        version="v",
        message="",
        evidence=evidence,
    )
    evidence["psi"] = 9.0
    assert a.evidence["psi"] == 0.3


def test_alert_log_is_a_ring_buffer_with_filters_and_totals() -> None:
    log = AlertLog(capacity=3)
    log.add(_alert(1.0, "info", "a"))
    log.add(_alert(2.0, "critical", "b"))
    log.add(_alert(3.0, "warning", "a"))
    log.add(_alert(4.0, "info", "b"))  # evicts the first
    assert len(log) == 3
    assert [a.at for a in log.recent()] == [4.0, 3.0, 2.0]
    assert [a.at for a in log.recent(2)] == [4.0, 3.0]
    assert [a.at for a in log.recent(severity="warning")] == [3.0, 2.0]
    assert [a.at for a in log.recent(model="b")] == [4.0, 2.0]
    assert log.counts() == {
        ("drift.embedding", "info"): 2,
        ("drift.embedding", "critical"): 1,
        ("drift.embedding", "warning"): 1,
    }
    with pytest.raises(ValueError, match="severity must be one of"):
        log.recent(severity="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity"):
        AlertLog(capacity=0)


def test_alert_gate_fires_once_per_level_and_honours_the_cooldown() -> None:
    g = AlertGate(cooldown_s=100.0)
    assert g.update(0.0, "info")
    assert not g.update(1.0, "info")  # same episode, same level
    assert g.update(2.0, "warning")  # escalation is news: at once
    assert not g.update(3.0, "info")  # lower again: still the same episode
    assert not g.update(4.0, None)  # episode over
    assert not g.update(50.0, "warning")  # a new episode within the cooldown waits
    assert g.update(102.5, "warning")  # ... and fires once the cooldown is over
    assert not g.update(103.0, "warning")


def test_core_modules_import_no_ray() -> None:
    code = (
        "import sys, airi_ray.core.drift, airi_ray.core.anomaly, airi_ray.core.alerts;"
        "bad = [m for m in ('ray', 'asyncio', 'lancedb', 'pyarrow', 'socket') "
        "if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
