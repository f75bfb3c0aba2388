"""Input and output drift of one deployed model: a reference window against the current one.

A ``DriftMonitor`` per (model, version) is fed one observation per request: the input
embedding (or None when the request was not embedded), the prompt and output lengths in
tokens, and whether the model refused. Each signal first fills a reference of
``reference_size`` values (or is given one with ``set_reference``); after that its last
``window_size`` values form the current window, and every ``check_every`` observations each
signal with enough samples is compared with its reference:

- embeddings: the population stability index (PSI) over ``projections`` random directions,
  averaged over the directions, and the cosine distance between the mean embeddings;
- prompt and output lengths: the PSI of the token counts;
- refusals: the current refusal rate minus the reference's.

PSI = sum over bins of (cur - ref) * ln(cur / ref), with bins at the reference's quantiles
and empty bins clipped to ``_EPS`` so the logarithm stays finite. Conventionally below 0.1
is no change, 0.1-0.25 a moderate one, above 0.25 a significant one. Each term is >= 0, so
PSI is >= 0, and 0 exactly when both samples fill the bins in the same proportions.

Why the mean over projections and not the max: PSI of finite samples is biased upwards
(about ``(bins - 1) * (1/n_ref + 1/n_cur)`` for unchanged data, 0.027 with the defaults)
and noisy; the max of 16 noisy values sits well above their mean, so it would need a
higher threshold to stay quiet on stationary traffic. A real change of topic moves the
embeddings along many directions at once and so lifts the mean. The max is still reported
as evidence. A length PSI is a single such noisy value: on 400,000 simulated requests of
unchanged lengths it reached 0.12 with the defaults, hence its ``info`` level at 0.15.

The mean-embedding distance complements it: sentence embeddings share a common component,
so the mean of a topic has a clear direction and a change of topic turns it, even when the
change per random direction is small next to the spread of one topic.

Alerts: a score reaching its warn threshold raises ``info``, its alert threshold
``warning`` (drift is a reason to look, not an outage), through an ``AlertGate`` per kind:
one alert per level while the score stays high, ``cooldown_s`` between episodes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from airi_ray.core.alerts import (
    Alert,
    AlertGate,
    AlertKind,
    Severity,
    make_alert,
    severity_rank,
)

FloatArray = npt.NDArray[np.float64]

# Floor for a bin's share in PSI: an empty bin would otherwise make ln(cur/ref) infinite.
_EPS = 1e-4


def random_projections(dim: int, k: int, seed: int) -> FloatArray:
    """``k`` random unit directions in ``dim`` dimensions, as the columns of a (dim, k) array.

    Gaussian directions, normalised, from ``np.random.default_rng(seed)``: the same seed
    gives the same directions, so a monitor rebuilt with its config projects alike.

    Raises:
        ValueError: ``dim`` or ``k`` is not positive.
    """
    if dim < 1 or k < 1:
        raise ValueError(f"dim and k must be positive, got dim={dim}, k={k}")
    p = np.random.default_rng(seed).standard_normal((dim, k))
    norms: FloatArray = np.linalg.norm(p, axis=0)
    return p / norms


def quantile_edges(reference: npt.ArrayLike, bins: int) -> FloatArray:
    """The inner bin edges at the reference's quantiles 1/bins .. (bins-1)/bins.

    Repeated edges are merged (token counts have ties), so there may be fewer bins than
    asked for; a constant reference gives one edge, hence two bins.
    """
    ref = _as_sample(reference, "reference")
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    qs = np.arange(1, bins) / bins
    edges: FloatArray = np.unique(np.quantile(ref, qs))
    return edges


def bin_shares(values: npt.ArrayLike, edges: FloatArray) -> FloatArray:
    """The share of ``values`` in each bin of ``edges`` (a value on an edge goes above it),
    floored at ``_EPS``."""
    x = _as_sample(values, "values")
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
    shares: FloatArray = np.maximum(counts / len(x), _EPS)
    return shares


def psi_of_shares(ref: FloatArray, cur: FloatArray) -> float:
    """PSI between two vectors of bin shares over the same bins."""
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` (1-D samples).

    Bins are fitted on the reference (``quantile_edges``); shares are floored at ``_EPS``.

    Raises:
        ValueError: a sample is empty or not finite, or ``bins`` < 2.
    """
    edges = quantile_edges(reference, bins)
    return psi_of_shares(bin_shares(reference, edges), bin_shares(current, edges))


