"""The ``airi report`` page on synthetic samples: images, escaping, tables, empty inputs.

The window is 60 samples of 5 s: two tenants (one missing from some samples), a generate
gap (``ttft_ms`` None), one model's prefix-cache rate, and a drift rise of ``qwen@2`` from
PSI 0.02 to 0.4 in the last third with alerts raised there.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from airi_ray.obs.report import PLOTS, figures, render_report, time_ticks, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_764_412_345.0
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _sample(i: int) -> dict[str, Any]:
    late = i >= 40
    return {
        "at": T0 + 5.0 * i,
        "interval_s": 5.0,
        "requests": 40 + i % 7,
        "errors": 1 if i % 10 == 0 else 0,
        "tokens_out": 800 + 10 * i,
        "ttft_ms": None if 20 <= i < 23 else {"p50": 12.0, "p90": 30.0, "p99": 55.0 + i},
        "queue_depth": {"tenant-a": i % 4, **({} if i % 3 else {"tenant-b": 2})},
        "cache_hit_rate": {"qwen": min(1.0, 0.3 + i / 100)},
        "drift": {
            "qwen@2": {
                "embedding_psi": 0.4 if late else 0.02,
                "mean_shift": 0.01,
                "prompt_psi": 0.3 if late else 0.05,
                "output_psi": None,
            },
            "llama@1": {
                "embedding_psi": None,
                "mean_shift": None,
                "prompt_psi": None,
                "output_psi": None,
            },
        },
        "alerts": 2 if i in (41, 45) else 0,
    }


SAMPLES = [_sample(i) for i in range(60)]
ALERTS = [
    {
        "id": "a1",
        "at": T0 + 205.0,
        "kind": "drift.embedding",
        "severity": "warning",
        "model": "qwen",
        "version": "2",
        "replica": "r0",
        "message": "embedding drift: psi 0.40",
        "evidence": {"psi": 0.4, "psi_max": 0.61},
    },
    {
        "id": "a2",
        "at": T0 + 225.0,
        "kind": "anomaly.latency",
        "severity": "critical",
        "model": "qwen",
        "version": "2",
        "replica": "r1",
        "message": "<script>alert('x')</script> & ttft up",
        "evidence": {"ttft_p99_ms": 900.0},
    },
]
QUALITY = {
    "qwen": {
        "2": {
            "responses": 1234,
            "error_rate": 0.125,
            "refusal_rate": 0.03,
            "filtered_rate": 0.0,
            "mean_output_tokens": 87.25,
            "finish_reasons": {"stop": 1200, "length": 34},
            "relevance_mean": 0.812,
            "grounding_mean": None,
            "feedback_count": 7,
            "feedback_mean": 4.5,
        }
    }
}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(SAMPLES, ALERTS, QUALITY, title="test <report>", generated_at=T0 + 400)


def test_page_embeds_five_png_images(page: str) -> None:
    images = _pngs(page)
    assert page.count("data:image/png;base64,") == 5
    assert len(images) == 5
    assert all(img.startswith(PNG_MAGIC) for img in images)
    for name in PLOTS:
        assert f'<figure id="{name}">' in page


def test_page_is_self_contained(page: str) -> None:
    assert "<script" not in page  # no JavaScript, and the alert's <script> is escaped
    assert "http://" not in page and "https://" not in page
    assert "<style>" in page


def test_text_is_escaped(page: str) -> None:
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; ttft up" in page
    assert "<title>test &lt;report&gt;</title>" in page


def test_alerts_newest_first(page: str) -> None:
    table = page[page.index("<h2>Alerts") :]
    assert table.index("anomaly.latency") < table.index("drift.embedding")
    assert "psi_max=0.61" in table
    assert 'class="sev sev-critical"' in table


def test_quality_and_summary_values(page: str) -> None:
    quality = page[page.index("Quality per model version") :]
    for text in ("qwen", "1,234", "12.5%", "3.0%", "87.2", "stop: 1200", "length: 34", "0.812"):
        assert text in quality, text
    assert "4.50" in quality
    requests = sum(s["requests"] for s in SAMPLES)
    assert f"{requests:,} requests" in page
    assert f"mean {requests / 300:.2f} req/s" in page
    assert "60 samples" in page


def test_empty_inputs_render() -> None:
    page = render_report([], [], {}, generated_at=T0)
    images = _pngs(page)
    assert len(images) == 5 and all(img.startswith(PNG_MAGIC) for img in images)
    assert "No samples in the window." in page
    assert "No alerts." in page
    assert "No quality data." in page


def test_figures_keys_and_png() -> None:
    # The non-empty window's figures are checked through the page and write_report.
    pngs = figures([])
    assert list(pngs) == list(PLOTS)
    assert all(data.startswith(PNG_MAGIC) for data in pngs.values())


def test_gaps_and_missing_values_do_not_crash() -> None:
    base = {
        "interval_s": 5.0,
        "requests": 3,
        "errors": 0,
        "tokens_out": 10,
        "ttft_ms": None,
        "queue_depth": {},
        "cache_hit_rate": {},
        "drift": {},
        "alerts": 0,
    }
    samples = [
        {**base, "at": T0, "queue_depth": {"a": 1}},
        {**base, "at": T0 + 5, "interval_s": None, "requests": None, "alerts": 1},
        {**base, "at": T0 + 10, "queue_depth": {"b": 4}, "drift": {"m@1": {}}},
    ]
    images = _pngs(render_report(samples, [], {}))
    assert len(images) == 5 and all(img.startswith(PNG_MAGIC) for img in images)
    # A single sample is still a window (its interval).
    assert list(figures(samples[:1])) == list(PLOTS)


def test_write_report(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "report.html"
    png_dir = tmp_path / "docs" / "img"
    got = write_report(out, SAMPLES, ALERTS, QUALITY, png_dir=png_dir, title="t")
    assert got == out and out.is_file()
    assert len(_pngs(out.read_text(encoding="utf-8"))) == 5
    for name in PLOTS:
        assert (png_dir / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    ("samples", "alerts", "quality", "match"),
    [
        ({"at": T0}, [], {}, "samples must be a list"),
        ([{"at": T0}, 3], [], {}, r"samples\[1\] must be a dict"),
        ([{"requests": 1}], [], {}, r"samples\[0\] needs a finite number 'at'"),
        ([{"at": "now"}], [], {}, "'at'"),
        ([], "x", {}, "alerts must be a list"),
        ([], [None], {}, r"alerts\[0\] must be a dict"),
        ([], [], [], "quality must be a dict"),
        ([], [], {"qwen": {"1": 0.5}}, r"quality\['qwen'\]\['1'\] must be a dict"),
    ],
)
def test_bad_input_raises(samples: Any, alerts: Any, quality: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_report(samples, alerts, quality)


def test_time_ticks_are_round_and_bounded() -> None:
    start, end = T0 - 5.0, T0 + 295.0
    ticks = time_ticks(start, end)
    assert 2 <= len(ticks) <= 7
    assert all(start <= t <= end for t in ticks)
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert steps == {60.0}
    assert all(datetime.fromtimestamp(t).second == 0 for t in ticks)
