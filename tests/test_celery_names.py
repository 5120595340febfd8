"""What a Celery user types, on memory://: Celery's option names do what Celery's do."""

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from streamtasks import (
    App,
    ConfigError,
    GroupResult,
    Request,
    Retry,
    Settings,
    TaskFailed,
    group,
    states,
)
from streamtasks.message import TaskMessage
from streamtasks.signature import Signature


@pytest.fixture
def app() -> Iterator[App]:
    application = App("celery", settings=Settings(
        broker="memory://", backend="memory://", partitions=2, commit_interval_s=0.0,
        delay_tiers="50ms,200ms,1s,5s,30s",
    ))
    yield application
    application.close()


def _delayed(app: App, queue: str = "default") -> list[TaskMessage]:
    """Return the tasks waiting in the queue's delay tiers."""
    topology = app.settings.topology
    return [
        app.codec.decode_task(record.value or b"")
        for tier in topology.tiers
        for record in app.broker.records(topology.tier_topic(queue, tier))  # type: ignore[attr-defined]
    ]


def _queued(app: App, queue: str = "default") -> list[TaskMessage]:
    topic = app.settings.topology.topic(queue)
    return [app.codec.decode_task(r.value or b"")
            for r in app.broker.records(topic)]  # type: ignore[attr-defined]


