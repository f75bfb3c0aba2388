"""Span trees of a run, for ``airi trace RUN_ID`` and the overhead benchmark.

Spans arrive as plain dicts, exported from OpenTelemetry by the tracing module::

    {"trace_id": "32 hex", "span_id": "16 hex", "parent_id": "16 hex" or None,
     "name": "node answer", "start_ns": int, "end_ns": int, "status": "ok" | "error",
     "attributes": {str: str | int | float | bool}}

``trace_id``, ``span_id``, ``name``, ``start_ns`` and ``end_ns`` are required;
``parent_id`` (None), ``status`` (``"ok"``) and ``attributes`` ({}) may be left out.
The attributes read here are ``airi.kind`` (``SPAN_KINDS``), ``airi.model``,
``airi.version``, ``airi.replica``, ``airi.tenant``, ``airi.run_id``,
``airi.request_id``, ``airi.prompt_tokens``, ``airi.completion_tokens``,
``airi.queue_ms``, ``airi.ttft_ms`` and ``airi.error``.

A span's parent is looked up within its own trace. A span whose parent is None, or is
not among the spans given (a remote parent, such as the caller's HTTP span, that was not
stored), is a root. Children and roots are ordered by start time. A span exported twice
(same trace and span id) is kept once, first copy wins.

Durations in the output are milliseconds; the spans' own times stay in nanoseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airi_ray.core.registry import version_key

REQUIRED_KEYS: tuple[str, ...] = ("trace_id", "span_id", "name", "start_ns", "end_ns")
SPAN_KINDS: tuple[str, ...] = ("run", "node", "model_call", "retrieval", "policy", "http")
# "unset" is OpenTelemetry's status of a span nobody marked: it reads as ok.
SPAN_STATUSES: tuple[str, ...] = ("ok", "error", "unset")

_NS_PER_MS = 1_000_000

Span = dict[str, Any]
Interval = tuple[int, int]


@dataclass(eq=False)
class SpanNode:
    """A span and its child spans (ordered by start time)."""

    span: Span
    children: list[SpanNode] = field(default_factory=list)

    @property
    def start_ns(self) -> int:
        start: int = self.span["start_ns"]
        return start

    @property
    def end_ns(self) -> int:
        end: int = self.span["end_ns"]
        return end

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / _NS_PER_MS

    @property
    def name(self) -> str:
        return str(self.span["name"])

    @property
    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = self.span.get("attributes") or {}
        return attrs

    @property
    def trace_id(self) -> str:
        return str(self.span["trace_id"])

    @property
    def span_id(self) -> str:
        return str(self.span["span_id"])

    @property
    def kind(self) -> str | None:
        """``airi.kind``, None when the span has none."""
        kind = self.attributes.get("airi.kind")
        return str(kind) if kind is not None else None

    @property
    def is_error(self) -> bool:
        """Status ``"error"``, or an ``airi.error`` attribute."""
        return self.span.get("status") == "error" or "airi.error" in self.attributes

    def walk(self) -> Iterator[SpanNode]:
        """This node and all its descendants, depth first, children in order."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


def _describe(i: int, span: Mapping[str, Any]) -> str:
    sid = span.get("span_id")
    return f"span #{i} (span_id={sid!r})" if sid is not None else f"span #{i}"


