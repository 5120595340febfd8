"""What a Celery user types, on memory://: Celery's option names do what Celery's do."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from streamtasks import App, ConfigError, Retry, Settings
from streamtasks.message import TaskMessage


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
