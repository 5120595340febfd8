"""A running task's context: bind=True, self.request, self.retry, current_task, child ids."""

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest

from streamtasks import App, TaskError, current_task, group, states
from streamtasks.context import Request
from streamtasks.message import derived_task_id, new_task_id
from tests import test_celery_names
from tests.test_celery_names import _queued as _sent

#: The Celery-names module's app (memory://, delay tiers of milliseconds).
app = test_celery_names.app


def test_bind_gives_self_request_with_the_runs_context(app: App) -> None:
    seen: list[Request] = []

    @app.task(name="who", bind=True, max_retries=3, queue="ctxq")
    def who(self: Any, x: int) -> str:
        seen.append(self.request)
        return f"{self.name}:{x}"

    result = who.delay(7)
    app.drain(["ctxq"])
    assert result.get(timeout=1) == "who:7"
    (request,) = seen
    assert request.id == result.id and request.name == "who" and request.queue == "ctxq"
    assert request.attempt == 1 and request.retries == 0
    assert request.max_retries == 3 and request.retries_left == 3
    assert request.parent_id is None and request.root_id is None
    assert request.partition is not None and request.offset is not None
    assert request.args == (7,) and request.hostname


def test_bound_task_called_directly_gets_self_and_request_is_refused(app: App) -> None:
    @app.task(name="ident", bind=True)
    def ident(self: Any, x: int) -> Any:
        return self

    assert ident(1) is ident  # a direct call passes the task as self
    with pytest.raises(TaskError, match="only known while the task runs"):
        ident.request  # noqa: B018 - the property read is the test


def test_self_retry_asks_for_another_attempt_and_request_counts_it(app: App) -> None:
    attempts: list[tuple[int, int, int]] = []

    @app.task(name="again", bind=True, max_retries=2)
    def again(self: Any) -> int:
        r = self.request
        attempts.append((r.attempt, r.retries, r.retries_left))
        if r.attempt < 3:
            raise self.retry(countdown=0.01)
        return r.attempt

    result = again.delay()
    app.drain(timeout_s=15)
    assert result.get(timeout=1) == 3
    assert attempts == [(1, 0, 2), (2, 1, 1), (3, 2, 0)]


def test_self_retry_without_retries_left_fails_with_exc(app: App) -> None:
    @app.task(name="down", bind=True)
    def down(self: Any) -> None:
        try:
            raise ConnectionError("db down")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=0.01, max_retries=1) from exc

    result = down.delay()
    with pytest.raises(ConnectionError):
        app.drain(timeout_s=15)
    meta = result.meta()
    assert meta is not None and meta.state == states.FAILURE
    assert meta.attempts == 2 and meta.error_type == "ConnectionError"


def test_current_task_reads_the_context_without_bind(app: App) -> None:
    seen: list[str] = []

    @app.task(name="plain")
    def plain() -> None:
        task = current_task()
        assert task is not None
        seen.append(task.request.id)

    @app.task(name="plain_async")
    async def plain_async() -> None:
        await asyncio.sleep(0)
        task = current_task()
        assert task is not None
        seen.append(task.request.id)

    assert current_task() is None
    ids = {plain.delay().id, plain_async.delay().id}
    app.drain()
    assert set(seen) == ids
    assert current_task() is None


def test_children_get_ids_derived_from_the_parent_and_their_position(app: App) -> None:
    @app.task(name="child", queue="kids")
    def child(n: int) -> int:
        return n

    @app.task(name="parent")
    def parent() -> None:
        child.delay(1)
        child.apply_async((2,))
        app.send_task("child", (3,), queue="kids")
        child.apply_async((4,), task_id="fixed-id")  # an explicit id wins

    result = parent.delay()
    app.drain(["default"])
    kids = _sent(app, "kids")
    by_arg = {k.args[0]: k for k in kids}
    assert [by_arg[n].id for n in (1, 2, 3)] == [
        derived_task_id(result.id, f"child-{n}") for n in (1, 2, 3)]
    assert by_arg[4].id == "fixed-id"
    assert all(k.parent_id == result.id and k.root_id == result.id for k in kids)


