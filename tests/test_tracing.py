"""Trace context: ``traceparent`` from a send through the worker to every follow-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streamtasks import App, chain, chord, tracing
from streamtasks.headers import TRACEPARENT, header_text
from streamtasks.tracing import TraceContext, parse


@pytest.fixture(params=["plain", "otel"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test runs without OpenTelemetry and with it (an SDK recording spans)."""
    if request.param == "plain":
        monkeypatch.setattr(tracing, "_otel_module", [None])
    else:
        monkeypatch.setattr(tracing, "_otel_module", [_otel_sdk_trace()])
    yield request.param


_exporter: list[object] = []


def _otel_sdk_trace() -> object:
    """``opentelemetry.trace`` with an SDK provider recording to memory (set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not _exporter:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _exporter.append(exporter)
    return trace


def _headers_trace(app: App, topic: str) -> list[TraceContext]:
    records = app.broker.records(topic)  # type: ignore[attr-defined]
    found = [parse(header_text(r.headers, TRACEPARENT)) for r in records]
    assert all(ctx is not None for ctx in found), "a record without a valid traceparent"
    return [ctx for ctx in found if ctx is not None]


def test_parse_accepts_w3c_and_refuses_malformed() -> None:
    ctx = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert ctx == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert ctx.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    # a later version may add fields; version 00 may not
    assert parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra") is not None
    for bad in ("", None, "garbage", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"):
        assert parse(bad) is None, bad


def test_a_child_keeps_the_trace_and_gets_a_new_span() -> None:
    root = tracing.new_trace()
    child = root.child()
    assert child.trace_id == root.trace_id and child.span_id != root.span_id
    assert parse(child.traceparent) == child


def test_a_send_outside_a_task_starts_a_new_trace(app: App, mode: str) -> None:
    app.send("anything", queue="q1")
    app.send("anything", queue="q1")
    first, second = _headers_trace(app, app.settings.topic("q1"))
    assert first.trace_id != second.trace_id


def test_a_send_outside_a_task_gets_a_valid_sampled_root_span() -> None:
    texts = {tracing.traceparent_for_send() for _ in range(1_000)}

    assert len(texts) == 1_000
    for text in texts:
        ctx = parse(text)
        assert ctx is not None and ctx.traceparent == text and ctx.flags == tracing.SAMPLED


def test_a_workflow_sent_at_once_is_one_trace(app: App, mode: str) -> None:
    @app.task(name="noop")
    def noop(*args: object) -> None:
        return None

    chord([noop.s(i) for i in range(3)], noop.s()).apply_async()
    traces = {ctx.trace_id for ctx in _headers_trace(app, app.settings.topic("default"))}
    assert len(traces) == 1


def test_a_task_sent_from_a_task_joins_its_trace(app: App, mode: str) -> None:
    seen: dict[str, TraceContext | None] = {}

    @app.task(name="child")
    def child() -> None:
        seen["child"] = tracing.current()

    @app.task(name="parent")
    def parent() -> None:
        seen["parent"] = tracing.current()
        child.delay()

    parent.delay()
    app.drain()
    parent_run, child_run = seen["parent"], seen["child"]
    assert parent_run is not None and child_run is not None
    assert child_run.trace_id == parent_run.trace_id
    assert child_run.span_id != parent_run.span_id
    # the child's record names the parent's run as its parent span
    records = _headers_trace(app, app.settings.topic("default"))
    assert TraceContext(parent_run.trace_id, parent_run.span_id) in records
    assert tracing.current() is None  # nothing leaks out of the runs


def test_every_follow_up_carries_the_trace_with_its_parents_run_as_parent(
    app: App, mode: str
) -> None:
    # Given a workflow with a chain, a retried step, callbacks and a chord
    runs: list[tuple[str, TraceContext | None]] = []
    attempts: list[int] = []

    @app.task(name="step", max_retries=2, backoff="fixed", backoff_s=0.01)
    def step(*args: object) -> int:
        runs.append(("step", tracing.current()))
        return 1

    @app.task(name="flaky", max_retries=2, backoff="fixed", backoff_s=0.01)
    def flaky(*args: object) -> int:
        runs.append(("flaky", tracing.current()))
        attempts.append(1)
        if len(attempts) < 2:
            raise RuntimeError("not yet")
        return 2

    @app.task(name="boom")
    def boom(*args: object) -> None:
        runs.append(("boom", tracing.current()))
        raise ValueError("no")

    @app.task(name="callback")
    def callback(*args: object) -> None:
        runs.append(("callback", tracing.current()))

    workflow = chain(
        step.s(),
        flaky.s().on_success(callback.s()),
        chord([step.s(), step.s()], step.s()),
        boom.s().on_error(callback.si()),
    )
    # When it runs
    workflow.apply_async()
    with pytest.raises(ValueError):
        app.drain(timeout_s=30)

    # Then every run is in the one trace, each its own span
    names = [name for name, _ in runs]
    assert sorted(names) == sorted(["step", "flaky", "flaky", "callback", "step", "step",
                                    "step", "boom", "callback"])
    contexts = [ctx for _, ctx in runs]
    assert all(ctx is not None for ctx in contexts)
    assert len({ctx.trace_id for ctx in contexts if ctx}) == 1
    assert len({ctx.span_id for ctx in contexts if ctx}) == len(runs)
    # and every record after the first names a run before it as its parent span
    spans = {ctx.span_id for ctx in contexts if ctx}
    records = [*_headers_trace(app, app.settings.topic("default")),
               *(ctx for tier in app.settings.topology.tiers
                 for ctx in _headers_trace(app, app.settings.topology.tier_topic("default",
                                                                                  tier)))]
    sent_by_the_client = {ctx for ctx in records if ctx.span_id not in spans}
    assert len(sent_by_the_client) == 1  # the first step's record: every other is a follow-up
    assert len(records) > len(runs) / 2
    if mode == "otel":
        _check_spans({ctx.span_id for ctx in contexts if ctx})


def _check_spans(run_spans: set[str]) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = _exporter[0]
    assert isinstance(exporter, InMemorySpanExporter)
    finished = {f"{s.context.span_id:016x}": s for s in exporter.get_finished_spans()}
    assert run_spans <= set(finished)
    for span_id in run_spans:
        span = finished[span_id]
        assert span.kind == SpanKind.CONSUMER
        assert span.parent is not None and span.parent.is_remote
        assert span.attributes is not None and "streamtasks.task_id" in span.attributes


def test_without_opentelemetry_nothing_is_imported(tmp_path: object) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "from streamtasks import App, tracing\n"
        "app = App('t', broker='memory://', backend='memory://')\n"
        "@app.task(name='t')\n"
        "def t():\n"
        "    assert tracing.current() is not None\n"
        "t.delay(); app.drain()\n"
        "assert not tracing.otel_available()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_opentelemetry_api_without_an_sdk_still_gives_each_run_its_own_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NoOpTracerProvider

    monkeypatch.setattr(tracing, "_otel_module", [trace])
    monkeypatch.setattr(trace, "get_tracer", NoOpTracerProvider().get_tracer)
    record = tracing.new_trace()
    with tracing.task_run("t", record.traceparent) as run:
        assert run.trace_id == record.trace_id and run.span_id != record.span_id
    with tracing.task_run("t", None) as run:
        assert tracing.current() == run