def check_spans(spans: Iterable[Mapping[str, Any]]) -> list[Span]:
    """Validate spans (see the module docstring for their shape) and return them as a list.

    Raises:
        ValueError: a span is not a mapping, misses a required key, has an empty or
            non-string id, non-integer times, ends before it starts, an unknown status
            or attributes that are not a mapping. The message names the span (its index
            in the input and its span_id) and what was wrong.
    """
    out: list[Span] = []
    for i, span in enumerate(spans):
        if not isinstance(span, Mapping):
            raise ValueError(f"span #{i} must be a dict, got {type(span).__name__}")
        what = _describe(i, span)
        missing = [k for k in REQUIRED_KEYS if k not in span]
        if missing:
            raise ValueError(
                f"{what} is missing required keys: {', '.join(missing)} "
                f"(a span needs {', '.join(REQUIRED_KEYS)})"
            )
        for key in ("trace_id", "span_id"):
            if not isinstance(span[key], str) or not span[key]:
                raise ValueError(f"{what}: {key} must be a non-empty string, got {span[key]!r}")
        parent = span.get("parent_id")
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise ValueError(
                f"{what}: parent_id must be a non-empty string or None, got {parent!r}"
            )
        if parent == span["span_id"]:
            raise ValueError(f"{what} names itself as its parent")
        if not isinstance(span["name"], str):
            raise ValueError(f"{what}: name must be a string, got {span['name']!r}")
        for key in ("start_ns", "end_ns"):
            v = span[key]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{what}: {key} must be an integer (nanoseconds), got {v!r}")
        if span["end_ns"] < span["start_ns"]:
            raise ValueError(
                f"{what} ends before it starts: start_ns={span['start_ns']}, "
                f"end_ns={span['end_ns']}"
            )
        status = span.get("status", "ok")
        if status not in SPAN_STATUSES:
            raise ValueError(
                f"{what}: status must be one of {', '.join(SPAN_STATUSES)}; got {status!r}"
            )
        attrs = span.get("attributes")
        if attrs is not None and not isinstance(attrs, Mapping):
            raise ValueError(
                f"{what}: attributes must be a dict or absent, got {type(attrs).__name__}"
            )
        out.append(span if isinstance(span, dict) else dict(span))
    return out


def _order(node: SpanNode) -> tuple[int, int, str, str]:
    return (node.start_ns, node.end_ns, node.trace_id, node.span_id)


def build_tree(spans: Iterable[Mapping[str, Any]]) -> list[SpanNode]:
    """The spans as trees: the roots, each holding its descendants.

    Roots are the spans whose parent is None or not among ``spans``; children and roots
    are sorted by start time (then end time and ids, so the order is deterministic).
    Duplicates (same trace_id and span_id) are kept once, first copy wins.

    Raises:
        ValueError: a span is malformed (see ``check_spans``), or parent links form a
            cycle.
    """
    nodes: dict[tuple[str, str], SpanNode] = {}
    for span in check_spans(spans):
        nodes.setdefault((span["trace_id"], span["span_id"]), SpanNode(span))
    roots: list[SpanNode] = []
    for (trace, _), node in nodes.items():
        parent_id = node.span.get("parent_id")
        parent = nodes.get((trace, parent_id)) if parent_id is not None else None
        if parent is None:
            roots.append(node)
        else:
            parent.children.append(node)
    for node in nodes.values():
        node.children.sort(key=_order)
    roots.sort(key=_order)
    reached = sum(1 for root in roots for _ in root.walk())
    if reached < len(nodes):
        seen = {id(n) for root in roots for n in root.walk()}
        stuck = sorted(n.span_id for n in nodes.values() if id(n) not in seen)
        raise ValueError(f"parent links form a cycle among spans {', '.join(stuck)}")
    return roots


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points as ``intervals``."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _length(intervals: Iterable[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def _intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The intersection of two sorted, disjoint interval lists."""
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def self_time_ms(node: SpanNode) -> float:
    """Time of ``node`` not spent in any of its children, in ms.

    The node's duration minus the union of its children's intervals (children may
    overlap when a node fans out, so their durations are not simply subtracted), each
    clipped to the node's own interval (clocks of different hosts may disagree); never
    below 0.
    """
    own = [(node.start_ns, node.end_ns)]
    covered = _intersect(own, _union((c.start_ns, c.end_ns) for c in node.children))
    return max(0, node.end_ns - node.start_ns - _length(covered)) / _NS_PER_MS


def _root_time(roots: Sequence[SpanNode]) -> dict[str, list[Interval]]:
    """Per trace, the union of its roots' intervals."""
    by_trace: dict[str, list[Interval]] = {}
    for root in roots:
        by_trace.setdefault(root.trace_id, []).append((root.start_ns, root.end_ns))
    return {trace: _union(iv) for trace, iv in by_trace.items()}


