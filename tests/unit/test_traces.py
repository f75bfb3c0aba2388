"""Span trees: building, validation, self time and coverage with fan-out, rendering."""

from __future__ import annotations

from typing import Any

import pytest

from airi_ray.core.traces import (
    SpanNode,
    build_tree,
    check_spans,
    render_tree,
    self_time_ms,
    summarize,
    time_outside,
)

T1 = "a" * 32
T2 = "b" * 32
MS = 1_000_000


def span(
    span_id: str,
    parent_id: str | None,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    trace_id: str = T1,
    status: str = "ok",
    **attrs: Any,
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent_id,
        "name": name,
        "start_ns": int(start_ms * MS),
        "end_ns": int(end_ms * MS),
        "status": status,
        "attributes": {f"airi.{k}": v for k, v in attrs.items()},
    }


def fan_out() -> list[dict[str, Any]]:
    """A run of 1000 ms: intent, then retrieval fanned out over two overlapping searches,
    then an answer with two overlapping model calls, one of which fails.

    Given out of order, so sorting is exercised.
    """
    return [
        span("ans", "root", "node answer", 300, 950, kind="node", node="answer"),
        span(
            "q1",
            "ans",
            "model_call",
            310,
            900,
            kind="model_call",
            model="qwen",
            version="2",
            replica="qwen-2-abc",
            prompt_tokens=100,
            completion_tokens=48,
            queue_ms=3.0,
            ttft_ms=40.2,
        ),
        span(
            "q2",
            "ans",
            "model_call",
            500,
            920,
            status="error",
            kind="model_call",
            model="qwen",
            version="2",
            prompt_tokens=8,
            error="timeout",
        ),
        span("root", None, "run support_assistant", 0, 1000, kind="run", run_id="run-abc"),
        span("intent", "root", "node intent", 0, 100, kind="node"),
        span(
            "emb",
            "intent",
            "model_call minilm@1",
            10,
            60,
            kind="model_call",
            model="minilm",
            version="1",
            prompt_tokens=12,
            queue_ms=0.2,
        ),
        span("ret", "root", "node retrieve", 100, 300, kind="node"),
        span("ra", "ret", "retrieval kb_a", 120, 250, kind="retrieval"),
        span("rb", "ret", "retrieval kb_b", 150, 280, kind="retrieval"),
    ]


def by_id(roots: list[SpanNode]) -> dict[str, SpanNode]:
    return {n.span_id: n for r in roots for n in r.walk()}


def test_build_tree_structure_and_order() -> None:
    roots = build_tree(fan_out())
    assert [r.span_id for r in roots] == ["root"]
    root = roots[0]
    assert [c.name for c in root.children] == ["node intent", "node retrieve", "node answer"]
    nodes = by_id(roots)
    assert [c.span_id for c in nodes["ans"].children] == ["q1", "q2"]
    assert [c.span_id for c in nodes["ret"].children] == ["ra", "rb"]
    assert root.duration_ms == pytest.approx(1000.0)
    assert nodes["q1"].attributes["airi.model"] == "qwen"
    assert nodes["q2"].is_error and not nodes["q1"].is_error
    assert [n.span_id for n in root.walk()] == [
        "root", "intent", "emb", "ret", "ra", "rb", "ans", "q1", "q2",
    ]  # fmt: skip


def test_self_time_uses_the_union_of_overlapping_children() -> None:
    nodes = by_id(build_tree(fan_out()))
    # retrieve: 200 ms, children cover 120..280 = 160 ms (not 130 + 130 = 260).
    assert self_time_ms(nodes["ret"]) == pytest.approx(40.0)
    # answer: 650 ms, children cover 310..920 = 610 ms.
    assert self_time_ms(nodes["ans"]) == pytest.approx(40.0)
    assert self_time_ms(nodes["root"]) == pytest.approx(50.0)
    assert self_time_ms(nodes["q1"]) == pytest.approx(590.0)  # a leaf: all its own


