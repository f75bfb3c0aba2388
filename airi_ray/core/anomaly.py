"""Latency and error-rate anomalies per replica: an EWMA detector and a sibling comparison.

``EwmaDetector`` follows one signal with an exponentially weighted mean and variance and
flags a run of points far above it. Only rises are flagged: lower latency or fewer errors
are never a problem. A point is *out* when it exceeds the mean by ``z_threshold``
standard deviations and by at least ``min_change`` (so a very steady signal, whose variance
is tiny, does not fire on a rise nobody would notice). Then:

- ``consecutive`` out points in a row make an anomaly, so a single slow request (a long
  prompt, a garbage collection) does not;
- out points do not update the mean and variance: a lasting jump must not teach the
  detector that it is normal before it is confirmed;
- once confirmed, the detector starts learning afresh (a new warm-up) from the next point,
  so a lasting change of level becomes the new normal instead of an endless alert, and it
  reports nothing during the warm-up;
- a confirmed anomaly is reported only if the last report is ``cooldown_s`` old.

During the first points the weight of a new point is ``max(alpha, 1/n)``: the first
``1/alpha`` points give the plain running mean and variance, then it becomes an EWMA.

``ReplicaAnomalyMonitor`` keeps, per replica, one detector on latency (whatever the caller
measures: time to first token or end to end) and one on the error rate (the fraction of
failed calls in each block of ``error_window`` calls). It also compares a replica with its
siblings (the other replicas of the same model and version): a replica whose smoothed
latency is ``sibling_ratio`` times the median of the others' is anomalous. That is what a
replica slow from the start looks like, which its own detector learned as normal; it is
also what a slowdown looks like when single calls vary too much to stand out one by one.

Latency also rises with load: a replica batching 16 requests gets each one's first token
later than when it runs one, and a burst of traffic slows every replica at once. That is
queueing, not a fault, and the scheduler's queue metrics show it. So the own-history
detector keeps one baseline per load class: the requests in flight on the replica when the
call was granted, in powers of two (1, 2-3, 4-7, ... 64+). A burst moves calls into a class
learned afresh (no judgement during its warm-up) instead of raising an alert; a replica
that gets slower at the load it has been running at is still flagged. Before load classes,
a burst of 32 streams in ``make demo`` raised a latency alert on this 2-CPU machine.

Latency is judged on its logarithm. Latencies are skewed (a few calls take many times the
median) and a slowdown multiplies them; on the log scale the spread is even, so the
variance estimate from a few dozen points is steady and a z-score means the same for a
fast model as for a slow one. In simulation, 100,000 calls of steady lognormal latency
over four replicas raised 4 to 7 false alerts on raw seconds (sigma 0.6; about 30 with
sigma 1.0) and none on the log scale. So the latency detector's mean is the log of the
geometric mean, its ``min_change`` is a log ratio (``log(1.5)``: at least 1.5 times the
baseline), and the sibling comparison uses smoothed log latencies (one huge call moves
them little).

The defaults (alpha 0.05, z 3, three points in a row) were chosen on such simulations:
no false alert in 900,000 steady calls with sigma 0.2 to 1.0 (p99 up to 10 times the
median) and 5% errors, 4 in 300,000 with sigma 1.5 (p99 33 times); a replica slowed 5x
(sigma 0.3) flagged on its third slow call in 20 seeds out of 20. With alpha 0.1 or z 4
the variance estimate was noisier or the bar higher: slowdowns took up to 15 calls.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from airi_ray.core.alerts import Alert, AlertGate, AlertKind, Severity, make_alert

# A latency of 0 (a coarse clock) is taken as one microsecond, so its log is finite.
_MIN_LATENCY_S = 1e-6


@dataclass(frozen=True)
class EwmaConfig:
    """An ``EwmaDetector``'s settings.

    Attributes:
        alpha: weight of the newest point in the mean and variance, in (0, 1].
        z_threshold: standard deviations above the mean that make a point out.
        warmup: points learned before any is judged.
        min_change: least rise above the mean (in the signal's unit) that makes a point out.
        consecutive: out points in a row that make an anomaly.
        cooldown_s: least time between two reported anomalies.

    Raises:
        ValueError: a value is out of range.
    """

    alpha: float = 0.05
    z_threshold: float = 3.0
    warmup: int = 20
    min_change: float = 0.0
    consecutive: int = 3
    cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be within (0, 1], got {self.alpha}")
        if self.z_threshold <= 0:
            raise ValueError(f"z_threshold must be positive, got {self.z_threshold}")
        if self.warmup < 2:
            raise ValueError(
                f"warmup must be at least 2 (a variance needs two points), got {self.warmup}"
            )
        if self.min_change < 0:
            raise ValueError(f"min_change must not be negative, got {self.min_change}")
        if self.consecutive < 1:
            raise ValueError(f"consecutive must be at least 1, got {self.consecutive}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must not be negative, got {self.cooldown_s}")


@dataclass(frozen=True)
class Anomaly:
    """A confirmed rise: the point that confirmed it and the baseline it is measured
    against. ``z`` is None when the baseline had no variance at all."""

    at: float
    value: float
    mean: float
    std: float
    z: float | None
    points: int  # out points in the run that confirmed it


class EwmaDetector:
    """One signal's baseline and its run of out points; see the module doc."""

    def __init__(self, config: EwmaConfig | None = None) -> None:
        self.config = config if config is not None else EwmaConfig()
        self.n = 0  # points learned since the last (re)start
        self.mean = 0.0
        self.var = 0.0
        self.streak = 0
        self.last_reported_at: float | None = None

    @property
    def warm(self) -> bool:
        return self.n >= self.config.warmup

    def update(self, now: float, x: float) -> Anomaly | None:
        """Feed one point; an ``Anomaly`` when it confirms one that should be reported.

        Raises:
            ValueError: ``x`` is NaN or infinite.
        """
        if not math.isfinite(x):
            raise ValueError(f"a detector point must be a finite number, got {x}")
        c = self.config
        if self.warm:
            std = math.sqrt(self.var)
            rise = x - self.mean
            if rise > 0 and rise >= c.min_change and rise >= c.z_threshold * std:
                self.streak += 1
                if self.streak < c.consecutive:
                    return None
                anomaly = Anomaly(
                    now, x, self.mean, std, rise / std if std > 0 else None, self.streak
                )
                self._restart()
                last = self.last_reported_at
                if last is not None and now - last < c.cooldown_s:
                    return None
                self.last_reported_at = now
                return anomaly
            self.streak = 0
        self._learn(x)
        return None

    def _learn(self, x: float) -> None:
        self.n += 1
        a = max(self.config.alpha, 1.0 / self.n)
        d = x - self.mean
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)

    def _restart(self) -> None:
        self.n, self.mean, self.var, self.streak = 0, 0.0, 0.0, 0


