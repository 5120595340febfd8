import asyncio
import dataclasses
from decimal import Decimal

import pytest

from streamtasks import (
    App,
    ArgumentError,
    EncodeError,
    MessageTooLargeError,
    Retry,
    SendError,
    Settings,
    TaskFailed,
    TaskRevoked,
    UnknownTaskError,
    states,
)
from streamtasks.broker.memory import MemoryBroker


def test_delay_runs_on_a_worker_and_get_returns_the_result(app: App) -> None:
    @app.task(name="sum")
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    result = total.delay(list(range(1, 11)))
    assert result.state == states.PENDING
    app.drain()
    assert result.get(timeout=1) == 55
    assert result.state == states.SUCCESS
    meta = result.meta()
    assert meta is not None and meta.name == "sum" and meta.attempts == 1


def test_async_tasks_run_on_the_event_loop(app: App) -> None:
    @app.task(name="slow_double")
    async def slow_double(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    results = [slow_double.delay(i) for i in range(20)]
    app.drain()
    assert [r.get(timeout=1) for r in results] == [i * 2 for i in range(20)]


def test_rich_values_round_trip_through_a_task(app: App) -> None:
    @app.task(name="echo")
    def echo(value: object) -> object:
        return value

    value = {"big": 2**100, "d": Decimal("1.25"), "b": b"\x00\xff", "n": None,
             "nested": [1, [2.5, "x"], {"t": True}]}
    result = echo.delay(value)
    app.drain()
    assert result.get(timeout=1) == value


def test_dataclass_arguments_are_converted_by_type_hints(app: App) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    @app.task(name="norm1")
    def norm1(p: Point) -> int:
        assert isinstance(p, Point)
        return abs(p.x) + abs(p.y)

    result = norm1.delay(Point(3, -4))
    app.drain()
    assert result.get(timeout=1) == 7


def test_a_task_exception_is_a_failure_with_type_and_traceback(app: App) -> None:
    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("bad value")

    result = boom.delay()
    with pytest.raises(ValueError, match="bad value"):
        app.drain()  # drain re-raises task errors, as a unit test wants
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert info.value.error_type == "ValueError"
    assert "bad value" in info.value.remote_traceback
    assert result.state == states.FAILURE


def test_bad_arguments_are_refused_at_send_time(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ArgumentError, match="b"):
        add.delay(1)  # type: ignore[call-arg]
    with pytest.raises(EncodeError, match="set"):
        app.send("add", args=[{1, 2}, 3])


def test_send_by_name_without_the_function(app: App) -> None:
    @app.task(name="mul", queue="math")
    def mul(a: int, b: int) -> int:
        return a * b

    result = app.send("mul", args=[6, 7], queue="math")
    app.drain(["math"])
    assert app.result(result.id).get(timeout=1) == 42


def test_unknown_task_name_is_dead_lettered_and_fails(app: App) -> None:
    @app.task(name="known")
    def known() -> int:
        return 1

    lost = app.send("nobody-registered-this")
    ok = known.delay()
    app.drain()
    assert ok.get(timeout=1) == 1
    with pytest.raises(TaskFailed) as info:
        lost.get(timeout=1)
    assert info.value.error_type == UnknownTaskError.__name__
    dlq = app.settings.dlq_topic("default")
    records = _all_records(app, dlq)
    assert len(records) == 1
    assert records[0].headers["dlq-reason"] == b"unknown-task"


def test_wrong_argument_types_are_dead_lettered_at_the_worker(app: App) -> None:
    @app.task(name="square")
    def square(x: int) -> int:
        return x * x

    sent = app.send("square", args=["not a number"])  # known here, but only arity is checked
    app.drain()
    with pytest.raises(TaskFailed) as info:
        sent.get(timeout=1)
    assert info.value.error_type == ArgumentError.__name__
    assert [r.headers["dlq-reason"] for r in _all_records(app, "streamtasks.default.dlq")] == [
        b"bad-arguments"
    ]


def test_corrupt_record_is_dead_lettered_and_the_worker_keeps_going(app: App) -> None:
    @app.task(name="one")
    def one() -> int:
        return 1

    app.ensure_queue("default")
    app.broker.send("streamtasks.default", b"\x00garbage", key=b"k")
    good = one.delay()
    app.drain()
    assert good.get(timeout=1) == 1
    dead = _all_records(app, "streamtasks.default.dlq")
    assert len(dead) == 1
    assert dead[0].value == b"\x00garbage"
    assert dead[0].headers["dlq-reason"] == b"decode-error"
    assert dead[0].headers["dlq-original-topic"] == b"streamtasks.default"


def test_expired_tasks_do_not_run(app: App) -> None:
    ran = []

    @app.task(name="late")
    def late() -> None:
        ran.append(1)

    result = late.apply_async(expires_s=-1)
    app.drain()
    assert ran == []
    with pytest.raises(TaskRevoked):
        result.get(timeout=1)


def test_too_large_task_is_refused_at_send_time() -> None:
    app = App("t", settings=Settings(broker="memory://", backend="memory://",
                                     max_message_bytes=1024))

    @app.task(name="big")
    def big(data: bytes) -> int:
        return len(data)

    with pytest.raises(MessageTooLargeError, match="1024"):
        big.delay(b"x" * 4096)


def test_sends_follow_the_namespace_and_tiers_the_settings_have_now(app: App) -> None:
    @app.task(name="noop")
    def noop() -> None:
        return None

    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    noop.delay()
    assert len(broker.records("streamtasks.default")) == 1
    # assigned to (tests do), then replaced (the CLI does): each send names its topic anew
    app.settings.namespace = "moved"
    noop.delay()
    assert len(broker.records("moved.default")) == 1
    app.settings = app.settings.replace(namespace="again")
    noop.apply_async(countdown=3)
    assert len(broker.records("again.default.delay.1s")) == 1
    app.settings.delay_tiers = "2s,1h"
    noop.apply_async(countdown=3)
    assert len(broker.records("again.default.delay.2s")) == 1
    assert len(broker.records("again.default.delay.1s")) == 1


def test_flush_names_sends_that_failed(app: App) -> None:
    @app.task(name="noop")
    def noop() -> None:
        return None

    app.broker.fail_next_sends(1, "broker down")  # type: ignore[attr-defined]
    result = noop.delay()
    with pytest.raises(SendError) as info:
        app.flush()
    assert info.value.failures[0][0] == result.id
    assert "broker down" in str(info.value)


def test_ordered_tasks_of_one_key_run_in_order(app: App) -> None:
    seen: list[int] = []

    @app.task(name="append", ordered=True)
    def append(i: int) -> None:
        seen.append(i)

    for i in range(50):
        append.apply_async([i], key="same-key")
    app.drain()
    assert seen == list(range(50))


def test_the_result_row_is_written_before_the_offset_is_committed(app: App) -> None:
    @app.task(name="ok")
    def ok() -> int:
        return 1

    result = ok.delay()
    app.backend.fail_writes(3)  # type: ignore[attr-defined]
    app.drain(timeout_s=10)
    # Given three failed writes, the worker retried until the row was stored,
    # and only then committed the offset (drain waits for the commit).
    assert result.get(timeout=1) == 1


def _all_records(app: App, topic: str) -> list:
    return app.broker.records(topic)  # type: ignore[attr-defined]


def test_a_result_that_cannot_be_stored_is_the_tasks_failure(app: App) -> None:
    @app.task(name="gives_a_set")
    def gives_a_set() -> set[int]:
        return {1, 2}

    result = gives_a_set.delay()
    app.drain()  # the worker does not retry this for ever: it is not the backend's fault
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert info.value.error_type == "EncodeError"


def _fast_tiers_app() -> App:
    return App("t", settings=Settings(broker="memory://", backend="memory://", partitions=2,
                                      commit_interval_s=0.0, delay_tiers="50ms,200ms"))


def test_countdown_tasks_wait_in_the_tiers_and_never_run_early() -> None:
    import time

    app = _fast_tiers_app()
    ran_at: dict[int, float] = {}

    @app.task(name="when")
    def when(i: int) -> None:
        ran_at[i] = time.time()

    sent_at = time.time()
    for i, countdown in enumerate([0.0, 0.1, 0.3, 0.45]):
        when.apply_async([i], countdown_s=countdown)
    app.drain(timeout_s=10)
    for i, countdown in enumerate([0.0, 0.1, 0.3, 0.45]):
        assert ran_at[i] >= sent_at + countdown
    assert app.broker.records("streamtasks.default.delay.200ms")  # type: ignore[attr-defined]
    app.close()


def test_retries_with_backoff_then_success_and_retry_raised_by_the_task() -> None:
    app = _fast_tiers_app()
    calls: list[int] = []

    @app.task(name="flaky", max_retries=3, backoff="fixed", backoff_s=0.05)
    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return len(calls)

    asked: list[int] = []

    @app.task(name="asks")
    def asks() -> str:
        asked.append(1)
        if len(asked) == 1:
            raise Retry(countdown_s=0.05, reason="not ready")
        return "ready"

    r1, r2 = flaky.delay(), asks.delay()
    app.drain(timeout_s=10)
    assert r1.get(timeout=1) == 3
    assert r2.get(timeout=1) == "ready"
    meta = r1.meta()
    assert meta is not None and meta.attempts == 3
    app.close()


def test_exhausted_retries_fail_and_dead_letter() -> None:
    app = _fast_tiers_app()

    @app.task(name="never", max_retries=2, backoff="fixed", backoff_s=0.01,
              retry_on=(ValueError,))
    def never() -> None:
        raise ValueError("no")

    @app.task(name="not_retried", max_retries=5, retry_on=(ValueError,))
    def not_retried() -> None:
        raise KeyError("not a ValueError")

    r1, r2 = never.delay(), not_retried.delay()
    with pytest.raises((ValueError, KeyError)):
        app.drain(timeout_s=10)
    for result in (r1, r2):
        with pytest.raises(TaskFailed):
            result.get(timeout=1)
    assert r1.meta().attempts == 3  # type: ignore[union-attr]
    assert r2.meta().attempts == 1  # type: ignore[union-attr]
    reasons = sorted(r.headers["dlq-reason"] for r in _all_records(app, "streamtasks.default.dlq"))
    assert reasons == [b"retries-exhausted", b"task-failed"]
    app.close()


def test_per_call_max_retries_overrides_the_task() -> None:
    app = _fast_tiers_app()
    calls: list[int] = []

    @app.task(name="twice")
    def twice() -> None:
        calls.append(1)
        raise RuntimeError("fails")

    result = twice.apply_async(max_retries=1, backoff="fixed", backoff_s=0.01)
    with pytest.raises(RuntimeError):
        app.drain(timeout_s=10)
    assert len(calls) == 2
    assert result.state == states.FAILURE
    app.close()


def test_a_naive_eta_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    from streamtasks.headers import ETA_MS
    from streamtasks.timeutil import epoch_ms

    app = _fast_tiers_app()
    eta = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None, microsecond=0)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        app.send("later", eta=eta)
        app.flush()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    (record,) = app.broker.records("streamtasks.default.delay.200ms")  # type: ignore[attr-defined]
    expected = int(eta.replace(tzinfo=UTC).timestamp() * 1000)
    assert int(record.headers[ETA_MS]) == expected == epoch_ms(eta)
    app.close()


def test_every_task_overload_takes_every_option_of_the_decorator() -> None:
    """A typed caller of ``@app.task(bind=True, rate_limit=...)`` must match an overload."""
    import inspect
    import typing

    from streamtasks.app import App as AppClass

    options = set(inspect.signature(AppClass.task).parameters) - {"self", "fn"}
    # the bare ``@app.task`` form takes no option; the bind=False and bind=True forms take all
    with_options = [set(inspect.signature(v).parameters) - {"self", "fn"}
                    for v in typing.get_overloads(AppClass.task)]
    with_options = [taken for taken in with_options if taken]
    assert len(with_options) == 2
    for taken in with_options:
        assert taken == options, sorted(options ^ taken)