def test_self_time_clips_children_to_the_parent() -> None:
    """A child reported outside its parent (clock skew) only covers the overlap."""
    spans = [
        span("p", None, "node p", 100, 200),
        span("c1", "p", "child", 50, 120),  # starts before the parent
        span("c2", "p", "child", 180, 400),  # ends after it
    ]
    (p,) = build_tree(spans)
    assert self_time_ms(p) == pytest.approx(60.0)
    whole = [span("p", None, "node p", 100, 200), span("c", "p", "child", 0, 500)]
    assert self_time_ms(build_tree(whole)[0]) == 0.0


def test_time_outside_model_calls_and_retrievals() -> None:
    total, outside = time_outside(fan_out())
    # covered: 10..60, 120..280, 310..920 -> 50 + 160 + 610 = 820 ms of 1000.
    assert total == pytest.approx(1000.0)
    assert outside == pytest.approx(180.0)
    total, outside = time_outside(fan_out(), kinds=("retrieval",))
    assert outside == pytest.approx(840.0)
    assert time_outside(fan_out(), kinds=()) == pytest.approx((1000.0, 1000.0))
    assert time_outside([]) == (0.0, 0.0)


def test_remote_parent_roots() -> None:
    spans = [
        # The caller's HTTP span "remote" was not stored: both become roots.
        span("x", "remote", "node x", 0, 100, trace_id=T2, kind="node"),
        span("y", "remote", "node y", 50, 200, trace_id=T2, kind="node"),
        span("m", "y", "model_call", 60, 190, trace_id=T2, kind="model_call"),
        # Parents are looked up within the trace: "root" of T1 is not its parent.
        span("z", "root", "node z", 10, 20, trace_id=T2, kind="node"),
        *fan_out(),
    ]
    roots = build_tree(spans)
    # Roots by start time (then end time), whatever their trace.
    assert [(r.trace_id, r.span_id) for r in roots] == [
        (T2, "x"),
        (T1, "root"),
        (T2, "z"),
        (T2, "y"),
    ]
    assert [c.span_id for c in roots[3].children] == ["m"]
    # T2's root time is the union 0..200, not 100 + 10 + 150.
    total, outside = time_outside(spans)
    assert total == pytest.approx(1000.0 + 200.0)
    assert outside == pytest.approx(180.0 + 70.0)
    s = summarize(spans)
    assert s["traces"] == 2 and s["spans"] == 9 + 4
    assert s["duration_ms"] == pytest.approx(1200.0)


def test_duplicates_are_kept_once() -> None:
    spans = fan_out()
    twice = spans + [dict(s) for s in spans[:4]]
    roots = build_tree(twice)
    assert sum(1 for r in roots for _ in r.walk()) == len(spans)
    assert [c.span_id for c in by_id(roots)["ans"].children] == ["q1", "q2"]
    assert summarize(twice)["spans"] == len(spans)
    assert render_tree(twice) == render_tree(spans)


def test_cycles_are_refused() -> None:
    spans = [span("a", "b", "a", 0, 1), span("b", "a", "b", 0, 1), span("c", None, "c", 0, 1)]
    with pytest.raises(ValueError, match="cycle among spans a, b"):
        build_tree(spans)
    with pytest.raises(ValueError, match="names itself as its parent"):
        build_tree([span("a", "a", "a", 0, 1)])


def test_summarize() -> None:
    s = summarize(fan_out())
    assert s["traces"] == 1 and s["spans"] == 9
    assert s["duration_ms"] == pytest.approx(1000.0)
    assert s["by_kind"] == {
        "model_call": {"count": 3, "total_ms": pytest.approx(590.0 + 420.0 + 50.0)},
        "node": {"count": 3, "total_ms": pytest.approx(100.0 + 200.0 + 650.0)},
        "retrieval": {"count": 2, "total_ms": pytest.approx(260.0)},
        "run": {"count": 1, "total_ms": pytest.approx(1000.0)},
    }
    assert s["tokens"] == {"prompt": 120, "completion": 48}
    assert s["models"] == ["minilm@1", "qwen@2"]
    assert s["errors"] == 1
    bare = summarize([{"trace_id": T1, "span_id": "s", "name": "x", "start_ns": 0, "end_ns": 5}])
    assert bare["by_kind"] == {"other": {"count": 1, "total_ms": pytest.approx(5e-6)}}
    assert summarize([])["traces"] == 0


