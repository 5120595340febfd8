"""Delivery promises of the worker on memory:// (issue 9), checked from outside.

Tasks count their own runs; rows are read with ``app.backend.fetch``; committed offsets
are read through a worker's own consumer and compared with the broker's high
watermarks. Workers are stepped in this thread (``Worker._step``) unless a test is about
``Worker.run``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import structlog

from streamtasks import App, Settings, chain, states
from streamtasks.backend.base import TaskMeta
from streamtasks.broker.base import TopicPartition
from streamtasks.broker.memory import MemoryBroker
from streamtasks.errors import BackendError, ConfigError
from streamtasks.worker import consumer as consumer_module
from streamtasks.worker.consumer import Worker
from streamtasks.worker.deadletter import ERROR_MESSAGE, REASON
from streamtasks.worker.delayer import DelayForwarder
from streamtasks.worker.flows import FollowUps

NS = "ns"
PARTITIONS = 3


def make_app(**settings: Any) -> App:
    values: dict[str, Any] = {
        "broker": "memory://", "backend": "memory://", "namespace": NS,
        "partitions": PARTITIONS, "commit_interval_s": 0.0, "run_delayer": False,
        "delay_tiers": "50ms,200ms", "shutdown_grace_s": 2.0,
    }
    values.update(settings)
    return App("delivery", settings=Settings(**values))


@pytest.fixture
def app() -> Iterator[App]:
    application = make_app()
    yield application
    application.close()


class Runs:
    """Thread-safe count of runs per task argument, and the thread of each run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[int] = Counter()
        self.threads: dict[int, list[threading.Thread]] = {}

    def add(self, i: int) -> int:
        with self._lock:
            self.counts[i] += 1
            self.threads.setdefault(i, []).append(threading.current_thread())
            return self.counts[i]


def key_for(partition: int) -> str:
    """A task key whose records land in ``partition`` (memory broker: crc32 % count)."""
    n = 0
    while zlib.crc32(f"k{n}".encode()) % PARTITIONS != partition:
        n += 1
    return f"k{n}"


def step_until(cond: Callable[[], bool], *workers: Worker, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for worker in workers:
            worker._step(0.01)
        if cond():
            return
    raise AssertionError(f"condition not met within {timeout_s}s")


def lag(app: App, worker: Worker) -> dict[TopicPartition, int]:
    """Records not committed by the worker's groups, per partition of its queues."""
    out = {}
    for rt in worker.runtimes:
        tps = [TopicPartition(t, p) for t in rt.topics
               for p in range(app.broker.partition_count(t))]
        committed = rt.consumer.committed(tps)
        for tp in tps:
            low, high = app.broker.watermarks(tp)
            position = committed[tp]
            out[tp] = high - (low if position is None else position)
    return out


def no_lag(app: App, worker: Worker) -> bool:
    return not any(lag(app, worker).values())


def dlq(app: App, queue: str = "default") -> list[Any]:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker.records(app.settings.dlq_topic(queue))


def row(app: App, task_id: str) -> TaskMeta:
    meta = app.backend.fetch(task_id)
    assert meta is not None, f"no row for {task_id}"
    return meta


# -- 1. groups follow the queue --------------------------------------------------------


def test_groups_follow_the_queue_not_the_queue_set(app: App) -> None:
    runs, mails = Runs(), Runs()

    @app.task(name="work")
    def work(i: int) -> int:
        runs.add(i)
        return i

    @app.task(name="mail", queue="emails")
    def mail(i: int) -> int:
        mails.add(i)
        return i

    a = Worker(app, ["default"], name="A")
    b = Worker(app, ["default", "emails"], name="B")
    assert a.group_ids == [f"{NS}.default"]
    assert b.group_ids == [f"{NS}.default", f"{NS}.emails"]
    forwarder = DelayForwarder(app, ["default", "emails"])
    assert forwarder.group_ids == [f"{NS}.default.delayer", f"{NS}.emails.delayer"]
    assert DelayForwarder(app, ["default"]).group_ids == [f"{NS}.default.delayer"]
    try:
        # Given A alone in the group of "default", with records queued
        a.start()
        a._step(0.01)
        results = [work.delay(i) for i in range(200)]
        mail_results = [mail.delay(i) for i in range(20)]
        app.flush()
        a._step(0.01)
        # When B (another queue set) joins and both are stepped in turn
        b.start()
        step_until(lambda: a._idle() and b._idle(), a, b)
        # Then they shared "default" as members of one group, and ran each task once
        share_a, share_b = a.runtimes[0].assigned, b.runtimes[0].assigned
        assert share_a and share_b and not share_a & share_b
        assert len(share_a | share_b) == PARTITIONS
        assert runs.counts == Counter(range(200))
        assert mails.counts == Counter(range(20))
        assert all(row(app, r.id).state == states.SUCCESS for r in results + mail_results)
        assert no_lag(app, a) and no_lag(app, b)
    finally:
        a.close()
        b.close()


# -- 2. revoke repeats nothing -----------------------------------------------------------


@pytest.fixture
def writes(app: App, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str]]:
    """Every row write: (task id, worker, state)."""
    seen: list[tuple[str, str | None, str]] = []
    original = app.backend.store

    def store(meta: TaskMeta) -> Any:
        seen.append((meta.task_id, meta.worker, meta.state))
        return original(meta)

    monkeypatch.setattr(app.backend, "store", store)
    return seen