def _as_sample(values: npt.ArrayLike, name: str) -> FloatArray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} must hold at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must hold finite numbers only (no NaN or infinity)")
    return x


@dataclass(frozen=True)
class DriftConfig:
    """When and how a ``DriftMonitor`` compares, and the thresholds of its alerts.

    Attributes:
        reference_size: values per signal that form its reference.
        window_size: values per signal in the current (sliding) window.
        check_every: observations between two comparisons.
        min_samples: values a signal needs in its reference and its window to be judged
            (at most ``window_size``: a half-empty window is noisier, so PSI is higher).
            The sizes set the noise: a smaller window reacts sooner but needs higher
            thresholds to stay quiet on unchanged traffic.
        projections: random directions for the embedding PSI.
        bins: PSI bins (quantiles of the reference).
        psi_warn, psi_alert: embedding PSI (mean over projections) for info / warning.
        mean_shift_alert: cosine distance between mean embeddings for a warning.
        length_psi_warn, length_psi_alert: prompt and output length PSI for info / warning.
        refusal_delta_alert: absolute change of the refusal rate (0.1 = ten points) for a
            warning; a drop counts too (a guardrail that stopped refusing is news). Its
            noise is ``sqrt(p (1 - p) (1/n_ref + 1/n_cur))``: 0.025 at a 30% rate.
        cooldown_s: least time between two alert episodes of one kind.
        seed: seed of the random projections.

    Raises:
        ValueError: a size or threshold is out of range.
    """

    reference_size: int = 1000
    window_size: int = 500
    check_every: int = 25
    min_samples: int = 400
    projections: int = 16
    bins: int = 10
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    mean_shift_alert: float = 0.05
    length_psi_warn: float = 0.15
    length_psi_alert: float = 0.25
    refusal_delta_alert: float = 0.1
    cooldown_s: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("reference_size", "window_size", "check_every", "min_samples", "projections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.bins < 2:
            raise ValueError(f"bins must be at least 2, got {self.bins}")
        if self.min_samples > min(self.window_size, self.reference_size):
            raise ValueError(
                f"min_samples ({self.min_samples}) must not exceed window_size "
                f"({self.window_size}) or reference_size ({self.reference_size})"
            )
        for warn, alert in (("psi_warn", "psi_alert"), ("length_psi_warn", "length_psi_alert")):
            w, a = getattr(self, warn), getattr(self, alert)
            if not 0 < w <= a:
                raise ValueError(f"need 0 < {warn} <= {alert}, got {w} and {a}")
        if not 0 < self.mean_shift_alert <= 2:
            raise ValueError(
                f"mean_shift_alert is a cosine distance within (0, 2], got {self.mean_shift_alert}"
            )
        if not 0 < self.refusal_delta_alert <= 1:
            raise ValueError(
                f"refusal_delta_alert is a rate change within (0, 1], "
                f"got {self.refusal_delta_alert}"
            )
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must not be negative, got {self.cooldown_s}")


@dataclass(frozen=True)
class DriftScores:
    """The latest comparison of each signal, None until that signal has been judged.

    ``embedding_psi`` is the mean over projections, ``embedding_psi_max`` the largest;
    ``refusal_rate_delta`` is signed (current minus reference).
    """

    embedding_psi: float | None = None
    embedding_psi_max: float | None = None
    mean_shift: float | None = None
    prompt_len_psi: float | None = None
    output_len_psi: float | None = None
    refusal_rate_delta: float | None = None

    def to_dict(self) -> dict[str, float]:
        """The scores judged so far, by name (for gauges)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


T = TypeVar("T")


class _Series(Generic[T]):
    """One signal: its reference while it fills, then its sliding current window."""

    def __init__(self, reference_size: int, window_size: int) -> None:
        self.reference_size = reference_size
        self.filling: list[T] = []
        self.reference: list[T] | None = None
        self.window: deque[T] = deque(maxlen=window_size)

    def add(self, value: T) -> bool:
        """Append a value; True when it completed the reference."""
        if self.reference is not None:
            self.window.append(value)
            return False
        self.filling.append(value)
        if len(self.filling) < self.reference_size:
            return False
        self.reference, self.filling = self.filling, []
        return True

    def set_reference(self, values: list[T]) -> None:
        self.reference, self.filling = values, []
        self.window.clear()


@dataclass(frozen=True)
class _LengthRef:
    edges: FloatArray
    shares: FloatArray
    mean: float
    n: int


@dataclass(frozen=True)
class _EmbeddingRef:
    edges: list[FloatArray]  # per projection
    shares: list[FloatArray]
    mean: FloatArray
    n: int


class DriftMonitor:
    """Drift of one (model, version)'s traffic against a reference; see the module doc.

    Args:
        model, version: what the alerts name.
        config: sizes and thresholds.
    """

    def __init__(self, model: str, version: str, config: DriftConfig | None = None) -> None:
        self.model = model
        self.version = version
        self.config = c = config if config is not None else DriftConfig()
        self._embeddings: _Series[FloatArray] = _Series(c.reference_size, c.window_size)
        self._prompt: _Series[int] = _Series(c.reference_size, c.window_size)
        self._output: _Series[int] = _Series(c.reference_size, c.window_size)
        self._refused: _Series[bool] = _Series(c.reference_size, c.window_size)
        self._dim: int | None = None
        self._projections: FloatArray | None = None
        self._emb_ref: _EmbeddingRef | None = None
        self._prompt_ref: _LengthRef | None = None
        self._output_ref: _LengthRef | None = None
        self._refusal_ref: tuple[float, int] | None = None  # rate, n
        self._gates: dict[AlertKind, AlertGate] = {}
        self._scores = DriftScores()
        self.observations = 0

    # -- feeding --------------------------------------------------------------------------

    def observe(
        self,
        now: float,
        embedding: npt.ArrayLike | None,
        prompt_tokens: int,
        output_tokens: int | None,
        refused: bool,
    ) -> list[Alert]:
        """Record one request; every ``check_every`` observations, compare and maybe alert.

        Args:
            embedding: the input's embedding (1-D, same length every time), None if the
                request was not embedded.
            output_tokens: None when the call produced no complete output (it failed).

        Raises:
            ValueError: a negative token count, or an embedding that is not a finite 1-D
                vector of the dimension seen before.
        """
        if prompt_tokens < 0 or (output_tokens is not None and output_tokens < 0):
            raise ValueError(
                f"token counts must not be negative, got prompt_tokens={prompt_tokens}, "
                f"output_tokens={output_tokens}"
            )
        if embedding is not None and self._embeddings.add(self._check_embedding(embedding)):
            self._fit_embeddings()
        if self._prompt.add(prompt_tokens):
            self._prompt_ref = self._fit_lengths(self._prompt)
        if output_tokens is not None and self._output.add(output_tokens):
            self._output_ref = self._fit_lengths(self._output)
        if self._refused.add(bool(refused)):
            self._fit_refusals()
        self.observations += 1
        if self.observations % self.config.check_every:
            return []
        return self._check(now)

    def set_reference(
        self,
        *,
        embeddings: npt.ArrayLike | None = None,
        prompt_tokens: Sequence[int] | None = None,
        output_tokens: Sequence[int] | None = None,
        refused: Sequence[bool] | None = None,
    ) -> None:
        """Replace the reference of the signals given (e.g. a curated sample of expected
        traffic); their current windows start empty. Signals not given keep theirs (or keep
        filling it from traffic). A reference smaller than ``min_samples`` is never judged.

        Args:
            embeddings: a (n, dim) array.

        Raises:
            ValueError: an empty reference, negative token counts or bad embeddings.
        """
        if embeddings is not None:
            rows = np.asarray(embeddings, dtype=np.float64)
            if rows.ndim != 2 or rows.shape[0] == 0:
                raise ValueError(
                    f"embeddings must be a non-empty (n, dim) array, got shape {rows.shape}"
                )
            self._embeddings.set_reference([self._check_embedding(r) for r in rows])
            self._fit_embeddings()
        for name, values, series in (
            ("prompt_tokens", prompt_tokens, self._prompt),
            ("output_tokens", output_tokens, self._output),
        ):
            if values is None:
                continue
            if len(values) == 0 or min(values) < 0:
                raise ValueError(f"{name} must be a non-empty list of non-negative counts")
            series.set_reference([int(v) for v in values])
        if prompt_tokens is not None:
            self._prompt_ref = self._fit_lengths(self._prompt)
        if output_tokens is not None:
            self._output_ref = self._fit_lengths(self._output)
        if refused is not None:
            if len(refused) == 0:
                raise ValueError("refused must be a non-empty list of booleans")
            self._refused.set_reference([bool(v) for v in refused])
            self._fit_refusals()

    def scores(self) -> DriftScores:
        """The latest scores (for gauges and plots)."""
        return self._scores

    # -- comparing ------------------------------------------------------------------------

    def _check(self, now: float) -> list[Alert]:
        alerts = [
            self._check_embeddings(now),
            self._check_lengths(now, "drift.prompt_length"),
            self._check_lengths(now, "drift.output_length"),
            self._check_refusals(now),
        ]
        return [a for a in alerts if a is not None]

    def _check_embeddings(self, now: float) -> Alert | None:
        c, ref, window = self.config, self._emb_ref, self._embeddings.window
        if ref is None or ref.n < c.min_samples or len(window) < c.min_samples:
            return None
        assert self._projections is not None  # set with the first embedding
        rows = np.stack(list(window))
        projected = rows @ self._projections
        psis = [
            psi_of_shares(ref.shares[j], bin_shares(projected[:, j], ref.edges[j]))
            for j in range(projected.shape[1])
        ]
        mean_psi, max_psi = float(np.mean(psis)), float(np.max(psis))
        shift = _cosine_distance(ref.mean, rows.mean(axis=0))
        self._scores = replace(
            self._scores, embedding_psi=mean_psi, embedding_psi_max=max_psi, mean_shift=shift
        )
        level = _max_level(
            _level(mean_psi, c.psi_warn, c.psi_alert),
            "warning" if shift >= c.mean_shift_alert else None,
        )
        if not self._gate("drift.embedding").update(now, level):
            return None
        assert level is not None  # the gate fires only for a level
        return self._alert(
            now,
            "drift.embedding",
            level,
            f"input embeddings of {self._name()} drifted: PSI {mean_psi:.3g} (mean over "
            f"{len(psis)} random projections, max {max_psi:.3g}; info at {c.psi_warn:g}, "
            f"warning at {c.psi_alert:g}), mean-embedding cosine distance {shift:.3g} "
            f"(warning at {c.mean_shift_alert:g}), last {len(window)} requests against a "
            f"reference of {ref.n}",
            {
                "psi": mean_psi,
                "psi_max": max_psi,
                "mean_shift": shift,
                "psi_warn": c.psi_warn,
                "psi_alert": c.psi_alert,
                "mean_shift_alert": c.mean_shift_alert,
                "reference_n": ref.n,
                "current_n": len(window),
            },
        )

    def _check_lengths(self, now: float, kind: AlertKind) -> Alert | None:
        c = self.config
        if kind == "drift.prompt_length":
            what, series, ref = "prompt", self._prompt, self._prompt_ref
        else:
            what, series, ref = "output", self._output, self._output_ref
        if ref is None or ref.n < c.min_samples or len(series.window) < c.min_samples:
            return None
        cur = np.fromiter(series.window, dtype=np.float64)
        value = psi_of_shares(ref.shares, bin_shares(cur, ref.edges))
        if what == "prompt":
            self._scores = replace(self._scores, prompt_len_psi=value)
        else:
            self._scores = replace(self._scores, output_len_psi=value)
        level = _level(value, c.length_psi_warn, c.length_psi_alert)
        if not self._gate(kind).update(now, level):
            return None
        assert level is not None
        cur_mean = float(cur.mean())
        return self._alert(
            now,
            kind,
            level,
            f"{what} lengths of {self._name()} drifted: PSI {value:.3g} (info at "
            f"{c.length_psi_warn:g}, warning at {c.length_psi_alert:g}), mean {cur_mean:.1f} "
            f"tokens over the last {len(cur)} requests against {ref.mean:.1f} in a reference "
            f"of {ref.n}",
            {
                "psi": value,
                "psi_warn": c.length_psi_warn,
                "psi_alert": c.length_psi_alert,
                "current_mean": cur_mean,
                "reference_mean": ref.mean,
                "reference_n": ref.n,
                "current_n": len(cur),
            },
        )

    def _check_refusals(self, now: float) -> Alert | None:
        c, ref, window = self.config, self._refusal_ref, self._refused.window
        if ref is None or ref[1] < c.min_samples or len(window) < c.min_samples:
            return None
        ref_rate, ref_n = ref
        rate = sum(window) / len(window)
        delta = rate - ref_rate
        self._scores = replace(self._scores, refusal_rate_delta=delta)
        level: Severity | None = "warning" if abs(delta) >= c.refusal_delta_alert else None
        if not self._gate("drift.refusal_rate").update(now, level):
            return None
        assert level is not None
        return self._alert(
            now,
            "drift.refusal_rate",
            level,
            f"refusal rate of {self._name()} moved from {ref_rate:.1%} to {rate:.1%} over the "
            f"last {len(window)} requests (warning at a change of {c.refusal_delta_alert:.0%})",
            {
                "delta": delta,
                "current_rate": rate,
                "reference_rate": ref_rate,
                "delta_alert": c.refusal_delta_alert,
                "reference_n": ref_n,
                "current_n": len(window),
            },
        )

    # -- internals ------------------------------------------------------------------------

    def _check_embedding(self, embedding: npt.ArrayLike) -> FloatArray:
        e = np.asarray(embedding, dtype=np.float64)
        if e.ndim != 1 or e.size == 0:
            raise ValueError(f"an embedding must be a non-empty 1-D vector, got shape {e.shape}")
        if self._dim is None:
            self._dim = e.size
            self._projections = random_projections(
                e.size, self.config.projections, self.config.seed
            )
        elif e.size != self._dim:
            raise ValueError(
                f"embeddings of {self._name()} have {self._dim} dimensions, got one with {e.size}"
            )
        if not np.all(np.isfinite(e)):
            raise ValueError("an embedding must hold finite numbers only (no NaN or infinity)")
        return e

    def _fit_embeddings(self) -> None:
        ref = self._embeddings.reference
        assert ref is not None and self._projections is not None
        rows = np.stack(ref)
        projected = rows @ self._projections
        edges = [
            quantile_edges(projected[:, j], self.config.bins) for j in range(projected.shape[1])
        ]
        shares = [bin_shares(projected[:, j], e) for j, e in enumerate(edges)]
        self._emb_ref = _EmbeddingRef(edges, shares, rows.mean(axis=0), len(ref))

    def _fit_lengths(self, series: _Series[int]) -> _LengthRef:
        assert series.reference is not None
        ref = np.asarray(series.reference, dtype=np.float64)
        edges = quantile_edges(ref, self.config.bins)
        return _LengthRef(edges, bin_shares(ref, edges), float(ref.mean()), len(ref))

    def _fit_refusals(self) -> None:
        ref = self._refused.reference
        assert ref is not None
        self._refusal_ref = (sum(ref) / len(ref), len(ref))

    def _gate(self, kind: AlertKind) -> AlertGate:
        gate = self._gates.get(kind)
        if gate is None:
            gate = self._gates[kind] = AlertGate(self.config.cooldown_s)
        return gate

    def _name(self) -> str:
        return f"{self.model} {self.version}"

    def _alert(
        self,
        now: float,
        kind: AlertKind,
        severity: Severity,
        message: str,
        evidence: dict[str, float],
    ) -> Alert:
        return make_alert(
            at=now,
            kind=kind,
            severity=severity,
            model=self.model,
            version=self.version,
            message=message,
            evidence=evidence,
        )


def _level(score: float, warn: float, alert: float) -> Severity | None:
    if score >= alert:
        return "warning"
    if score >= warn:
        return "info"
    return None


def _max_level(a: Severity | None, b: Severity | None) -> Severity | None:
    if a is None or b is None:
        return a if b is None else b
    return a if severity_rank(a) >= severity_rank(b) else b


def _cosine_distance(a: FloatArray, b: FloatArray) -> float:
    """1 - cos(a, b); 0 when either vector is zero (no direction to compare)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(1.0 - np.dot(a, b) / (na * nb))