def time_outside(
    spans: Iterable[Mapping[str, Any]], kinds: Sequence[str] = ("model_call", "retrieval")
) -> tuple[float, float]:
    """Root time, and the part of it not covered by any span of ``kinds``, in ms.

    Per trace, the root time is the union of its roots' intervals (one root in the usual
    case; several when the common parent was remote and not stored, which may overlap).
    The covered time is the union of the intervals of its spans whose ``airi.kind`` is in
    ``kinds``, clipped to the root time. Both are summed over traces. The benchmark's
    overhead share is ``outside / total``.

    Returns:
        ``(total_ms, outside_ms)``; ``(0.0, 0.0)`` for no spans.

    Raises:
        ValueError: a span is malformed (see ``build_tree``).
    """
    roots = build_tree(spans)
    wanted = set(kinds)
    covered: dict[str, list[Interval]] = {}
    for root in roots:
        for node in root.walk():
            if node.kind in wanted:
                covered.setdefault(node.trace_id, []).append((node.start_ns, node.end_ns))
    total = outside = 0
    for trace, root_iv in _root_time(roots).items():
        length = _length(root_iv)
        inside = _length(_intersect(root_iv, _union(covered.get(trace, []))))
        total += length
        outside += length - inside
    return total / _NS_PER_MS, outside / _NS_PER_MS


def _num(attrs: Mapping[str, Any], key: str) -> float | None:
    """A numeric attribute (a number, or a string holding one); None if absent or not."""
    v = attrs.get(key)
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(str(v))
    except ValueError:
        return None


def _tokens(nodes: Iterable[SpanNode]) -> tuple[int, int]:
    """Prompt and completion tokens summed over the model_call spans among ``nodes``."""
    prompt = completion = 0
    for node in nodes:
        if node.kind == "model_call":
            prompt += int(_num(node.attributes, "airi.prompt_tokens") or 0)
            completion += int(_num(node.attributes, "airi.completion_tokens") or 0)
    return prompt, completion


def _model_label(attrs: Mapping[str, Any]) -> str | None:
    model = attrs.get("airi.model")
    if model is None:
        return None
    version = attrs.get("airi.version")
    return version_key(str(model), str(version)) if version is not None else str(model)