def test_a_revoke_drops_queued_records_and_repeats_nothing(
    app: App, writes: list[tuple[str, str | None, str]]
) -> None:
    runs = Runs()
    gate, blocked = threading.Event(), threading.Event()

    @app.task(name="work")
    def work(i: int) -> int:
        runs.add(i)
        if i == 0:
            blocked.set()
            assert gate.wait(10)
        return i

    a = Worker(app, ["default"], concurrency=1, name="A")
    b = Worker(app, ["default"], concurrency=4, name="B")
    lost = TopicPartition(app.settings.topic("default"), 1)  # A keeps 0 and 2
    try:
        # Given A (one task at a time) blocked in a record of partition 0
        a.start()
        first = work.apply_async([0], key=key_for(0))
        app.flush()
        step_until(blocked.is_set, a)
        # and 30 more records queued behind it, 10 in each partition
        results = {i: work.apply_async([i], key=key_for(i % 3)) for i in range(1, 31)}
        results[0] = first
        app.flush()
        step_until(lambda: a.stats["received"] == 31, a)
        # When B joins: partition 1 moves to B while A's task still blocks
        b.start()
        a._step(0.01)
        assert a.runtimes[0].assigned == {
            TopicPartition(lost.topic, 0), TopicPartition(lost.topic, 2)}
        moved = [i for i in results if i % 3 == 1]
        step_until(lambda: all(runs.counts[i] == 1 for i in moved), a, b)
        gate.set()
        step_until(lambda: len(runs.counts) == 31 and a._idle() and b._idle(), a, b)
        step_until(lambda: a.stats["dropped"] == len(moved), a)
        # Then every task ran exactly once; the moved ones on B, never on A
        assert runs.counts == Counter(range(31))
        a_threads = set(a.executor._threads)
        assert not [i for i in moved if runs.threads[i][0] in a_threads]
        # and A wrote no row of a record of the partition it lost
        moved_ids = {results[i].id for i in moved}
        assert not [w for w in writes if w[0] in moved_ids and w[1] == "A"]
        for i, result in results.items():
            meta = row(app, result.id)
            assert meta.state == states.SUCCESS
            assert meta.worker == ("B" if i in moved else "A")
        assert no_lag(app, a) and no_lag(app, b)
    finally:
        gate.set()
        a.close()
        b.close()


