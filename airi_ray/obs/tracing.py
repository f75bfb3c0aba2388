"""Traces: an OpenTelemetry span for every request, graph run, node, model call, retrieval
and policy check, kept in the context store (``airi trace ID``) and exported over OTLP
when an endpoint is configured.

Each process has its own ``TracerProvider`` (not the global one: vLLM and user code may
set that). Finished spans go to a ``StoreProcessor``, which buffers them per trace and
sends a trace's spans to the context store once its root ended (a graph run in the
executor, a model call made outside any run): the traces that ended within a fifth of a
second go in one fire-and-forget call (a Ray call costs the caller more than a span).

Span attributes follow ``airi_ray/core/traces.py``: ``airi.kind`` (run, node, model_call,
retrieval, policy, http), ``airi.model``, ``airi.version``, ``airi.replica``, token counts,
``airi.run_id`` / ``airi.request_id`` (what ``airi trace`` looks traces up by) and
``airi.tenant`` (who may read the trace).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)

logger = logging.getLogger(__name__)

MAX_BUFFERED_SPANS = 10_000  # a process never holds more; beyond, everything is sent
SEND_EVERY_S = 0.2  # traces that ended meanwhile go to the store in one call

# Where finished traces go: a list of (tenant, trace id, spans); the runtime gives one that
# sends them to the context store (this layer does not know the actors).
Sink = Callable[[list[tuple[str, str, list[dict[str, Any]]]]], None]


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as the plain dict the context store keeps."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "start_ns": span.start_time or 0,
        "end_ns": span.end_time or 0,
        "status": "error" if span.status.status_code == StatusCode.ERROR else "ok",
        "attributes": dict(span.attributes or {}),
    }


class StoreProcessor(SpanProcessor):
    """Sends each trace's spans to the context store once the trace's local root ended:
    the traces that ended within ``SEND_EVERY_S`` go together in one call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._buffered = 0
        self._ready: list[tuple[str, str, list[dict[str, Any]]]] = []  # tenant, trace, spans
        self._has_ready = threading.Event()
        self._sender: threading.Thread | None = None
        self.sink: Sink | None = None  # until one is configured, traces are dropped

    def on_end(self, span: ReadableSpan) -> None:
        d = span_dict(span)
        local_root = span.parent is None or span.parent.is_remote
        with self._lock:
            self._buffer[d["trace_id"]].append(d)
            self._buffered += 1
            if self._buffered >= MAX_BUFFERED_SPANS:
                done, self._buffer, self._buffered = dict(self._buffer), defaultdict(list), 0
            elif local_root:
                spans = self._buffer.pop(d["trace_id"])
                self._buffered -= len(spans)
                done = {d["trace_id"]: spans}
            else:
                return
            self._ready.extend((_tenant(spans), t, spans) for t, spans in done.items())
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True)
                self._sender.start()
        self._has_ready.set()

    def _send_loop(self) -> None:
        while True:
            self._has_ready.wait()
            time.sleep(SEND_EVERY_S)  # let more traces end, then send them together
            self._has_ready.clear()
            self._send()

    def _send(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        if not ready:
            return
        try:
            if self.sink is None:
                raise RuntimeError("no trace sink is configured")
            self.sink(ready)
        except Exception as e:  # a trace is worth less than the request that made it
            logger.debug("%d traces not stored: %s", len(ready), e)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            self._ready.extend((_tenant(spans), t, spans) for t, spans in self._buffer.items())
            self._buffer, self._buffered = defaultdict(list), 0
        self._send()
        return True


def _tenant(spans: list[dict[str, Any]]) -> str:
    for s in spans:
        tenant = s["attributes"].get("airi.tenant")
        if tenant:
            return str(tenant)
    return ""


class Tracing:
    """This process's tracer; spans are made only while ``enabled``."""

    def __init__(self) -> None:
        self.enabled = True
        self._provider = TracerProvider()
        self._store = StoreProcessor()
        self._provider.add_span_processor(self._store)
        self._otlp: str | None = None
        self._tracer = self._provider.get_tracer("airi_ray")

    def configure(
        self, enabled: bool, otlp_endpoint: str | None = None, sink: Sink | None = None
    ) -> None:
        """Switch spans on or off; add an OTLP exporter the first time an endpoint is
        given (the spec's, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); send finished
        traces to ``sink`` from now on (None: keep the one configured before)."""
        self.enabled = enabled
        if sink is not None:
            self._store.sink = sink
        endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if enabled and endpoint and self._otlp is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint)))
            self._otlp = endpoint

    @contextmanager
    def span(
        self,
        name: str,
        kind: str,
        attributes: Mapping[str, Any] | None = None,
        child_only: bool = False,
    ) -> Iterator[Span | None]:
        """A span around the block, current inside it; None when tracing is off, or with
        ``child_only`` when no span is current (work that is traced only as a part of
        something). An exception leaving the block marks the span as an error."""
        if not self.enabled or (child_only and not trace.get_current_span().is_recording()):
            yield None
            return
        with self._tracer.start_as_current_span(
            name,
            attributes=_attributes(kind, attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as s:
            try:
                yield s
            except BaseException as e:
                s.set_status(Status(StatusCode.ERROR))
                s.set_attribute("airi.error", _error_code(e))
                raise

    @staticmethod
    @contextmanager
    def use(span: Span | None) -> Iterator[None]:
        """Make ``span`` (from ``start``) the current span inside the block."""
        if span is None:
            yield
            return
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            yield

    def start(
        self, name: str, kind: str, attributes: Mapping[str, Any] | None = None
    ) -> Span | None:
        """A span ended by the caller (``end``), child of the current one: for work that
        does not fit a ``with`` block (a streamed generation)."""
        if not self.enabled:
            return None
        return self._tracer.start_span(name, attributes=_attributes(kind, attributes))

    @staticmethod
    def remote_parent(trace_id: int) -> Span:
        """A parent from elsewhere in trace ``trace_id``: spans started under it (``use``)
        join that trace, each sent to the store as its own local root when it ends, so
        the calls of a run made by another program (a LangGraph graph) form one trace."""
        span_id = (trace_id & (2**64 - 1)) or 1
        ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
        return NonRecordingSpan(ctx)

    @staticmethod
    def end_failed(span: Span | None, e: BaseException) -> None:
        """End ``span`` as failed by ``e`` (its airi error code, else its type)."""
        Tracing.end(span, error=_error_code(e))

    @staticmethod
    def end(span: Span | None, error: str | None = None, **attributes: Any) -> None:
        if span is None:
            return
        span.set_attributes({f"airi.{k}": v for k, v in attributes.items() if v is not None})
        if error:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("airi.error", error)
        span.end()


def _attributes(kind: str, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"airi.kind": kind, **{k: v for k, v in (attributes or {}).items() if v is not None}}


def _error_code(e: BaseException) -> str:
    code = getattr(e, "code", None)
    return code if isinstance(code, str) else type(e).__name__


tracing = Tracing()
