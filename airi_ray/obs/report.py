"""The ``airi report`` page: a window of observability samples as one self-contained HTML file.

``airi report`` fetches the recent samples (one per sampling interval, about 5 s), the alert
log and the quality summary from the cluster and hands them to ``render_report``, which
returns a page people read instead of metrics text: a header with the window, a summary
line, five plots, the alerts (newest first) and the quality of each model version. The
page has no external assets and no JavaScript: CSS is inline and the plots are PNGs in
``data:`` URIs, so it can be mailed, attached to an issue or opened from disk as is.

The plots (``figures``) share one x axis, local wall-clock time (HH:MM:SS, ticks at round
times, see ``time_ticks``) over the whole window, so a spike in one lines up with the others and with the alert table:

- ``throughput``: requests/s and output tokens/s (twin axis), per interval;
- ``ttft``: time to first token p50/p90/p99 in ms, with gaps where no generate finished;
- ``queue_depth``: one line per tenant (a tenant missing from a sample counts 0);
- ``cache_hit_rate``: prefix-cache hit rate per model, 0..1;
- ``drift``: embedding PSI (solid) and prompt-length PSI (dashed) per model@version, the
  conventional PSI thresholds 0.1 (moderate) and 0.25 (significant), and red vertical
  lines at intervals that raised alerts (of any kind).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas and never through
pyplot, so rendering keeps no global state and may run in several threads. Each is 8 x 3
inches at 100 dpi (800 x 300 pixels, tens of kB), so a page of five stays light. At most
``MAX_SERIES`` lines per plot keep a legend readable: the tenants with the highest peak
(the rest summed into one "other" line), the model versions with the highest PSI, the
first models by name.

Inputs are checked only for shape (a list of dicts with a numeric ``at``, and so on);
missing or None values inside a sample are gaps, never errors.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# matplotlib loads when a report is drawn, not with the client that can ask for one.
if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS: tuple[str, ...] = ("throughput", "ttft", "queue_depth", "cache_hit_rate", "drift")
"""The plot names of ``figures``, in page order."""

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
MAX_SERIES = 8
MAX_ALERT_ROWS = 200

_FIGSIZE = (8.0, 3.0)
_DPI = 100
_NAN = float("nan")
_ALERT_COLOR = "tab:red"

_TITLES: dict[str, str] = {
    "throughput": "throughput",
    "ttft": "time to first token",
    "queue_depth": "queue depth per tenant",
    "cache_hit_rate": "prefix-cache hit rate",
    "drift": "drift (PSI)",
}

_CAPTIONS: dict[str, str] = {
    "throughput": (
        "Throughput: model calls completed per second over all models (left axis) and "
        "output tokens per second (right axis), per sampling interval."
    ),
    "ttft": (
        "Time to first token of the generate calls finished in each interval: p50, p90 and "
        "p99 in ms. A gap means no generate call finished in that interval."
    ),
    "queue_depth": ("Queue depth: requests waiting per tenant at each sample, summed over models."),
    "cache_hit_rate": (
        "Prefix-cache hit rate per model (hits / queries so far, so it moves slowly)."
    ),
    "drift": (
        "Drift per model@version: embedding PSI (solid) and prompt-length PSI (dashed). "
        "Conventionally below 0.1 is no change, 0.1-0.25 moderate, above 0.25 significant. "
        "Red vertical lines: intervals that raised alerts (any kind)."
    ),
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
  max-width: 900px; padding: 1em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; margin: 0.2em 0; }
.summary { background: #f4f6f8; border-radius: 4px; padding: 0.6em 0.8em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.45em; text-align: left;
  vertical-align: top; }
th { background: #f4f6f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.empty { color: #888; font-style: italic; }
.sev { font-weight: 600; padding: 0 0.3em; border-radius: 3px; }
.sev-info { background: #e3f0fb; color: #1a5490; }
.sev-warning { background: #fdf0d5; color: #8a5a00; }
.sev-critical { background: #fbe0e0; color: #a11; }
"""