def test_a_late_outcome_of_a_lost_partition_is_dropped() -> None:
    app = make_app(shutdown_grace_s=0.2)
    writes: list[tuple[str, str | None, str]] = []
    original = app.backend.store

    def store(meta: TaskMeta) -> Any:
        writes.append((meta.task_id, meta.worker, meta.state))
        return original(meta)

    app.backend.store = store  # type: ignore[method-assign]
    runs = Runs()
    gate, blocked = threading.Event(), threading.Event()

    @app.task(name="work")
    def work(i: int) -> int:
        if runs.add(i) == 1 and i == 0:
            blocked.set()
            assert gate.wait(10)
        return i

    a = Worker(app, ["default"], concurrency=1, name="A")
    b = Worker(app, ["default"], concurrency=4, name="B")
    try:
        # Given A running a record of partition 1 that outlasts the grace period
        a.start()
        results = {0: work.apply_async([0], key=key_for(1))}
        app.flush()
        step_until(blocked.is_set, a)
        results.update({i: work.apply_async([i], key=key_for(i % 3)) for i in range(1, 10)})
        app.flush()
        step_until(lambda: a.stats["received"] == 10, a)
        # When B joins, partition 1 moves: A gives it up after the grace period
        b.start()
        a._step(0.01)
        assert TopicPartition(app.settings.topic("default"), 1) not in a.runtimes[0].assigned
        moved = [0] + [i for i in results if i % 3 == 1]

        def b_wrote_the_blocked_row() -> bool:
            meta = app.backend.fetch(results[0].id)
            return meta is not None and meta.worker == "B"

        # B runs the partition again from its committed offset, the blocked record too
        step_until(lambda: b_wrote_the_blocked_row()
                   and all(runs.counts[i] >= 1 for i in moved), b)
        # Then A's late outcome is dropped: nothing written over B's row
        gate.set()
        step_until(lambda: a.stats["dropped"] == len(moved), a, b)
        step_until(lambda: a._idle() and b._idle(), a, b)
        moved_ids = {results[i].id for i in moved}
        assert not [w for w in writes if w[0] in moved_ids and w[1] == "A"]
        first = row(app, results[0].id)
        assert first.state == states.SUCCESS and first.worker == "B"
        # Only the record that ran past the grace period ran twice.
        assert runs.counts == Counter({**dict.fromkeys(range(10), 1), 0: 2})
        assert no_lag(app, a) and no_lag(app, b)
    finally:
        gate.set()
        a.close()
        b.close()
        app.close()


# -- 3. a poison outcome does not freeze its partition ---------------------------------


def test_a_poison_error_message_fails_the_task_and_its_key_moves_on(app: App) -> None:
    runs = Runs()

    @app.task(name="poison")
    def poison(i: int) -> int:
        runs.add(i)
        if i == 0:
            raise ValueError("bad \udcff name")
        return i

    results = [poison.apply_async([i], key="same") for i in range(10)]
    worker = Worker(app, ["default"])
    try:
        worker.run_until_idle(5)
        meta = row(app, results[0].id)
        assert meta.state == states.FAILURE
        assert meta.error_type == "ValueError"
        assert meta.error_message == "bad \\udcff name"
        assert meta.traceback is not None
        meta.traceback.encode("utf-8")  # sanitised too
        [dead] = dlq(app)
        assert dead.headers[REASON] == b"task-failed"
        assert dead.headers[ERROR_MESSAGE] == b"bad \\udcff name"
        for i, result in enumerate(results[1:], 1):
            assert row(app, result.id).state == states.SUCCESS
            assert row(app, result.id).result == i
        assert runs.counts == Counter(range(10))
        assert no_lag(app, worker)
    finally:
        worker.close()


POISONED = "poisoned-0"


def _run_with_a_poisoned_first_task(
    app: App, fails: bool = False, retries: int = 0
) -> tuple[Worker, list[Any], Runs]:
    """Send 8 tasks of one key (the first one poisoned) and run until committed."""
    runs = Runs()

    @app.task(name="victim", max_retries=retries, backoff="fixed", backoff_s=0.01)
    def victim(i: int) -> int:
        runs.add(i)
        if fails and i == 0:
            raise ValueError("the first one fails")
        return i

    results = [victim.apply_async([i], key="same", task_id=POISONED if i == 0 else None)
               for i in range(8)]
    app.flush()
    worker = Worker(app, ["default"])
    worker.start()
    step_until(lambda: no_lag(app, worker) and worker.outstanding == 0, worker)
    return worker, results, runs


def _others_succeeded(app: App, results: list[Any], runs: Runs) -> None:
    for i, result in enumerate(results[1:], 1):
        assert row(app, result.id).state == states.SUCCESS
        assert runs.counts[i] == 1


