"""PENDING, RECEIVED and STARTED are observable; short tasks pay no write for them."""

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from streamtasks import App, Settings, states
from streamtasks.backend.memory import MemoryBackend
from streamtasks.message import TaskMessage
from streamtasks.worker.consumer import Worker
from streamtasks.worker.progress import ProgressWriter


def _app(**settings: object) -> App:
    return App("states", settings=Settings(
        broker="memory://", backend="memory://", partitions=2, commit_interval_s=0.0,
        **settings,  # type: ignore[arg-type]
    ))


@pytest.fixture
def app() -> Iterator[App]:
    application = _app(track_started_after_ms=30)
    yield application
    application.close()


def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return False


def _running_worker(app: App) -> tuple[Worker, threading.Thread]:
    worker = app.worker(concurrency=1)
    worker.start()
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False},
                              daemon=True)
    thread.start()
    return worker, thread


def test_a_long_task_reads_started_while_it_runs_then_success(app: App) -> None:
    go = threading.Event()

    @app.task(name="long")
    def long() -> str:
        go.wait(10)
        return "done"

    result = long.delay()
    app.flush()
    worker, thread = _running_worker(app)
    try:
        assert _until(lambda: result.state == states.STARTED), result.state
        meta = result.meta()
        assert meta is not None and meta.started_ms is not None and meta.worker == worker.name
        go.set()
        assert result.get(timeout=10) == "done" and result.state == states.SUCCESS
    finally:
        go.set()
        worker.stop()
        thread.join(10)


def test_a_task_waiting_behind_a_long_one_reads_received(app: App) -> None:
    go = threading.Event()

    @app.task(name="long", ordered=True)
    def long(n: int) -> int:
        go.wait(10)
        return n

    first = long.apply_async((1,), key="k")
    second = long.apply_async((2,), key="k")  # same key, ordered: waits for the first
    app.flush()
    worker, thread = _running_worker(app)
    try:
        assert _until(lambda: second.state == states.RECEIVED), second.state
        assert _until(lambda: first.state == states.STARTED), first.state
        go.set()
        assert second.get(timeout=10) == 2
    finally:
        go.set()
        worker.stop()
        thread.join(10)


def test_short_tasks_write_no_progress(app: App) -> None:
    @app.task(name="quick")
    def quick(n: int) -> int:
        return n

    results = [quick.delay(n) for n in range(20)]
    app.drain()
    backend = app.backend
    assert isinstance(backend, MemoryBackend)
    assert [r.get(timeout=1) for r in results] == list(range(20))
    assert backend.store_calls == 20  # one row per task, nothing more
    assert all(not (r.meta() or _no_meta()).extra for r in results)


def test_a_backlog_waiting_for_a_thread_writes_no_received(app: App) -> None:
    # Given one thread busy with a task longer than the threshold, and a backlog behind it
    @app.task(name="slow")
    def slow() -> None:
        time.sleep(0.2)

    @app.task(name="quick")
    def quick(n: int) -> int:
        return n

    slow.delay()
    backlog = [quick.delay(n) for n in range(10)]
    app.flush()
    worker = app.worker(concurrency=1)
    try:
        worker.run_until_idle(10)
    finally:
        worker.close()
    # Then the slow one got STARTED (one write more), the waiting ones nothing
    backend = app.backend
    assert isinstance(backend, MemoryBackend)
    assert [r.get(timeout=1) for r in backlog] == list(range(10))
    assert backend.store_calls == 11 + 1


def _no_meta() -> object:
    raise AssertionError("no row")


def test_track_started_on_the_task_writes_started_at_once() -> None:
    app = _app(track_started_after_ms=0)  # thresholds off: only the task option writes
    seen: list[str] = []

    @app.task(name="tracked", track_started=True)
    def tracked() -> None:
        seen.append(app.result(current_id()).state)

    @app.task(name="untracked")
    def untracked() -> None:
        seen.append(app.result(current_id()).state)

    tracked.delay()
    untracked.delay()
    app.drain()
    assert sorted(seen) == [states.PENDING, states.STARTED]
    app.close()


def current_id() -> str:
    from streamtasks import current_task

    task = current_task()
    assert task is not None
    return task.request.id


def test_track_pending_writes_pending_on_send_and_never_over_the_end() -> None:
    app = _app(track_pending=True)

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    result = add.delay(1, 2)
    meta = result.meta()
    assert meta is not None and meta.state == states.PENDING and meta.name == "add"
    app.drain()
    assert result.get(timeout=1) == 3
    # a PENDING written late (a slow write, a re-send) leaves the final row final
    app.backend.mark_progress(result.id, states.PENDING, 0, "add", "default").result()
    assert result.state == states.SUCCESS
    app.close()


def test_the_threshold_firing_as_the_task_ends_leaves_the_final_row() -> None:
    # Given a run whose threshold passes in the same turn as it ends
    backend = MemoryBackend()
    writer = ProgressWriter(backend, "w", after_s=0.0001, track_started=False)
    msg = TaskMessage(id="t1", name="n", queue="q")
    run = writer.track(msg, task_tracks_started=False)
    assert run is not None
    writer.started(run)
    time.sleep(0.002)
    from streamtasks.backend.base import TaskMeta

    backend.store(TaskMeta("t1", states.SUCCESS, name="n", queue="q", attempts=1)).result()
    # When the STARTED write lands after the final row
    writer.write_due()
    # Then the row is still final, and a finished run writes nothing more
    assert (backend.fetch("t1") or TaskMeta("t1", "")).state == states.SUCCESS
    run2 = writer.track(TaskMessage(id="t2", name="n", queue="q"), False)
    assert run2 is not None
    writer.started(run2)
    run2.finished = True
    time.sleep(0.002)
    calls = backend.store_calls
    writer.write_due()
    assert backend.store_calls == calls and backend.fetch("t2") is None


def test_a_failed_progress_write_is_logged_and_the_task_still_succeeds(
    app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    @app.task(name="tracked", track_started=True)
    def tracked() -> int:
        return 1

    backend = app.backend
    assert isinstance(backend, MemoryBackend)
    result = tracked.delay()
    backend.fail_writes(1)  # the STARTED write
    app.drain()
    assert result.get(timeout=1) == 1
    assert "progress row not written" in capsys.readouterr().err


def test_negative_threshold_is_refused() -> None:
    from streamtasks import ConfigError

    with pytest.raises(ConfigError, match="track_started_after_ms"):
        Settings(broker="memory://", backend="memory://", track_started_after_ms=-1)