def test_render_tree() -> None:
    out = render_tree(fan_out())
    lines = out.splitlines()
    assert len(lines) == 9
    assert lines[0].startswith("run support_assistant")
    assert "1000.0 ms" in lines[0]
    assert "[run_id=run-abc tokens in=120 out=48]" in lines[0]
    assert lines[1].startswith("├─ node intent")
    assert lines[2].startswith("│  └─ model_call minilm@1")  # name already says the model
    assert "(+10.0 ms)" in lines[2] and "queue 0.2 ms" in lines[2] and "in 12 tok" in lines[2]
    assert lines[6].startswith("└─ node answer") and "(+300.0 ms)" in lines[6]
    q1 = lines[7]
    assert q1.startswith("   ├─ model_call qwen@2")
    for part in (
        "590.0 ms",
        "(+310.0 ms)",
        "queue 3.0 ms ttft 40.2 ms",
        "in 100 tok out 48 tok",
        "replica qwen-2-abc",
    ):
        assert part in q1
    assert lines[8].startswith("   └─ model_call qwen@2") and "ERROR: timeout" in lines[8]
    # Durations line up in one column.
    assert len({line.index(" ms") for line in lines}) == 1
    assert "\x1b[" not in out


def test_render_tree_color_and_edge_cases() -> None:
    colored = render_tree(fan_out(), color=True)
    assert "\x1b[31mERROR: timeout\x1b[0m" in colored
    assert "\x1b[1mrun support_assistant\x1b[0m" in colored
    assert render_tree([]) == ""
    failed = [span("r", None, "run x", 0, 5, status="error", kind="run")]
    assert "ERROR" in render_tree(failed) and "tokens in=0 out=0" in render_tree(failed)
    # A lone model call is a root: its own tokens are its tree's totals.
    lone = [span("m", "gone", "model_call", 0, 5, kind="model_call", prompt_tokens=7)]
    assert "tokens in=7 out=0" in render_tree(lone)


def test_check_spans_returns_the_spans() -> None:
    spans = fan_out()
    assert check_spans(spans) == spans
    minimal = {"trace_id": T1, "span_id": "s", "name": "x", "start_ns": 0, "end_ns": 0}
    assert check_spans([minimal]) == [minimal]  # parent_id, status, attributes optional


def _bad(**changes: Any) -> dict[str, Any]:
    s = span("s1", None, "x", 0, 1)
    for k, v in changes.items():
        if v is _DROP:
            del s[k]
        else:
            s[k] = v
    return s


_DROP = object()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            _bad(end_ns=_DROP, name=_DROP),
            r"span #1 \(span_id='s1'\) is missing required keys: name, end_ns",
        ),
        (_bad(span_id=_DROP), r"span #1 is missing required keys: span_id"),
        (_bad(trace_id=""), "trace_id must be a non-empty string"),
        (_bad(span_id=7), "span_id must be a non-empty string"),
        (_bad(parent_id=""), "parent_id must be a non-empty string or None"),
        (_bad(name=None), "name must be a string"),
        (_bad(start_ns=1.5), r"start_ns must be an integer \(nanoseconds\)"),
        (_bad(end_ns=True), "end_ns must be an integer"),
        (_bad(start_ns=10, end_ns=5), "ends before it starts: start_ns=10, end_ns=5"),
        (_bad(status="failed"), "status must be one of ok, error, unset; got 'failed'"),
        (_bad(attributes=[("a", 1)]), "attributes must be a dict or absent, got list"),
    ],
)
def test_validation_errors(bad: dict[str, Any], message: str) -> None:
    good = span("s0", None, "ok", 0, 1)
    with pytest.raises(ValueError, match=message):
        check_spans([good, bad])
    with pytest.raises(ValueError, match=message):
        build_tree([good, bad])


def test_validation_of_non_mappings() -> None:
    with pytest.raises(ValueError, match="span #0 must be a dict, got str"):
        check_spans(["not a span"])  # type: ignore[list-item]