def test_follow_ups_that_raise_fail_the_task_visibly(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FollowUps.after_success

    def after_success(self: FollowUps, msg: Any, result: Any, claimer: str) -> Any:
        if msg.args == [0]:
            raise RuntimeError("follow-ups exploded")
        return original(self, msg, result, claimer)

    monkeypatch.setattr(FollowUps, "after_success", after_success)
    worker, results, runs = _run_with_a_poisoned_first_task(app)
    try:
        meta = row(app, results[0].id)
        assert meta.state == states.FAILURE
        assert meta.error_type == "RuntimeError"
        assert [r.headers[REASON] for r in dlq(app)] == [b"effect-failed"]
        assert runs.counts[0] == 1
        _others_succeeded(app, results, runs)
    finally:
        worker.close()


def test_dead_letter_headers_that_raise_do_not_stop_the_worker(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        raise RuntimeError("headers exploded")

    # Regression: the dead-letter step was built outside any guard in Worker._give_up,
    # so this error escaped the worker loop.
    monkeypatch.setattr(consumer_module, "dead_letter_headers", broken)
    worker, results, runs = _run_with_a_poisoned_first_task(app, fails=True)
    try:
        assert runs.counts[0] == 1
        meta = app.backend.fetch(results[0].id)
        assert meta is not None and meta.state == states.FAILURE
        _others_succeeded(app, results, runs)
    finally:
        worker.close()


def test_a_store_that_raises_synchronously_lets_the_record_go(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = app.backend.store
    refused: list[str] = []

    def store(meta: TaskMeta) -> Any:
        if meta.task_id == POISONED:
            refused.append(meta.state)
            raise TypeError("cannot store this row")
        return original(meta)

    monkeypatch.setattr(app.backend, "store", store)
    with structlog.testing.capture_logs() as logs:
        worker, results, runs = _run_with_a_poisoned_first_task(app)
    try:
        # Its SUCCESS row is refused (in its batch, then alone), then the FAILURE row
        # that was to replace it
        assert refused[-1] == states.FAILURE
        assert set(refused[:-1]) == {states.SUCCESS}
        assert runs.counts[0] == 1
        # Its row cannot be written at all: it is let go, loudly
        assert app.backend.fetch(results[0].id) is None
        assert [e for e in logs if e["log_level"] == "error" and "let go" in e["event"]
                and e.get("id") == results[0].id]
        _others_succeeded(app, results, runs)
    finally:
        worker.close()


@pytest.mark.parametrize("failing", [".delay.", ".dlq"])
def test_a_send_that_raises_unicode_error_ends_the_task(
    app: App, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # ".delay.": the retry cannot be sent (the task fails, dead-lettered);
    # ".dlq": not even the dead letter can be sent (the task fails, let go).
    broker = app.broker
    original = broker.send

    def send(topic: str, value: bytes, **kwargs: Any) -> None:
        if failing in topic:
            raise UnicodeError("cannot encode a header")
        original(topic, value, **kwargs)

    monkeypatch.setattr(broker, "send", send)
    retries = 1 if failing == ".delay." else 0
    worker, results, runs = _run_with_a_poisoned_first_task(app, fails=True, retries=retries)
    try:
        meta = row(app, results[0].id)
        assert meta.state == states.FAILURE
        assert meta.error_type == "UnicodeError"
        assert runs.counts[0] == 1
        reasons = [r.headers[REASON] for r in dlq(app)]
        assert reasons == ([b"effect-failed"] if failing == ".delay." else [])
        _others_succeeded(app, results, runs)
    finally:
        worker.close()


def test_failed_sends_of_follow_ups_are_retried_and_nothing_repeats(app: App) -> None:
    runs = Runs()

    @app.task(name="inc")
    def inc(i: int) -> int:
        runs.add(i)
        return i + 1

    result = chain(inc.s(0), inc.s(), inc.s()).apply_async()
    app.flush()
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    broker.fail_next_sends(3, "broker unreachable")
    worker = Worker(app, ["default"])
    try:
        worker.run_until_idle(5)
        assert result.get(timeout=1) == 3
        assert runs.counts == Counter([0, 1, 2])
        assert [row(app, step.id).state for step in result.steps] == [states.SUCCESS] * 3
        assert not dlq(app)
        assert worker.stats["succeeded"] == 3
        assert no_lag(app, worker)
    finally:
        worker.close()


def test_failed_row_writes_are_retried_and_the_task_runs_once(app: App) -> None:
    runs = Runs()

    @app.task(name="once")
    def once(i: int) -> int:
        runs.add(i)
        return i

    result = once.delay(5)
    app.flush()
    backend = app.backend
    backend.fail_writes(3, BackendError("cassandra down"))  # type: ignore[attr-defined]
    worker = Worker(app, ["default"])
    try:
        worker.run_until_idle(5)
        assert backend.store_calls == 4  # type: ignore[attr-defined]
        assert row(app, result.id).state == states.SUCCESS
        assert runs.counts == Counter([5])
        assert not dlq(app)
        assert no_lag(app, worker)
    finally:
        worker.close()


# -- 4. the delay forwarder is supervised -------------------------------------------------


def _run_in_thread(worker: Worker) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["code"] = worker.run(install_signals=False)
        except BaseException as err:  # reported by the test
            out["error"] = err

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    return thread, out


class _OwnedWrites:
    """Stands for a backend whose writes end only when the thread owning them pumps."""

    def __init__(self, app: App) -> None:
        self.backend = app.backend
        self.store_one = self.backend.store  # the memory backend's own, written at once
        self.held: list[tuple[list[Future[None]], Future[None]]] = []
        self.owner: str | None = None
        self.pumps: list[str] = []
        self.released = threading.Event()

    def own_writes(self) -> bool:
        self.owner = threading.current_thread().name
        return True

    def store(self, meta: TaskMeta) -> Future[None]:
        return self.store_many_held([meta])

    def store_many_held(self, metas: Any) -> Future[None]:
        held: Future[None] = Future()
        self.held.append(([self.store_one(meta) for meta in metas], held))
        return held

    def pump_writes(self, timeout_s: float = 0.0) -> None:
        self.pumps.append(threading.current_thread().name)
        held, self.held = self.held, []
        for written, future in held:
            for one in written:
                one.result(5)
            future.set_result(None)

    def release_writes(self) -> None:
        self.released.set()


def test_a_worker_owning_its_writes_pumps_them_on_its_loop_thread_and_releases_them(
    app: App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    owned = _OwnedWrites(app)
    for name in ("own_writes", "store", "pump_writes", "release_writes"):
        monkeypatch.setattr(app.backend, name, getattr(owned, name))
    monkeypatch.setattr(app.backend, "store_many", owned.store_many_held)
    runs = Runs()

    @app.task(name="owned")
    def owned_task(i: int) -> int:
        runs.add(i)
        return i

    results = [owned_task.delay(i) for i in range(300)]
    app.flush()
    worker = Worker(app, ["default"], max_in_flight=50)  # full at times: waits by pumping
    thread, out = _run_in_thread(worker)
    try:
        deadline = time.monotonic() + 10
        def settled() -> bool:
            return worker.runtimes[0].started and no_lag(app, worker)

        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert settled(), "the owned writes never ended: offsets did not move"
        assert [row(app, r.id).state for r in results] == [states.SUCCESS] * 300
        assert runs.counts == Counter(range(300))
        assert owned.owner == "test-worker" and set(owned.pumps) == {"test-worker"}
        assert not owned.released.is_set(), "released while the worker still runs"
    finally:
        worker.stop()
        thread.join(10)
    assert out.get("code") == 0, out
    assert owned.released.is_set(), "the worker stopped without releasing its writes"


def test_a_failing_forwarder_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(run_delayer=True, shutdown_grace_s=1.0)
    ran: list[str] = []

    @app.task(name="later")
    def later() -> str:
        ran.append("later")
        return "done"

    original = DelayForwarder.step
    forwarders: list[DelayForwarder] = []
    recovered = threading.Event()

    def step(self: DelayForwarder, timeout_s: float) -> None:
        if self not in forwarders:
            forwarders.append(self)
        if len(forwarders) == 1:
            raise RuntimeError("forwarder exploded")
        original(self, timeout_s)
        recovered.set()

    monkeypatch.setattr(DelayForwarder, "step", step)
    worker = Worker(app, ["default"])
    thread, out = _run_in_thread(worker)
    try:
        # Given a forwarder that failed on its first step, restarted by the worker
        assert recovered.wait(5), out
        # When a countdown task is sent afterwards
        result = later.apply_async(countdown_s=0.05)
        app.flush()
        # Then it still runs
        assert result.get(timeout=5) == "done"
    finally:
        worker.stop()
        thread.join(10)
        app.close()
    assert not thread.is_alive()
    assert out == {"code": 0}
    assert len(forwarders) == 2
    assert ran == ["later"]


def test_a_forwarder_that_keeps_failing_stops_the_worker_non_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app(run_delayer=True, shutdown_grace_s=1.0)

    @app.task(name="noop")
    def noop() -> None:
        return None

    monkeypatch.setattr(consumer_module, "_FORWARDER_RESTARTS", 1)
    forwarders: list[DelayForwarder] = []

    def step(self: DelayForwarder, timeout_s: float) -> None:
        if self not in forwarders:
            forwarders.append(self)
        raise RuntimeError("forwarder exploded")

    monkeypatch.setattr(DelayForwarder, "step", step)
    worker = Worker(app, ["default"])
    thread, out = _run_in_thread(worker)
    thread.join(8)
    try:
        assert not thread.is_alive(), "the worker kept running without its forwarder"
        assert out == {"code": 1}
        assert len(forwarders) == 2  # restarted once, then gave up
    finally:
        worker.stop()
        thread.join(5)
        app.close()


# -- 5. a failed asynchronous commit is retried ---------------------------------------------


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_a_failed_asynchronous_commit_is_retried(interval_s: float) -> None:
    # Given the next two commits fail (with the interval at 0, or so long that only the
    # commits of a worker with nothing in flight go out)
    app = make_app(commit_interval_s=interval_s)
    runs = Runs()

    @app.task(name="work")
    def work(i: int) -> int:
        runs.add(i)
        return i

    results = [work.delay(i) for i in range(12)]
    app.flush()
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    broker.fail_next_commits(2)
    worker = Worker(app, ["default"])
    worker.start()
    try:
        step_until(lambda: len(runs.counts) == 12 and worker.outstanding == 0
                   and not worker.effects.active, worker)
        assert all(row(app, r.id).state == states.SUCCESS for r in results)
        # Then the asynchronous commits (Worker._step; no synchronous one of idle())
        # are sent again until the group has no lag
        step_until(lambda: no_lag(app, worker), worker, timeout_s=2.0)
        assert broker._failing_commits == 0  # both failures were met
        assert runs.counts == Counter(range(12))
    finally:
        worker.close()
        app.close()


# -- 7. an async task's own TimeoutError --------------------------------------------------


def test_an_async_tasks_own_timeout_error_is_not_a_time_limit() -> None:
    app = make_app(run_delayer=True)
    tries: list[str] = []

    @app.task(name="own_timeout", time_limit_s=5)
    async def own_timeout() -> None:
        tries.append("own_timeout")
        await asyncio.wait_for(asyncio.sleep(1), 0.01)  # the task's own timeout

    @app.task(name="no_limit")
    async def no_limit() -> None:
        raise TimeoutError("upstream did not answer")

    @app.task(name="flaky_io", time_limit_s=5, max_retries=2, backoff="fixed",
              backoff_s=0.01, retry_on=(TimeoutError,))
    async def flaky_io() -> str:
        tries.append("flaky_io")
        if tries.count("flaky_io") == 1:
            raise TimeoutError("first try timed out")
        return "answered"

    @app.task(name="overrun", time_limit_s=0.05)
    async def overrun() -> None:
        await asyncio.sleep(5)

    own, plain, flaky, slow = (own_timeout.delay(), no_limit.delay(), flaky_io.delay(),
                               overrun.delay())
    worker = Worker(app, ["default"])
    started = time.monotonic()
    try:
        worker.run_until_idle(5)
    finally:
        worker.close()
        app.close()
    assert time.monotonic() - started < 4  # the overrun was cut short
    for result, error_type in [(own, "TimeoutError"), (plain, "TimeoutError"),
                               (slow, "TimeLimitExceeded")]:
        meta = row(app, result.id)
        assert (meta.state, meta.error_type) == (states.FAILURE, error_type)
    assert "upstream did not answer" in (row(app, plain.id).error_message or "")
    retried = row(app, flaky.id)
    assert (retried.state, retried.attempts, retried.result) == (states.SUCCESS, 2, "answered")
    assert tries.count("flaky_io") == 2 and tries.count("own_timeout") == 1


def test_a_revoke_lets_a_queued_record_below_a_finished_one_run(app: App) -> None:
    # A record queued behind its ordered key, below a record of another key that already
    # finished: dropping it on revoke would stop the committed offset below it, and the
    # next owner would run the finished one again.
    runs = Runs()
    gate, blocked = threading.Event(), threading.Event()

    @app.task(name="keyed", ordered=True)
    def keyed(i: int) -> int:
        runs.add(i)
        if i == 0:
            blocked.set()
            assert gate.wait(10)
        return i

    a = Worker(app, ["default"], concurrency=2, name="A")
    b = Worker(app, ["default"], concurrency=2, name="B")
    lost = 1  # with two members, A keeps partitions 0 and 2
    same = key_for(lost)
    try:
        # Given A running record 0 (key K, blocked), record 1 (key K) waiting behind
        # it, and record 2 (another key, same partition) finished
        a.start()
        results = [keyed.apply_async([0], key=same)]
        app.flush()
        step_until(blocked.is_set, a)
        results.append(keyed.apply_async([1], key=same))
        app.flush()
        step_until(lambda: a.stats["received"] == 2, a)
        results.append(keyed.apply_async([2], key=_other_key_in(lost, same)))
        app.flush()
        step_until(lambda: runs.counts[2] == 1 and row(app, results[2].id).ready, a)
        assert runs.counts[1] == 0
        # When B joins and partition 1 moves while record 0 still runs (it ends
        # during A's revoke wait)
        threading.Timer(0.3, gate.set).start()
        b.start()
        a._step(0.01)
        step_until(lambda: a._idle() and b._idle(), a, b)
        # Then record 1 ran on A within the grace, and nothing ran twice
        assert runs.counts == Counter({0: 1, 1: 1, 2: 1})
        assert [row(app, r.id).worker for r in results] == ["A", "A", "A"]
        assert no_lag(app, a) and no_lag(app, b)
    finally:
        gate.set()
        a.close()
        b.close()


def _other_key_in(partition: int, not_key: str) -> str:
    """A key other than ``not_key`` whose records land in ``partition``."""
    n = 0
    while f"k{n}" == not_key or zlib.crc32(f"k{n}".encode()) % PARTITIONS != partition:
        n += 1
    return f"k{n}"


def test_a_worker_refuses_to_start_on_a_result_store_without_its_schema(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.backend, "pending_migrations", lambda: ["004_group_settled"])
    worker = Worker(app, ["default"])
    with pytest.raises(ConfigError, match="run `streamtasks migrate`"):
        worker.start()


def test_a_worker_starts_when_the_result_store_cannot_be_checked_now(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> list[str]:
        raise BackendError("Cassandra at 127.0.0.1:1 is not reachable")

    monkeypatch.setattr(app.backend, "pending_migrations", down)
    worker = Worker(app, ["default"])
    try:
        worker.start()  # writes are retried until the store is back
        assert all(rt.started for rt in worker.runtimes)
    finally:
        worker.close()


# -- 8. a worker holds no more than max_in_flight records -----------------------------------


def test_a_worker_whose_writes_stall_takes_no_more_than_max_in_flight() -> None:
    # Given a backlog of 200 tasks and result writes that stay unfinished for a while
    app = make_app(max_in_flight=20)
    runs = Runs()

    @app.task(name="work")
    def work(i: int) -> int:
        runs.add(i)
        return i

    results = [work.delay(i) for i in range(200)]
    app.flush()
    original = app.backend.store
    held: list[tuple[TaskMeta, Future[None]]] = []
    lock = threading.Lock()
    stalled = True

    def store(meta: TaskMeta) -> Future[None]:
        with lock:
            if stalled:
                future: Future[None] = Future()
                held.append((meta, future))
                return future
        return original(meta)

    app.backend.store = store  # type: ignore[method-assign]
    worker = Worker(app, ["default"], concurrency=4)
    worker.start()
    try:
        # When the worker turns for half a second while no row becomes durable
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            worker._step(0.01)
            # Then it never holds more than max_in_flight records (before the fix it
            # took one more each turn while full: hundreds over the limit)
            assert worker.stats["received"] <= 20
        step_until(lambda: worker.stats["received"] == 20, worker)
        assert worker.stats["received"] == 20
        # And once the writes complete, every task of the backlog runs once
        with lock:
            stalled = False
            waiting = list(held)
        for meta, future in waiting:
            original(meta).result(5)
            future.set_result(None)
        step_until(lambda: len(runs.counts) == 200 and no_lag(app, worker), worker,
                   timeout_s=30.0)
        assert runs.counts == Counter(range(200))
        assert all(row(app, r.id).state == states.SUCCESS for r in results)
    finally:
        worker.close()
        app.close()