def test_a_redelivered_parent_resends_the_same_children(app: App) -> None:
    @app.task(name="child", queue="kids")
    def child(n: int) -> int:
        return n

    @app.task(name="fanout")
    def fanout() -> None:
        for n in range(3):
            child.delay(n)

    # the same record delivered twice (a crash before its offset was committed)
    fanout.apply_async(task_id="p-1")
    fanout.apply_async(task_id="p-1")
    app.drain(["default"])
    kids = _sent(app, "kids")
    assert len(kids) == 6
    assert {k.id for k in kids} == {derived_task_id("p-1", f"child-{n}") for n in (1, 2, 3)}


def test_a_retry_attempt_resends_the_first_attempts_children(app: App) -> None:
    @app.task(name="child", queue="kids")
    def child(n: int) -> int:
        return n

    @app.task(name="flaky_parent", bind=True, max_retries=1)
    def flaky_parent(self: Any) -> None:
        child.delay(self.request.attempt)
        if self.request.attempt == 1:
            raise self.retry(countdown=0.01)

    flaky_parent.delay()
    app.drain(["default"], timeout_s=15)
    kids = _sent(app, "kids")
    assert len(kids) == 2 and kids[0].id == kids[1].id  # the attempt is not in the id


def test_grandchildren_keep_the_root(app: App) -> None:
    @app.task(name="leaf", queue="kids")
    def leaf() -> None:
        return None

    @app.task(name="middle", queue="mid")
    def middle() -> None:
        leaf.delay()

    @app.task(name="top")
    def top() -> None:
        middle.delay()

    result = top.delay()
    app.drain(["default", "mid"])
    (mid,) = _sent(app, "mid")
    (grandchild,) = _sent(app, "kids")
    assert mid.parent_id == result.id and mid.root_id == result.id
    assert grandchild.parent_id == mid.id and grandchild.root_id == result.id
    assert grandchild.id == derived_task_id(mid.id, "child-1")


def test_a_workflow_sent_from_a_task_gets_a_derived_id(app: App) -> None:
    @app.task(name="part", queue="kids")
    def part(n: int) -> int:
        return n

    @app.task(name="launcher")
    def launcher() -> str:
        return group(part.s(1), part.s(2)).apply_async().id

    first = launcher.apply_async(task_id="L")
    app.drain(["default"])
    assert first.get(timeout=1) == derived_task_id("L", "child-1")
    members = _sent(app, "kids")
    assert len(members) == 2 and all(m.parent_id == "L" and m.root_id == "L" for m in members)


def test_outside_a_task_ids_are_fresh(app: App) -> None:
    @app.task(name="solo")
    def solo() -> None:
        return None

    a, b = solo.delay(), solo.delay()
    assert a.id != b.id
    msgs = _sent(app)
    assert all(m.parent_id is None and m.root_id is None for m in msgs)


def test_fresh_ids_are_uuid4_text_and_unique() -> None:
    ids = [new_task_id() for _ in range(20_000)]

    assert len(set(ids)) == len(ids)
    for text in ids[:2_000]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lower-case hex, dashes where uuid4 puts them
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # every variant digit comes up: the random bits next to the variant are used
    assert {text[19] for text in ids} == set("89ab")


def test_request_is_frozen() -> None:
    request = Request(id="x", name="n", queue="q")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.id = "y"  # type: ignore[misc]


def test_an_async_bound_task_reads_its_request(app: App) -> None:
    @app.task(name="aself", bind=True)
    async def aself(self: Any, x: int) -> str:
        await asyncio.sleep(0)
        return f"{self.request.id}:{self.request.attempt}:{x}"

    result = aself.delay(5)
    app.drain()
    assert result.get(timeout=1) == f"{result.id}:1:5"


def test_self_retry_takes_eta_and_refuses_what_streamtasks_does_not_do(app: App) -> None:
    from datetime import UTC, datetime, timedelta

    from streamtasks import ConfigError, Retry

    @app.task(name="r", bind=True)
    def r(self: Any) -> None:
        return None

    with pytest.raises(Retry) as raised:
        r.retry(eta=datetime.now(UTC) + timedelta(seconds=30))
    assert raised.value.countdown_s is not None and 28 <= raised.value.countdown_s <= 30
    with pytest.raises(ConfigError, match="countdown or eta"):
        r.retry(countdown=1, eta=datetime.now(UTC))
    with pytest.raises(ConfigError, match="unknown argument 'args'"):
        r.retry(args=(1,))