MAX_LOAD_CLASS = 7  # 64 or more requests in flight


def load_class(in_flight: int) -> int:
    """The load class of a call: 1 for one request in flight, 2 for 2-3, 3 for 4-7, ...,
    up to ``MAX_LOAD_CLASS`` (64 and more)."""
    return min(max(in_flight, 1).bit_length(), MAX_LOAD_CLASS)


def _load_range(load: int) -> str:
    cls = load_class(load)
    low, high = 1 << (cls - 1), (1 << cls) - 1
    if cls == 1:
        return "1 request"
    return f"{low} or more requests" if cls == MAX_LOAD_CLASS else f"{low}-{high} requests"


def _latency_default() -> EwmaConfig:
    # On log latency: a point is out only at 1.5 times the baseline or more.
    return EwmaConfig(min_change=math.log(1.5))


def _error_rate_default() -> EwmaConfig:
    # Points are blocks of calls, so fewer of them: 5 blocks of warm-up, 2 in a row.
    return EwmaConfig(warmup=5, min_change=0.1, consecutive=2)


@dataclass(frozen=True)
class AnomalyConfig:
    """A ``ReplicaAnomalyMonitor``'s settings.

    Attributes:
        latency: the latency detector, on log seconds (``min_change`` is the log of the
            least ratio to the baseline: ``log(1.5)`` by default).
        error_rate: the error-rate detector, whose points are per-block error fractions
            (``min_change`` 0.1: ten more failed calls in a hundred).
        error_window: calls per error-rate block.
        sibling_ratio: a replica whose smoothed latency (geometric) is this many times the
            median of its siblings' is anomalous. Not lower than about 2: siblings on
            different accelerators may differ that much by design.
        sibling_min_others: siblings with a warmed-up latency needed for the comparison.

    Raises:
        ValueError: a value is out of range.
    """

    latency: EwmaConfig = field(default_factory=_latency_default)
    error_rate: EwmaConfig = field(default_factory=_error_rate_default)
    error_window: int = 50
    sibling_ratio: float = 3.0
    sibling_min_others: int = 1

    def __post_init__(self) -> None:
        if self.error_window < 1:
            raise ValueError(f"error_window must be at least 1, got {self.error_window}")
        if self.sibling_ratio <= 1:
            raise ValueError(f"sibling_ratio must be above 1, got {self.sibling_ratio}")
        if self.sibling_min_others < 1:
            raise ValueError(
                f"sibling_min_others must be at least 1, got {self.sibling_min_others}"
            )