def summarize(spans: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over a set of spans.

    Returns:
        ``{"traces": distinct trace ids, "spans": spans (duplicates once),
        "duration_ms": root time (per trace the union of its roots' intervals, summed),
        "by_kind": {kind: {"count": n, "total_ms": summed durations}} (spans without
        ``airi.kind`` under ``"other"``; sorted by kind), "tokens": {"prompt": n,
        "completion": n} over model_call spans, "models": sorted ``"model@version"`` of
        every span with ``airi.model``, "errors": spans in error}``.

    Raises:
        ValueError: a span is malformed (see ``build_tree``).
    """
    roots = build_tree(spans)
    nodes = [n for root in roots for n in root.walk()]
    by_kind: dict[str, dict[str, Any]] = {}
    models: set[str] = set()
    for node in nodes:
        entry = by_kind.setdefault(node.kind or "other", {"count": 0, "total_ms": 0.0})
        entry["count"] += 1
        entry["total_ms"] += node.duration_ms
        label = _model_label(node.attributes)
        if label is not None:
            models.add(label)
    prompt, completion = _tokens(nodes)
    return {
        "traces": len({n.trace_id for n in nodes}),
        "spans": len(nodes),
        "duration_ms": sum(_length(iv) for iv in _root_time(roots).values()) / _NS_PER_MS,
        "by_kind": dict(sorted(by_kind.items())),
        "tokens": {"prompt": prompt, "completion": completion},
        "models": sorted(models),
        "errors": sum(1 for n in nodes if n.is_error),
    }


_BOLD, _DIM, _RED = "1", "2", "31"


def _paint(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color and text else text


def _ms(v: float) -> str:
    return f"{v:.1f} ms"


def _label(node: SpanNode) -> str:
    """The span name, followed by model@version when the name does not already say it."""
    model = _model_label(node.attributes)
    if model is not None and model not in node.name:
        return f"{node.name} {model}"
    return node.name


def _details(node: SpanNode, *, root: bool, color: bool) -> list[str]:
    """The groups printed after a span's duration and offset."""
    attrs = node.attributes
    groups: list[str] = []
    if root:
        tags = [
            f"{name}={attrs[key]}"
            for key, name in (
                ("airi.run_id", "run_id"),
                ("airi.request_id", "request_id"),
                ("airi.tenant", "tenant"),
            )
            if key in attrs
        ]
        prompt, completion = _tokens(node.walk())
        tags.append(f"tokens in={prompt} out={completion}")
        groups.append(f"[{' '.join(tags)}]")
    timing = [
        f"{name} {_ms(v)}"
        for key, name in (("airi.queue_ms", "queue"), ("airi.ttft_ms", "ttft"))
        if (v := _num(attrs, key)) is not None
    ]
    if timing:
        groups.append(" ".join(timing))
    if not root:  # a root shows the totals of its tree instead
        toks = [
            f"{name} {int(v)} tok"
            for key, name in (("airi.prompt_tokens", "in"), ("airi.completion_tokens", "out"))
            if (v := _num(attrs, key)) is not None
        ]
        if toks:
            groups.append(" ".join(toks))
    if "airi.replica" in attrs:
        groups.append(f"replica {attrs['airi.replica']}")
    if node.is_error:
        error = attrs.get("airi.error")
        groups.append(_paint(f"ERROR: {error}" if error is not None else "ERROR", _RED, color))
    return groups


def _render_root(root: SpanNode, color: bool) -> list[str]:
    # (glyphs, label, duration_ms, offset_ms or None for the root, detail groups)
    rows: list[tuple[str, str, float, float | None, list[str]]] = []
    stack: list[tuple[SpanNode, str, str]] = [(root, "", "")]  # node, its glyphs, children's
    while stack:
        node, glyphs, indent = stack.pop()
        is_root = node is root
        offset = None if is_root else (node.start_ns - root.start_ns) / _NS_PER_MS
        rows.append(
            (
                glyphs,
                _label(node),
                node.duration_ms,
                offset,
                _details(node, root=is_root, color=color),
            )
        )
        last = len(node.children) - 1
        for i in range(last, -1, -1):
            branch, extend = ("└─ ", "   ") if i == last else ("├─ ", "│  ")
            stack.append((node.children[i], indent + branch, indent + extend))
    width = max(len(g) + len(lab) for g, lab, _, _, _ in rows)
    dur_width = max(len(_ms(d)) for _, _, d, _, _ in rows)
    lines = []
    for glyphs, label, duration, offset, groups in rows:
        pad = " " * (width - len(glyphs) - len(label))
        name = _paint(label, _BOLD, color) if offset is None else label
        parts = [f"{_paint(glyphs, _DIM, color)}{name}{pad}  {_ms(duration).rjust(dur_width)}"]
        if offset is not None:
            parts.append(_paint(f"({offset:+.1f} ms)", _DIM, color))
        parts.extend(groups)
        lines.append("  ".join(parts))
    return lines


def render_tree(spans: Iterable[Mapping[str, Any]], *, color: bool = False) -> str:
    """The spans as an indented text tree, one line per span, e.g.::

        run support_assistant      1000.0 ms  [run_id=run-abc tokens in=112 out=48]
        ├─ node intent              100.0 ms  (+0.0 ms)
        │  └─ model_call minilm@1    50.0 ms  (+10.0 ms)  queue 0.2 ms  in 12 tok
        └─ node answer              650.0 ms  (+300.0 ms)
           ├─ model_call qwen@2     590.0 ms  (+310.0 ms)  queue 3.0 ms ttft 40.2 ms  in 100 tok out 48 tok  replica qwen-2-abc
           └─ model_call qwen@2     420.0 ms  (+500.0 ms)  ERROR: timeout

    Each line: the span's name (followed by ``model@version`` when it carries
    ``airi.model`` and the name does not already say it), its duration, and below the
    root its start offset from the root's start. Then, when present: queue and time to
    first token, prompt (``in``) and completion (``out``) tokens, the replica, and
    ``ERROR: <airi.error>`` for a span in error. A root shows its run id, request id and
    tenant, and the prompt and completion tokens summed over the model_call spans of its
    tree. Several roots give several trees, one after the other; no spans give "".

    Args:
        color: ANSI colours for a terminal (root name bold, tree and offsets dim, errors
            red).

    Raises:
        ValueError: a span is malformed (see ``build_tree``).
    """
    lines = [line for root in build_tree(spans) for line in _render_root(root, color)]
    return "\n".join(lines)