def test_a_thread_run_in_the_tasks_context_sends_derived_children(app: App) -> None:
    import contextvars
    import threading

    @app.task(name="child", queue="kids")
    def child(n: int) -> int:
        return n

    @app.task(name="threads")
    def threads() -> None:
        for n in range(2):  # one after the other: the numbering is the order of sends
            worker = threading.Thread(target=contextvars.copy_context().run,
                                      args=(child.delay, n))
            worker.start()
            worker.join()

    threads.apply_async(task_id="T")
    threads.apply_async(task_id="T")  # redelivered
    app.drain(["default"])
    kids = _sent(app, "kids")
    assert len(kids) == 4
    assert {k.id for k in kids} == {derived_task_id("T", f"child-{n}") for n in (1, 2)}
    assert all(k.parent_id == "T" and k.root_id == "T" for k in kids)


def test_a_plain_thread_does_not_see_the_run_as_documented(app: App) -> None:
    import threading

    @app.task(name="child", queue="kids")
    def child(n: int) -> int:
        return n

    @app.task(name="plain_thread")
    def plain_thread() -> None:
        worker = threading.Thread(target=child.delay, args=(1,))
        worker.start()
        worker.join()

    plain_thread.apply_async(task_id="T")
    app.drain(["default"])
    (kid,) = _sent(app, "kids")
    assert kid.parent_id is None and kid.id != derived_task_id("T", "child-1")


def test_a_child_kafka_did_not_take_fails_the_parents_run_instead_of_being_lost(
    app: App,
) -> None:
    ran: list[int] = []

    @app.task(name="child", queue="kids")
    def child(n: int) -> None:
        ran.append(n)

    @app.task(name="sends_one", bind=True, max_retries=1, backoff="fixed", backoff_s=0.01)
    def sends_one(self: Any) -> int:
        if self.request.attempt == 1:
            app.broker.fail_next_sends(1)  # type: ignore[attr-defined]
        child.delay(self.request.attempt)
        return self.request.attempt

    # Given the first attempt's child is refused by the broker
    parent = sends_one.delay()
    app.drain(["default"], timeout_s=15)
    # Then the run was not done before its child was confirmed: it ran again, and the
    # child sent then (same id) is there to run
    assert parent.get(timeout=1) == 2
    app.drain(["kids"])
    assert ran == [2]


def test_an_async_task_whose_child_is_refused_fails_and_is_retried(app: App) -> None:
    ran: list[int] = []

    @app.task(name="child", queue="kids")
    def child(n: int) -> None:
        ran.append(n)

    @app.task(name="async_sends", bind=True, max_retries=1, backoff="fixed", backoff_s=0.01)
    async def async_sends(self: Any) -> int:
        if self.request.attempt == 1:
            app.broker.fail_next_sends(1)  # type: ignore[attr-defined]
        child.delay(self.request.attempt)
        await asyncio.sleep(0)
        return self.request.attempt

    parent = async_sends.delay()
    app.drain(["default"], timeout_s=15)
    assert parent.get(timeout=1) == 2
    app.drain(["kids"])
    assert ran == [2]


def test_retries_left_counts_the_limit_self_retry_gave(app: App) -> None:
    seen: list[tuple[int, int, int]] = []

    @app.task(name="limited", bind=True)
    def limited(self: Any) -> int:
        r = self.request
        seen.append((r.attempt, r.max_retries, r.retries_left))
        if r.retries_left or r.attempt == 1:
            raise self.retry(countdown=0.01, max_retries=2)
        return r.attempt

    result = limited.delay()
    app.drain(["default"], timeout_s=15)
    assert result.get(timeout=1) == 3
    assert seen[1:] == [(2, 2, 1), (3, 2, 0)]  # what the retry asked for, from then on