def figures(samples: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of each plot in ``PLOTS``, drawn from ``samples`` (oldest first).

    Always all five keys: an empty window, or a plot without any series (no tenant ever
    queued, no drift judged yet), gives a plot that says "no data".

    Raises:
        ValueError: ``samples`` is not a list of dicts with a numeric ``at``.
    """
    return _figures(_check_samples(samples))


def render_report(
    samples: Sequence[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]],
    quality: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    title: str = "airi-ray report",
    generated_at: float | None = None,
) -> str:
    """The whole HTML page: header, summary, the five plots, alerts and quality tables.

    ``generated_at`` (unix seconds) defaults to now. All text from the inputs is escaped.

    Raises:
        ValueError: ``samples``, ``alerts`` or ``quality`` does not have the documented shape.
    """
    checked = _check_samples(samples)
    _check_alerts(alerts)
    _check_quality(quality)
    return _render(checked, alerts, quality, _figures(checked), title, generated_at)


def write_report(
    path: str | os.PathLike[str],
    samples: Sequence[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]],
    quality: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    png_dir: str | os.PathLike[str] | None = None,
    title: str = "airi-ray report",
    generated_at: float | None = None,
) -> Path:
    """Write the page of ``render_report`` to ``path`` (parent directories created).

    With ``png_dir``, each plot is also written as ``png_dir/NAME.png`` (a picture to
    commit under ``docs/``). The plots are drawn once for both. The page is written to a
    temporary file first and renamed, so a reader never sees half a page.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: as ``render_report``.
    """
    checked = _check_samples(samples)
    _check_alerts(alerts)
    _check_quality(quality)
    pngs = _figures(checked)
    page = _render(checked, alerts, quality, pngs, title, generated_at)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    if png_dir is not None:
        pdir = Path(png_dir)
        pdir.mkdir(parents=True, exist_ok=True)
        for name, data in pngs.items():
            (pdir / f"{name}.png").write_bytes(data)
    return out


# --- input checks -----------------------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_samples(samples: object) -> list[Mapping[str, Any]]:
    """The samples sorted by ``at`` (stable), after checking their shape."""
    if not isinstance(samples, list | tuple):
        raise ValueError(f"samples must be a list of dicts, got {type(samples).__name__}")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping):
            raise ValueError(f"samples[{i}] must be a dict, got {type(s).__name__}")
        at = s.get("at")
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise ValueError(f"samples[{i}] needs a finite number 'at' (unix seconds), got {at!r}")
    return sorted(samples, key=lambda s: float(s["at"]))


def _check_alerts(alerts: object) -> None:
    if not isinstance(alerts, list | tuple):
        raise ValueError(f"alerts must be a list of dicts, got {type(alerts).__name__}")
    for i, a in enumerate(alerts):
        if not isinstance(a, Mapping):
            raise ValueError(f"alerts[{i}] must be a dict, got {type(a).__name__}")


def _check_quality(quality: object) -> None:
    if not isinstance(quality, Mapping):
        raise ValueError(
            f"quality must be a dict {{model: {{version: stats}}}}, got {type(quality).__name__}"
        )
    for model, versions in quality.items():
        if not isinstance(versions, Mapping):
            raise ValueError(
                f"quality[{model!r}] must be a dict {{version: stats}}, "
                f"got {type(versions).__name__}"
            )
        for version, stats in versions.items():
            if not isinstance(stats, Mapping):
                raise ValueError(
                    f"quality[{model!r}][{version!r}] must be a dict, got {type(stats).__name__}"
                )


# --- values -----------------------------------------------------------------------------


def _num(v: object) -> float:
    """``v`` as a float, NaN when it is None or not a number."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return _NAN


def _dict(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _rate(count: object, interval: object) -> float:
    c, i = _num(count), _num(interval)
    return c / i if i > 0 else _NAN


def _finite_max(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else _NAN


def _window(samples: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """Start and end of the window in unix seconds: the first interval's start, the last end."""
    first, last = float(samples[0]["at"]), float(samples[-1]["at"])
    interval = _num(samples[0].get("interval_s"))
    start = first - interval if interval > 0 else first
    return start, last


# --- figures ----------------------------------------------------------------------------


def _figures(samples: list[Mapping[str, Any]]) -> dict[str, bytes]:
    if not samples:
        return {name: _png(_no_data_figure(name)) for name in PLOTS}
    x = [float(s["at"]) for s in samples]
    start, end = _window(samples)
    xlim = (start, end) if start < end else (start - 1.0, end + 1.0)
    draw = {
        "throughput": _throughput,
        "ttft": _ttft,
        "queue_depth": _queue_depth,
        "cache_hit_rate": _cache_hit_rate,
        "drift": _drift,
    }
    out: dict[str, bytes] = {}
    for name in PLOTS:
        fig, ax = _new_figure()
        draw[name](ax, x, samples)
        _time_axis(ax, xlim)
        out[name] = _png(fig)
    return out


# Tick steps in seconds; the first giving at most _MAX_TICKS ticks over the window is used.
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600)
_MAX_TICKS = 7


def time_ticks(start: float, end: float) -> list[float]:
    """Tick positions (unix seconds) between ``start`` and ``end`` at round local times.

    The step is the smallest of ``_TICK_STEPS`` giving at most ``_MAX_TICKS`` ticks (a
    day's multiple beyond them), and ticks fall on its multiples in local time (whole
    minutes, quarter hours, hours), so labels read 12:05:00, 12:06:00 and not 12:05:17.
    """
    span = max(end - start, 1.0)
    step = next((float(s) for s in _TICK_STEPS if span / s <= _MAX_TICKS), 0.0)
    if not step:
        step = 86400.0 * math.ceil(span / 86400.0 / _MAX_TICKS)
    offset = _utc_offset(start)
    first = math.ceil((start + offset) / step) * step - offset
    return [first + i * step for i in range(int((end - first) // step) + 1)]


def _utc_offset(at: float) -> float:
    delta = datetime.fromtimestamp(at).astimezone().utcoffset()
    return delta.total_seconds() if delta is not None else 0.0


def _clock(at: float, _pos: int | None = None) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")


def _time_axis(ax: Axes, xlim: tuple[float, float]) -> None:
    """Local HH:MM:SS ticks over ``xlim`` (unix seconds), the same on every plot."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_xlim(*xlim)
    ax.xaxis.set_major_locator(FixedLocator(time_ticks(*xlim)))
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))
    ax.set_xlabel("local time", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" entry: the same samples give the same bytes on any matplotlib version.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _title(ax: Axes, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=10)


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="#888888",
    )


def _no_data_figure(name: str) -> Figure:
    fig, ax = _new_figure()
    _title(ax, _TITLES[name])
    _no_data(ax)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _legend_right(ax: Axes, handles: list[Any] | None = None, title: str | None = None) -> None:
    kw: dict[str, Any] = {
        "loc": "upper left",
        "bbox_to_anchor": (1.01, 1.0),
        "fontsize": 7,
        "title_fontsize": 7,
        "frameon": False,
        "borderaxespad": 0.0,
    }
    if title:
        kw["title"] = title
    if handles is not None:
        ax.legend(handles=handles, **kw)
    else:
        ax.legend(**kw)


def _marker(n: int) -> dict[str, Any]:
    """Markers when there are too few points for a line to show."""
    return {"marker": "o", "markersize": 3} if n <= 2 else {}


def _throughput(ax: Axes, x: list[float], samples: Sequence[Mapping[str, Any]]) -> None:
    _title(ax, _TITLES["throughput"])
    req = [_rate(s.get("requests"), s.get("interval_s")) for s in samples]
    tok = [_rate(s.get("tokens_out"), s.get("interval_s")) for s in samples]
    if math.isnan(_finite_max(req)) and math.isnan(_finite_max(tok)):
        _no_data(ax)
        return
    mk = _marker(len(x))
    (h1,) = ax.plot(x, req, color="tab:blue", lw=1.2, label="requests/s", **mk)
    ax2 = ax.twinx()
    (h2,) = ax2.plot(x, tok, color="tab:orange", lw=1.2, label="output tokens/s", **mk)
    ax.set_ylabel("requests/s", color="tab:blue", fontsize=8)
    ax2.set_ylabel("tokens/s", color="tab:orange", fontsize=8)
    ax2.tick_params(labelsize=8)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    # Above the plot: the twin axis' labels take the right side.
    ax.legend(
        handles=[h1, h2],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=2,
        fontsize=7,
        frameon=False,
        borderaxespad=0.2,
    )


def _ttft(ax: Axes, x: list[float], samples: Sequence[Mapping[str, Any]]) -> None:
    _title(ax, _TITLES["ttft"])
    series = {
        q: [_num(_dict(s.get("ttft_ms")).get(q)) for s in samples] for q in ("p50", "p90", "p99")
    }
    if all(math.isnan(_finite_max(v)) for v in series.values()):
        _no_data(ax)
        return
    colors = {"p50": "tab:green", "p90": "tab:orange", "p99": "tab:red"}
    for q, ys in series.items():
        # Markers too: an interval between two gaps is a point, not a line.
        ax.plot(x, ys, color=colors[q], lw=1.2, marker=".", markersize=3, label=q)
    ax.set_ylabel("ms", fontsize=8)
    ax.set_ylim(bottom=0)
    _legend_right(ax)


def _queue_depth(ax: Axes, x: list[float], samples: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    _title(ax, _TITLES["queue_depth"])
    tenants = sorted({str(t) for s in samples for t in _dict(s.get("queue_depth"))})
    if not tenants:
        _no_data(ax)
        return
    series: dict[str, list[float]] = {}
    for t in tenants:
        ys = [_num(_dict(s.get("queue_depth")).get(t)) for s in samples]
        series[t] = [0.0 if math.isnan(v) else v for v in ys]
    # Highest peak first; ties by name.
    ranked = sorted(tenants, key=lambda t: (-max(series[t]), t))
    kept, rest = ranked[:MAX_SERIES], ranked[MAX_SERIES:]
    if len(rest) == 1:
        kept, rest = ranked, []
    mk = _marker(len(x))
    for t in kept:
        ax.plot(x, series[t], lw=1.2, label=t, **mk)
    if rest:
        other = [sum(series[t][i] for t in rest) for i in range(len(x))]
        ax.plot(x, other, lw=1.2, color="#888888", label=f"other ({len(rest)} tenants)", **mk)
    ax.set_ylabel("requests waiting", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_right(ax)


def _cache_hit_rate(ax: Axes, x: list[float], samples: Sequence[Mapping[str, Any]]) -> None:
    _title(ax, _TITLES["cache_hit_rate"])
    models = sorted({str(m) for s in samples for m in _dict(s.get("cache_hit_rate"))})
    if not models:
        _no_data(ax)
        ax.set_ylim(0, 1.05)
        return
    mk = _marker(len(x))
    for m in models[:MAX_SERIES]:
        ax.plot(
            x, [_num(_dict(s.get("cache_hit_rate")).get(m)) for s in samples], lw=1.2, label=m, **mk
        )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("hit rate", fontsize=8)
    hidden = len(models) - MAX_SERIES
    _legend_right(ax, title=f"+{hidden} more not shown" if hidden > 0 else None)


def _drift(ax: Axes, x: list[float], samples: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    _title(ax, _TITLES["drift"])
    keys = sorted({str(k) for s in samples for k in _dict(s.get("drift"))})
    emb: dict[str, list[float]] = {}
    prm: dict[str, list[float]] = {}
    for k in keys:
        emb[k] = [_num(_dict(_dict(s.get("drift")).get(k)).get("embedding_psi")) for s in samples]
        prm[k] = [_num(_dict(_dict(s.get("drift")).get(k)).get("prompt_psi")) for s in samples]
    peaks = {k: _finite_max(emb[k] + prm[k]) for k in keys}
    judged = [k for k in keys if not math.isnan(peaks[k])]
    ranked = sorted(judged, key=lambda k: (-peaks[k], k))
    shown, hidden = ranked[:MAX_SERIES], len(ranked) - MAX_SERIES

    handles: list[Any] = []
    mk = _marker(len(x))
    for i, k in enumerate(shown):
        color = f"C{i % 10}"
        ax.plot(x, emb[k], color=color, lw=1.2, ls="-", **mk)
        ax.plot(x, prm[k], color=color, lw=1.2, ls="--", **mk)
        handles.append(Line2D([], [], color=color, lw=1.2, label=k))
    if shown:
        handles.append(Line2D([], [], color="#555555", lw=1.2, ls="-", label="embedding PSI"))
        handles.append(Line2D([], [], color="#555555", lw=1.2, ls="--", label="prompt PSI"))

    top = max([PSI_SIGNIFICANT * 1.2] + [peaks[k] * 1.1 for k in shown])
    ax.set_ylim(0, top)
    label_at = blended_transform_factory(ax.transAxes, ax.transData)
    for level, name, color in (
        (PSI_MODERATE, "moderate", "tab:orange"),
        (PSI_SIGNIFICANT, "significant", "tab:red"),
    ):
        ax.axhline(level, color=color, ls=":", lw=1)
        ax.text(
            0.995,
            level,
            f"{level:g} {name}",
            transform=label_at,
            ha="right",
            va="bottom",
            fontsize=7,
            color=color,
        )

    count_at = blended_transform_factory(ax.transData, ax.transAxes)
    raised = [(xi, _num(s.get("alerts"))) for xi, s in zip(x, samples, strict=True)]
    raised = [(xi, n) for xi, n in raised if n > 0]
    for xi, n in raised:
        ax.axvline(xi, color=_ALERT_COLOR, alpha=0.4, lw=1)
        ax.text(
            xi,
            1.0,
            f"{n:g}",
            transform=count_at,
            ha="center",
            va="bottom",
            fontsize=6,
            color=_ALERT_COLOR,
        )
    if raised:
        handles.append(Line2D([], [], color=_ALERT_COLOR, alpha=0.4, lw=1, label="alerts raised"))

    if not shown:
        _no_data(ax, "no drift scores yet" if raised else "no data")
    ax.set_ylabel("PSI", fontsize=8)
    if handles:
        _legend_right(ax, handles, title=f"+{hidden} more not shown" if hidden > 0 else None)


# --- html -------------------------------------------------------------------------------


def _esc(v: object) -> str:
    return html.escape("" if v is None else str(v))


def _when(at: object, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    t = _num(at)
    if not math.isfinite(t):
        return "n/a"
    return datetime.fromtimestamp(t).strftime(fmt)


def _fmt(v: object, spec: str) -> str:
    f = _num(v)
    return "n/a" if math.isnan(f) else format(f, spec)


def _pct(v: object) -> str:
    f = _num(v)
    return "n/a" if math.isnan(f) else f"{100 * f:.1f}%"


def _summary(samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return "No samples in the window."
    requests = sum(v for s in samples if not math.isnan(v := _num(s.get("requests"))))
    errors = sum(v for s in samples if not math.isnan(v := _num(s.get("errors"))))
    tokens = sum(v for s in samples if not math.isnan(v := _num(s.get("tokens_out"))))
    raised = sum(v for s in samples if not math.isnan(v := _num(s.get("alerts"))))
    seconds = sum(v for s in samples if (v := _num(s.get("interval_s"))) > 0)
    parts = [
        f"{requests:,.0f} requests",
        f"{errors:,.0f} errors (error rate {_pct(errors / requests) if requests > 0 else 'n/a'})",
        f"mean {_fmt(requests / seconds, '.2f') if seconds > 0 else 'n/a'} req/s",
        f"{tokens:,.0f} output tokens (mean {_fmt(tokens / seconds, '.1f') if seconds > 0 else 'n/a'}"
        " tokens/s)",
        f"{raised:,.0f} alerts raised",
    ]
    return " &middot; ".join(parts)


def _newest_first(alert: Mapping[str, Any]) -> float:
    """Sort key: later alerts first, alerts without a valid time last."""
    at = _num(alert.get("at"))
    return -at if math.isfinite(at) else math.inf


def _alerts_table(alerts: Sequence[Mapping[str, Any]]) -> str:
    if not alerts:
        return '<p class="empty">No alerts.</p>'
    # Newest first; the input is newest last, so reversing keeps ties in order.
    ordered = sorted(reversed(list(alerts)), key=_newest_first)
    shown = ordered[:MAX_ALERT_ROWS]
    rows = []
    for a in shown:
        sev = str(a.get("severity") or "")
        cls = f"sev sev-{sev}" if sev in ("info", "warning", "critical") else "sev"
        evidence = ", ".join(
            f"{_esc(k)}={_fmt(v, '.4g') if _is_number(v) else _esc(v)}"
            for k, v in sorted(_dict(a.get("evidence")).items(), key=lambda kv: str(kv[0]))
        )
        rows.append(
            "<tr>"
            f"<td>{_esc(_when(a.get('at')))}</td>"
            f'<td><span class="{cls}">{_esc(sev)}</span></td>'
            f"<td>{_esc(a.get('kind'))}</td>"
            f"<td>{_esc(a.get('model'))}</td>"
            f"<td>{_esc(a.get('version'))}</td>"
            f"<td>{_esc(a.get('replica'))}</td>"
            f"<td>{_esc(a.get('message'))}</td>"
            f"<td>{evidence}</td>"
            "</tr>"
        )
    note = ""
    if len(ordered) > len(shown):
        note = f'<p class="meta">Showing the newest {len(shown)} of {len(ordered)} alerts.</p>'
    return (
        note + "<table><thead><tr><th>time</th><th>severity</th><th>kind</th><th>model</th>"
        "<th>version</th><th>replica</th><th>message</th><th>evidence</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
    )


def _version_key(v: object) -> tuple[int, float, str]:
    """Numeric versions in numeric order, then the others by name."""
    s = str(v)
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _quality_table(quality: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    rows = []
    for model in sorted(quality, key=str):
        versions = quality[model]
        for version in sorted(versions, key=_version_key):
            q = versions[version]
            reasons = ", ".join(
                f"{_esc(k)}: {_esc(v)}"
                for k, v in sorted(
                    _dict(q.get("finish_reasons")).items(), key=lambda kv: str(kv[0])
                )
            )
            rows.append(
                "<tr>"
                f"<td>{_esc(model)}</td><td>{_esc(version)}</td>"
                f'<td class="num">{_fmt(q.get("responses"), ",.0f")}</td>'
                f'<td class="num">{_pct(q.get("error_rate"))}</td>'
                f'<td class="num">{_pct(q.get("refusal_rate"))}</td>'
                f'<td class="num">{_pct(q.get("filtered_rate"))}</td>'
                f'<td class="num">{_fmt(q.get("mean_output_tokens"), ".1f")}</td>'
                f"<td>{reasons or 'n/a'}</td>"
                f'<td class="num">{_fmt(q.get("relevance_mean"), ".3f")}</td>'
                f'<td class="num">{_fmt(q.get("grounding_mean"), ".3f")}</td>'
                f'<td class="num">{_fmt(q.get("feedback_count"), ",.0f")}</td>'
                f'<td class="num">{_fmt(q.get("feedback_mean"), ".2f")}</td>'
                "</tr>"
            )
    if not rows:
        return '<p class="empty">No quality data.</p>'
    return (
        "<table><thead><tr><th>model</th><th>version</th><th>responses</th><th>error rate</th>"
        "<th>refusal rate</th><th>filtered rate</th><th>mean output tokens</th>"
        "<th>finish reasons</th><th>relevance</th><th>grounding</th><th>feedback</th>"
        "<th>feedback mean</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _render(
    samples: list[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]],
    quality: Mapping[str, Mapping[str, Mapping[str, Any]]],
    pngs: Mapping[str, bytes],
    title: str,
    generated_at: float | None,
) -> str:
    generated = time.time() if generated_at is None else generated_at
    tz = datetime.fromtimestamp(generated).astimezone().tzname() or "local time"
    if samples:
        start, end = _window(samples)
        fmt_end = (
            "%H:%M:%S"
            if _when(start, "%Y-%m-%d") == _when(end, "%Y-%m-%d")
            else "%Y-%m-%d %H:%M:%S"
        )
        window = (
            f"Window {_esc(_when(start))} &ndash; {_esc(_when(end, fmt_end))} {_esc(tz)} "
            f"({_duration(end - start)}, {len(samples)} sample{'s' if len(samples) != 1 else ''})"
        )
    else:
        window = "Window: no samples"
    figs = []
    for name in PLOTS:
        data = base64.b64encode(pngs[name]).decode("ascii")
        figs.append(
            f'<figure id="{name}"><img src="data:image/png;base64,{data}" '
            f'alt="{_esc(_TITLES[name])} plot" width="800" height="300">'
            f"<figcaption>{_esc(_CAPTIONS[name])}</figcaption></figure>"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{_esc(title)}</h1>"
        f'<p class="meta">{window}</p>'
        f'<p class="meta">Generated {_esc(_when(generated))} {_esc(tz)}</p></header>\n'
        f'<p class="summary">{_summary(samples)}</p>\n'
        "<h2>Plots</h2>\n" + "\n".join(figs) + "\n"
        f"<h2>Alerts ({len(alerts)})</h2>\n{_alerts_table(alerts)}\n"
        f"<h2>Quality per model version</h2>\n{_quality_table(quality)}\n"
        "</body></html>\n"
    )


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
