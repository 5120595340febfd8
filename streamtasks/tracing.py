"""Trace context: W3C ``traceparent`` from a send, through the worker, to every follow-up.

A task record carries ``traceparent`` (header and message field). While a task runs, its
*run* is a span: same trace id as its record, a span id of its own, and the record's span
as parent. The run's context is the current one (a contextvar) in the task's thread or
coroutine, so a task sent from inside it joins the trace; the worker gives the run's
``traceparent`` to everything it sends for the task (retry, chain step, callbacks, chord
body), so a whole workflow is one trace.

OpenTelemetry is used only when the ``streamtasks[otel]`` extra (``opentelemetry-api``)
is installed: each run is then a real span (kind CONSUMER) whose parent is the record's
context, and the run's ``traceparent`` is that span's. Without it nothing is imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from random import getrandbits as _random_bits
from typing import Any

from streamtasks.headers import TRACEPARENT, header_text

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: Sampled: the default flags of a trace started here.
SAMPLED = "01"


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A position in a trace: the trace id, the current span id and the trace flags."""

    trace_id: str
    span_id: str
    flags: str = SAMPLED

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` text (version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """Return a new span of the same trace (a fresh span id, same flags)."""
        return TraceContext(self.trace_id, _new_span_id(), self.flags)


_current: ContextVar[TraceContext | None] = ContextVar("streamtasks_trace", default=None)


def _new_span_id() -> str:
    # Ids must be unique, not secret: the process's PRNG (as OpenTelemetry's SDK does)
    # costs no system call per task, unlike the secrets module.
    span = f"{_random_bits(64):016x}"
    return span if span != _ZERO_SPAN else _new_span_id()


def new_trace() -> TraceContext:
    """Return the root span of a new trace (sampled)."""
    trace = f"{_random_bits(128):032x}"
    if trace == _ZERO_TRACE:  # pragma: no cover - one in 2**128
        return new_trace()
    return TraceContext(trace, _new_span_id())


def parse(text: str | None) -> TraceContext | None:
    """Parse a W3C ``traceparent``; None when absent or invalid (then a new trace starts).

    Versions other than 00 are read by their first four fields, as the spec asks;
    version ``ff`` and all-zero ids are invalid.
    """
    if not text:
        return None
    match = _TRACEPARENT.match(text.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags)


def current() -> TraceContext | None:
    """Return the trace context of the running task (or code in :func:`activated`)."""
    return _current.get()


def traceparent_for_send() -> str:
    """Return the ``traceparent`` of a task sent now.

    Inside a running task: its run's span, so the new task joins the task's trace.
    Elsewhere: the root span of a new trace.
    """
    ctx = _current.get()
    if ctx is not None:
        return ctx.traceparent
    # A new trace's root, formatted at once (a TraceContext costs more than the text).
    trace, span = _random_bits(128), _random_bits(64)
    if trace and span:
        return f"00-{trace:032x}-{span:016x}-{SAMPLED}"
    return new_trace().traceparent  # pragma: no cover - an all-zero id: one in 2**64


def record_traceparent(headers: Mapping[str, bytes], fallback: str | None) -> str | None:
    """Return a record's ``traceparent``: its header, else ``fallback`` (the message's)."""
    return header_text(headers, TRACEPARENT) or fallback


@contextlib.contextmanager
def activated(ctx: TraceContext) -> Iterator[TraceContext]:
    """Make ``ctx`` the current trace context within the block (this thread / task)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def enter_run(traceparent: str | None) -> tuple[TraceContext, Token[TraceContext | None]] | None:
    """Begin a run's span without a context manager (the worker's hot path).

    Returns the run's context (a child of ``traceparent``'s, else a new trace's root),
    current until :func:`exit_run` is given the token; None when OpenTelemetry makes
    the spans: nothing was begun, and the caller uses :func:`task_run` instead.
    """
    otel = _otel_trace()
    if otel is not None and _otel_configured(otel):
        return None
    parent = parse(traceparent)
    run = parent.child() if parent is not None else new_trace()
    return run, _current.set(run)


def exit_run(token: Token[TraceContext | None]) -> None:
    """End the span :func:`enter_run` began."""
    _current.reset(token)


@contextlib.contextmanager
def task_run(
    name: str, traceparent: str | None, attributes: Mapping[str, object] | None = None
) -> Iterator[TraceContext]:
    """Trace one run of a task: the current context within the block is the run's span.

    Args:
        name: the task name (the OpenTelemetry span name).
        traceparent: the record's ``traceparent`` (its sender's span), or None.
        attributes: span attributes (OpenTelemetry only), each named
            ``streamtasks.<key>``.

    Yields:
        The run's trace context: a child of the record's, or a new trace's root.
    """
    begun = enter_run(traceparent)
    if begun is not None:
        run, token = begun
        try:
            yield run
        finally:
            exit_run(token)
        return
    otel, parent = _otel_trace(), parse(traceparent)
    attrs = {f"streamtasks.{k}": v for k, v in (attributes or {}).items()}
    with _otel_span(otel, name, parent, attrs) as ctx, activated(ctx):
        yield ctx


# -- OpenTelemetry (optional) -------------------------------------------------------------

_otel_module: list[Any] = []  # [module or None] once looked up


def _otel_trace() -> Any:
    """Return ``opentelemetry.trace`` when installed, else None (imported on first use)."""
    if not _otel_module:
        try:
            from opentelemetry import trace
        except ImportError:
            _otel_module.append(None)
        else:
            _otel_module.append(trace)
    return _otel_module[0]


def _otel_configured(otel: Any) -> bool:
    """Whether an application set a tracer provider (an SDK).

    Without one a span records nothing, yet cost about 8% of a worker's loop (py-spy);
    our own ids carry the trace the same.
    """
    # opentelemetry-api keeps a provider set by the application in this global; asking
    # get_tracer_provider() when none is set also looks up os.environ (about 2% of a
    # draining worker's samples, once per task), so the environment is read once here.
    if getattr(otel, "_TRACER_PROVIDER", False) is None and not _provider_in_environment():
        return False
    name = type(otel.get_tracer_provider()).__name__
    return name not in ("ProxyTracerProvider", "NoOpTracerProvider")


@functools.cache
def _provider_in_environment() -> bool:
    """Whether ``OTEL_PYTHON_TRACER_PROVIDER`` names a provider (read once)."""
    return bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))


def otel_available() -> bool:
    """True when OpenTelemetry spans are made (``pip install streamtasks[otel]``)."""
    return _otel_trace() is not None


@contextlib.contextmanager
def _otel_span(
    otel: Any, name: str, parent: TraceContext | None, attributes: Mapping[str, object]
) -> Iterator[TraceContext]:
    parent_ctx = None
    if parent is not None:
        remote = otel.SpanContext(
            trace_id=int(parent.trace_id, 16), span_id=int(parent.span_id, 16),
            is_remote=True, trace_flags=otel.TraceFlags(int(parent.flags, 16)),
        )
        parent_ctx = otel.set_span_in_context(otel.NonRecordingSpan(remote))
    tracer = otel.get_tracer("streamtasks")
    attrs = {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)}
    with tracer.start_as_current_span(
        name, context=parent_ctx, kind=otel.SpanKind.CONSUMER, attributes=attrs,
    ) as span:
        sc = span.get_span_context()
        run = TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}",
                           f"{int(sc.trace_flags):02x}")
        if sc.is_valid and (parent is None or run.span_id != parent.span_id):
            yield run
        else:  # the API without an SDK (no span, or the parent's): keep the trace ourselves
            yield parent.child() if parent is not None else new_trace()