def test_apply_async_countdown_waits_in_a_delay_tier_with_its_eta(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    before = int(time.time() * 1000)
    result = add.apply_async((1, 2), countdown=5)
    app.flush()
    (msg,) = _delayed(app)
    assert msg.id == result.id
    assert msg.eta_ms is not None and before + 5000 <= msg.eta_ms <= before + 6000
    assert _queued(app) == []


def test_eta_datetime_naive_is_utc(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    when = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=20)
    add.apply_async((1, 2), eta=when)
    app.flush()
    (msg,) = _delayed(app)
    assert msg.eta_ms == int(when.replace(tzinfo=UTC).timestamp() * 1000)


def test_expires_in_seconds_or_as_a_datetime(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    before = int(time.time() * 1000)
    add.apply_async((1, 2), expires=60)
    at = datetime.now(UTC) + timedelta(minutes=5)
    add.apply_async((1, 2), expires=at)
    app.flush()
    in_60s, at_time = _queued(app)[0], _queued(app)[1]
    if in_60s.expires_ms and in_60s.expires_ms > before + 120_000:
        in_60s, at_time = at_time, in_60s
    assert in_60s.expires_ms is not None
    assert before + 60_000 <= in_60s.expires_ms <= before + 61_000
    assert at_time.expires_ms == int(at.timestamp() * 1000)


def test_link_and_link_error_run_their_callbacks_after_drain(app: App) -> None:
    seen: list[object] = []

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("nope")

    @app.task(name="record")
    def record(value: int) -> None:
        seen.append(value)

    @app.task(name="on_error")
    def on_error(task_id: str, error: str) -> None:
        seen.append(error)

    add.apply_async((2, 3), link=record.s())
    boom.apply_async(link_error=[on_error.s()])
    with pytest.raises(ValueError, match="nope"):
        app.drain()
    app.drain()
    assert 5 in seen
    assert any(isinstance(s, str) and "ValueError: nope" in s for s in seen)


def test_signature_set_and_apply_async_take_celery_names(app: App) -> None:
    seen: list[int] = []

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="record")
    def record(value: int) -> None:
        seen.append(value)

    sig = add.s(1, 1).set(countdown=0.05, expires=60, queue="default", link=record.s())
    assert sig.options["countdown_s"] == 0.05 and sig.options["expires_s"] == 60
    result = sig.apply_async(task_id="fixed-id")
    assert result.id == "fixed-id"
    other = add.s(2, 2).apply_async(link=record.s())
    app.drain()
    assert result.get(timeout=1) == 2 and other.get(timeout=1) == 4
    assert sorted(seen) == [2, 4]


def test_send_task_by_name_with_celery_arguments(app: App) -> None:
    @app.task(name="tasks.add")
    def add(a: int, b: int) -> int:
        return a + b

    result = app.send_task("tasks.add", args=[2, 2], task_id="my-id")
    no_args = app.send_task("tasks.add", kwargs={"a": 1, "b": 1})
    app.drain()
    assert result.id == "my-id" and result.get(timeout=1) == 4
    assert no_args.get(timeout=1) == 2


@pytest.mark.parametrize(
    "option", ["priority", "routing_key", "exchange", "serializer", "compression",
               "shadow", "headers", "retry_policy", "ignore_result", "time_limit"],
)
def test_options_celery_has_and_streamtasks_refuses_name_themselves(
    app: App, option: str
) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    message = f"'{option}'.*streamtasks does not support it"
    with pytest.raises(ConfigError, match=message):
        add.apply_async((1, 1), **{option: 1})
    with pytest.raises(ConfigError, match=message):
        app.send_task("add", [1, 1], **{option: 1})
    with pytest.raises(ConfigError, match=message):
        add.s(1, 1).set(**{option: 1})
    with pytest.raises(ConfigError, match=message):
        add.s(1, 1).apply_async(**{option: 1})


def test_unknown_options_list_the_accepted_ones(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ConfigError, match=r"unknown option 'countdwon'; accepted: .*countdown"):
        add.apply_async((1, 1), countdwon=5)
    with pytest.raises(ConfigError, match=r"countdwon.*accepted: .*countdown"):
        add.s(1, 1).set(countdwon=5)


def test_older_spellings_still_work_but_not_with_the_new_one(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    add.apply_async((1, 1), countdown_s=5)
    assert add.s(1, 1).set(expires_s=3).options["expires_s"] == 3
    with pytest.raises(ConfigError, match="countdown or countdown_s, not both"):
        add.apply_async((1, 1), countdown=1, countdown_s=1)
    with pytest.raises(ConfigError, match="countdown or eta"):
        add.apply_async((1, 1), countdown=1, eta=datetime.now(UTC))


def test_retry_with_countdown_in_a_task_retries(app: App) -> None:
    calls: list[int] = []

    @app.task(name="asks")
    def asks() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Retry(countdown=0.05)
        return "ready"

    result = asks.delay()
    app.drain(timeout_s=10)
    assert result.get(timeout=1) == "ready" and len(calls) == 2


def test_retry_exc_and_max_retries_as_in_celery(app: App) -> None:
    calls: list[int] = []

    @app.task(name="flaky")
    def flaky() -> None:
        calls.append(1)
        try:
            raise ConnectionError("db down")
        except ConnectionError as exc:
            raise Retry(exc=exc, countdown=0.01, max_retries=1) from exc

    error = Retry(exc=ConnectionError("db down"))
    assert error.reason == "ConnectionError: db down" and error.exc is not None
    result = flaky.delay()
    with pytest.raises(ConnectionError):  # as in Celery: no retry left, the task fails with exc
        app.drain(timeout_s=10)
    assert len(calls) == 2  # the first attempt and one retry
    assert result.state == "FAILURE"
    meta = result.meta()
    assert meta is not None and meta.error_type == "ConnectionError"
    assert meta.error_message == "db down"


# -- results: AsyncResult and GroupResult as Celery has them ------------------------------


def test_async_result_result_traceback_date_done_name_forget(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("nope")

    ok, bad = add.delay(1, 2), boom.delay()
    assert ok.result is None and ok.date_done is None and ok.name is None  # nothing yet
    with pytest.raises(ValueError):
        app.drain()
    before = datetime.now(UTC)
    total: int = ok.get(timeout=1)  # typed: AsyncResult[int]
    assert total == 3 and ok.result == 3 and ok.name == "add" and ok.traceback is None
    assert ok.date_done is not None and ok.date_done <= before + timedelta(seconds=1)
    assert ok.date_done.tzinfo is not None
    assert isinstance(bad.result, TaskFailed) and bad.result.error_type == "ValueError"
    assert bad.traceback is not None and "ValueError: nope" in bad.traceback
    assert bad.name == "boom"
    ok.forget()
    assert ok.state == "PENDING" and ok.result is None
    assert app.result(ok.id).meta() is None


def test_group_result_save_and_restore_from_another_app(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    saved = group(add.s(1, 1), add.s(2, 2), add.s(3, 3) | add.s(10)).apply_async()
    assert isinstance(saved, GroupResult)
    saved.save()
    app.drain()
    # another process: only the group id and the shared backend
    other = App("reader", broker=app.broker, backend=app.backend)
    restored = other.group_result(saved.id)
    assert restored is not None and restored.id == saved.id and len(restored) == 3
    assert restored.get(timeout=1) == [2, 4, 16]
    assert restored.ready() and restored.successful()
    assert other.group_result("no-such-group") is None
    restored.forget()
    assert other.group_result(saved.id) is None
    assert all(other.result(r.id).meta() is None for r in saved.results[:2])


# -- error callbacks get the failure as data ---------------------------------------------


def test_link_error_receives_the_failure_as_a_dict(app: App) -> None:
    seen: list[dict[str, object]] = []

    @app.task(name="boom")
    def boom(x: int, *, label: str) -> None:
        raise KeyError(f"missing {x}")

    @app.task(name="report")
    def report(failure: dict[str, object]) -> None:
        seen.append(failure)

    result = boom.apply_async((7,), {"label": "l"}, link_error=report.s())
    with pytest.raises(KeyError):
        app.drain()
    app.drain()
    (failure,) = seen
    assert failure["task_id"] == result.id and failure["name"] == "boom"
    assert failure["args"] == [7] and failure["kwargs"] == {"label": "l"}
    assert failure["error_type"] == "KeyError" and failure["message"] == "'missing 7'"
    assert isinstance(failure["traceback"], str) and "KeyError" in failure["traceback"]
    assert failure["attempt"] == 1 and failure["queue"] == "default"


# -- hooks ------------------------------------------------------------------------------


def test_task_hooks_and_the_app_error_handler_get_context_exc_and_traceback(
    app: App,
) -> None:
    calls: list[tuple[str, str, object, str]] = []

    def on_failure(request: Request, exc: BaseException, tb: str) -> None:
        calls.append(("failure", request.id, exc, tb))

    def on_retry(request: Request, exc: BaseException, tb: str) -> None:
        calls.append(("retry", f"{request.id}#{request.attempt}", exc, tb))

    def on_success(request: Request, result: object) -> None:
        calls.append(("success", request.id, result, ""))

    @app.on_failure
    def everywhere(request: Request, exc: BaseException, tb: str) -> None:
        calls.append(("app", request.id, exc, tb))

    @app.task(name="flaky", max_retries=1, backoff="fixed", backoff_s=0.01,
              on_failure=on_failure, on_retry=on_retry, on_success=on_success)
    def flaky(fail: bool) -> str:
        if fail:
            raise ValueError("always")
        return "fine"

    good, bad = flaky.delay(False), flaky.delay(True)
    with pytest.raises(ValueError):
        app.drain(timeout_s=15)
    by_kind = {(kind, ident): (obj, tb) for kind, ident, obj, tb in calls}
    assert by_kind[("success", good.id)] == ("fine", "")
    exc, tb = by_kind[("retry", f"{bad.id}#1")]
    assert isinstance(exc, ValueError) and "ValueError: always" in tb
    exc, tb = by_kind[("failure", bad.id)]
    assert isinstance(exc, ValueError) and "raise ValueError" in tb
    assert by_kind[("app", bad.id)][0] is exc
    kinds = [kind for kind, *_ in calls]
    assert kinds.index("failure") < kinds.index("app")  # the task's hook first
    assert len(calls) == 4


def test_a_hook_that_raises_is_logged_and_changes_nothing(
    app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("hook bug")

    app.on_failure(broken)

    @app.task(name="fine", on_success=broken)
    def fine() -> int:
        return 1

    @app.task(name="bad", on_failure=broken)
    def bad() -> None:
        raise ValueError("task error")

    ok, failed = fine.delay(), bad.delay()
    with pytest.raises(ValueError, match="task error"):  # the task's error, not the hook's
        app.drain()
    assert ok.get(timeout=1) == 1 and failed.state == "FAILURE"
    meta = failed.meta()
    assert meta is not None and meta.error_type == "ValueError"
    after = fine.delay()  # the worker goes on
    app.drain()
    assert after.get(timeout=1) == 1
    err = capsys.readouterr().err
    assert err.count("a task hook raised") == 4 and "hook bug" in err


def test_a_slow_hook_does_not_hold_up_the_worker(app: App) -> None:
    # Given an on_failure hook that pages someone and waits (an HTTP call, say) until
    # another task's result is stored, and that other task finishing after the hook began
    hook_began = threading.Event()
    seen_other: list[bool] = []

    def page_oncall(request: Request, exc: BaseException, tb: str) -> None:
        hook_began.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and other.state != states.SUCCESS:
            time.sleep(0.02)
        seen_other.append(other.state == states.SUCCESS)

    @app.task(name="pages", on_failure=page_oncall)
    def pages() -> None:
        raise ValueError("down")

    @app.task(name="after_the_page", queue="other")
    def after_the_page() -> int:
        hook_began.wait(5)
        return 1

    failing = pages.delay()
    other = after_the_page.delay()
    # When one worker runs both
    with pytest.raises(ValueError, match="down"):
        app.drain(["default", "other"], timeout_s=20)
    # Then the other task's result was stored while the hook still ran, and drain
    # returned only once the hook was done
    assert failing.state == states.FAILURE
    assert seen_other == [True]


def test_a_two_argument_error_callback_served_by_another_worker_gets_the_pair(
    app: App,
) -> None:
    # Given an alerts service (its own app and worker) with an old two-argument error
    # callback, and a pipeline worker that does not know it
    alerts = App("alerts", settings=app.settings, broker=app.broker, backend=app.backend)
    got: list[tuple[str, str]] = []

    @alerts.task(name="notify", queue="alerts")
    def notify(task_id: str, text: str) -> None:
        got.append((task_id, text))

    @alerts.task(name="notify_dict", queue="alerts")
    def notify_dict(failure: dict[str, object]) -> None:
        got.append((str(failure["task_id"]), str(failure["error_type"])))

    @app.task(name="ingest", queue="ingest")
    def ingest() -> None:
        raise ValueError("bad row")

    failed = ingest.apply_async(link_error=[Signature("notify", options={"queue": "alerts"}),
                                            Signature("notify_dict",
                                                      options={"queue": "alerts"})])
    with pytest.raises(ValueError):
        app.drain(["ingest"])
    # When the alerts worker runs the callbacks
    alerts.drain(["alerts"])
    # Then each got the form it takes
    assert sorted(got) == [(failed.id, "ValueError"), (failed.id, "ValueError: bad row")]