@dataclass(frozen=True)
class ReplicaScores:
    """One replica's current figures, for gauges."""

    model: str
    version: str
    latency_level_s: float  # smoothed latency of every call (the sibling comparison's input)
    latency_baseline_s: float  # the detector's baseline (out points excluded)
    error_rate_baseline: float
    last_error_rate: float | None  # fraction in the last complete block


class _Replica:
    def __init__(self, model: str, version: str, config: AnomalyConfig) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.latency_by_load: dict[int, EwmaDetector] = {}
        self.latency = self.detector(1)  # the last call's load class
        self.errors = EwmaDetector(config.error_rate)
        self.level = 0.0  # EWMA of all log latencies, out points included
        self.level_n = 0
        self.calls = 0  # in the current error block
        self.failures = 0
        self.last_error_rate: float | None = None
        self.sibling_streak = 0
        self.sibling_gate = AlertGate(config.latency.cooldown_s)
        self.last_latency_alert_at: float | None = None

    def detector(self, load: int) -> EwmaDetector:
        cls = load_class(load)
        found = self.latency_by_load.get(cls)
        if found is None:
            found = self.latency_by_load[cls] = EwmaDetector(self.config.latency)
        return found


class ReplicaAnomalyMonitor:
    """Latency and error-rate anomalies of every replica; see the module doc.

    Replicas are known by id; one seen again under another model or version is taken to
    be redeployed and starts afresh. Call ``forget`` when a replica is removed, so it stops
    counting as a sibling.
    """

    def __init__(self, config: AnomalyConfig | None = None) -> None:
        self.config = config if config is not None else AnomalyConfig()
        self._replicas: dict[str, _Replica] = {}

    def observe_latency(
        self,
        now: float,
        replica: str,
        model: str,
        version: str,
        seconds: float,
        load: int = 1,
    ) -> list[Alert]:
        """Record one call's latency on ``replica``; alerts it raised, if any.

        ``load`` is the replica's requests in flight when the call was granted (itself
        included): the call is judged against the baseline of its load class.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {seconds}")
        r = self._replica(replica, model, version)
        r.latency = r.detector(load)
        x = math.log(max(seconds, _MIN_LATENCY_S))
        r.level_n += 1
        r.level += max(self.config.latency.alpha, 1.0 / r.level_n) * (x - r.level)
        alerts: list[Alert] = []
        baseline = math.exp(r.latency.mean)
        anomaly = r.latency.update(now, x)
        if anomaly is not None and self._latency_may_fire(r, now):
            z = f", {anomaly.z:.1f} standard deviations" if anomaly.z is not None else ""
            alerts.append(
                self._alert(
                    now,
                    "anomaly.latency",
                    "warning",
                    replica,
                    r,
                    f"latency of replica {replica} ({model} {version}) rose to {seconds:.3g}s, "
                    f"{seconds / baseline:.1f} times its baseline of {baseline:.3g}s at "
                    f"{_load_range(load)} in flight (on the log scale{z}), for "
                    f"{anomaly.points} calls in a row",
                    _evidence(
                        seconds=seconds,
                        baseline_s=baseline,
                        in_flight=load,
                        ratio=seconds / baseline,
                        log_std=anomaly.std,
                        z=anomaly.z,
                        points=anomaly.points,
                    ),
                )
            )
        sibling = self._check_siblings(now, replica, r)
        if sibling is not None:
            alerts.append(sibling)
        return alerts

    def observe_outcome(
        self, now: float, replica: str, model: str, version: str, ok: bool
    ) -> list[Alert]:
        """Record whether one call on ``replica`` succeeded; alerts it raised, if any.

        Every ``error_window`` calls the block's error fraction goes to the detector.
        """
        r = self._replica(replica, model, version)
        r.calls += 1
        r.failures += 0 if ok else 1
        if r.calls < self.config.error_window:
            return []
        rate = r.failures / r.calls
        r.calls = r.failures = 0
        r.last_error_rate = rate
        baseline = r.errors.mean
        anomaly = r.errors.update(now, rate)
        if anomaly is None:
            return []
        return [
            self._alert(
                now,
                "anomaly.error_rate",
                "critical",
                replica,
                r,
                f"error rate of replica {replica} ({model} {version}) rose to {rate:.1%} "
                f"against a baseline of {baseline:.1%}, over {anomaly.points} blocks of "
                f"{self.config.error_window} calls in a row",
                _evidence(
                    value=rate,
                    baseline=baseline,
                    std=anomaly.std,
                    z=anomaly.z,
                    points=anomaly.points,
                    window=self.config.error_window,
                ),
            )
        ]

    def forget(self, replica: str) -> None:
        """Drop a replica's state (it was removed)."""
        self._replicas.pop(replica, None)

    def scores(self) -> dict[str, ReplicaScores]:
        """Current figures by replica id."""
        return {
            rid: ReplicaScores(
                r.model,
                r.version,
                math.exp(r.level),
                math.exp(r.latency.mean),
                r.errors.mean,
                r.last_error_rate,
            )
            for rid, r in sorted(self._replicas.items())
        }

    # -- internals ------------------------------------------------------------------------

    def _replica(self, replica: str, model: str, version: str) -> _Replica:
        r = self._replicas.get(replica)
        if r is None or (r.model, r.version) != (model, version):
            r = self._replicas[replica] = _Replica(model, version, self.config)
        return r

    def _latency_may_fire(self, r: _Replica, now: float) -> bool:
        """One latency alert per replica per cooldown, whichever rule raised it."""
        last = r.last_latency_alert_at
        if last is not None and now - last < self.config.latency.cooldown_s:
            return False
        r.last_latency_alert_at = now
        return True

    def _check_siblings(self, now: float, replica: str, r: _Replica) -> Alert | None:
        c = self.config
        if r.level_n < c.latency.warmup:
            return None
        others = [
            o.level
            for rid, o in self._replicas.items()
            if rid != replica
            and (o.model, o.version) == (r.model, r.version)
            and o.level_n >= c.latency.warmup
        ]
        if len(others) < c.sibling_min_others:
            return None
        median = statistics.median(others)
        ratio = math.exp(r.level - median)
        # Like the detector: a few points in a row, so one huge call cannot lift the level
        # past the ratio on its own.
        r.sibling_streak = r.sibling_streak + 1 if ratio >= c.sibling_ratio else 0
        level: Severity | None = "warning" if r.sibling_streak >= c.latency.consecutive else None
        if not r.sibling_gate.update(now, level) or not self._latency_may_fire(r, now):
            return None
        level_s, median_s = math.exp(r.level), math.exp(median)
        return self._alert(
            now,
            "anomaly.latency",
            "warning",
            replica,
            r,
            f"replica {replica} ({r.model} {r.version}) is slower than its siblings: smoothed "
            f"latency {level_s:.3g}s, {ratio:.1f} times the median {median_s:.3g}s of "
            f"{len(others)} other replicas (alert at {c.sibling_ratio:g} times)",
            _evidence(
                level_s=level_s,
                sibling_median_s=median_s,
                ratio=ratio,
                ratio_alert=c.sibling_ratio,
                siblings=len(others),
            ),
        )

    @staticmethod
    def _alert(
        now: float,
        kind: AlertKind,
        severity: Severity,
        replica: str,
        r: _Replica,
        message: str,
        evidence: dict[str, float],
    ) -> Alert:
        return make_alert(
            at=now,
            kind=kind,
            severity=severity,
            model=r.model,
            version=r.version,
            replica=replica,
            message=message,
            evidence=evidence,
        )


def _evidence(**values: float | None) -> dict[str, float]:
    """The values that are known (None ones, such as z without variance, are left out)."""
    return {k: float(v) for k, v in values.items() if v is not None}
