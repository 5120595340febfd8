"""The backend URL's ``writer`` option and the acsylla writer's error mapping (no server)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from streamtasks import Settings
from streamtasks.backend.base import TaskMeta
from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.backend.cassandra.errors import backend_error
from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter, as_backend_error, driver_log
from streamtasks.backend.cassandra.rows import InFlightSlots, TaskRows
from streamtasks.errors import BackendError, ConfigError
from streamtasks.worker.effects import is_transient


def test_the_writer_defaults_to_acsylla_and_cassandra_driver_is_a_choice() -> None:
    assert CassandraOptions.from_url("cassandra://db:9042/ks", Settings()).writer == "acsylla"
    options = CassandraOptions.from_url("cassandra://db:9042/ks?writer=cassandra-driver",
                                        Settings())
    assert options.writer == "cassandra-driver"


def test_without_acsylla_the_default_writer_is_cassandra_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "acsylla", None)  # import acsylla raises ImportError
    assert CassandraOptions.from_url("cassandra://db:9042/ks", Settings()).writer == (
        "cassandra-driver")


@pytest.mark.parametrize(("level", "text", "logged_at"), [
    ("ERROR", "Could not retrieve sharding info from connection to 127.0.0.1. Continuing",
     logging.DEBUG),
    ("ERROR", "Unable to connect to host 127.0.0.9", logging.ERROR),
    ("CRITICAL", "out of memory", logging.ERROR),
    ("WARN", "Lost connection to host 127.0.0.2", logging.WARNING),
    ("INFO", "===== Using optimized driver!!! =====\n", logging.DEBUG),
])
def test_the_c_drivers_lines_are_logged_at_their_level_except_the_benign_ones(
    caplog: pytest.LogCaptureFixture, level: str, text: str, logged_at: int,
) -> None:
    message = SimpleNamespace(log_level=level, message=text)
    with caplog.at_level(logging.DEBUG, logger="streamtasks.backend.acsylla"):
        driver_log(message)
    (record,) = caplog.records
    assert record.levelno == logged_at
    assert record.getMessage() == f"cassandra C/C++ driver: {text.strip()}"


def test_an_unknown_writer_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="writer 'rust' is not one of acsylla, cassandra-driver"):
        CassandraOptions.from_url("cassandra://db:9042/ks?writer=rust", Settings())


def test_writer_acsylla_without_acsylla_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "acsylla", None)  # import acsylla raises ImportError
    with pytest.raises(ConfigError, match=r"writer=acsylla needs the acsylla package.*"
                                          r"streamtasks\[fast\]"):
        CassandraOptions.from_url("cassandra://db:9042/ks?writer=acsylla", Settings())


def _acsylla_error(name: str, text: str) -> BaseException:
    import acsylla

    return getattr(acsylla.errors, name)(text)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "transient", "hint"), [
    ("CassErrorServerWriteTimeout", True, "did not answer in time"),
    ("CassErrorServerUnavailable", True, "not enough live replicas"),
    ("CassErrorLibRequestTimedOut", True, "timed out after"),
    ("CassErrorLibNoHostsAvailable", True, "no host available"),
    ("CassErrorServerInvalidQuery", False, "invalid"),
    ("CassErrorServerSyntaxError", False, "invalid"),
])
def test_acsylla_errors_read_and_classify_like_the_drivers(
    name: str, transient: bool, hint: str,
) -> None:
    options = CassandraOptions.from_url("cassandra://db:9042/ks?writer=acsylla", Settings())
    error = as_backend_error(_acsylla_error(name, "boom"), "storing task t1", options)
    assert isinstance(error, BackendError)
    assert "storing task t1" in str(error) and "db:9042" in str(error)
    assert hint in str(error).lower()
    assert is_transient(error) is transient


class _FakeSession:
    """acsylla's Session as the writer uses it; ``execute`` waits ``write_s`` per write."""

    def __init__(self, cluster: _FakeCluster) -> None:
        self.cluster = cluster
        self.rows: list[list[object]] = []
        self.sent: list[_FakeBound | _FakeBatch] = []  # every statement executed, in order
        self.closed = False

    async def create_prepared(self, cql: str) -> _FakePrepared:
        self.cluster.prepares += 1
        if self.cluster.prepare_error is not None:
            raise self.cluster.prepare_error
        return _FakePrepared(self, cql)

    async def execute(self, bound: _FakeBound | _FakeBatch) -> None:
        if self.closed:  # as acsylla's, before sending anything
            raise RuntimeError("Session closed")
        self.cluster.writing.set()
        self.cluster.executes += 1
        self.sent.append(bound)
        try:
            await asyncio.sleep(self.cluster.write_s)
            if self.cluster.write_errors:
                raise self.cluster.write_errors.pop(0)
            if self.cluster.write_error is not None:
                raise self.cluster.write_error
        finally:  # where acsylla frees the driver's future
            self.cluster.freed += 1
        self.rows.append(bound.values)

    async def execute_batch(self, batch: _FakeBatch) -> None:
        assert isinstance(batch, _FakeBatch), "execute_batch takes a batch"
        await self.execute(batch)

    async def close(self) -> None:
        self.closed = True


class _FakePrepared:
    def __init__(self, session: _FakeSession, cql: str) -> None:
        self.session, self.cql = session, cql

    def bind(self, values: list[object] | None = None) -> _FakeBound:
        bound = _FakeBound()
        if values is not None:
            if self.session.cluster.bind_error is not None and values[0] == "bad":
                raise self.session.cluster.bind_error
            bound.bind_list(values)
        return bound


class _FakeBound:
    values: list[object]
    idempotent = False

    def set_is_idempotent(self, flag: bool) -> None:
        self.idempotent = flag

    def bind_list(self, values: list[object]) -> None:
        self.values = values


class _FakeBatch:
    """acsylla's unlogged Batch: the statements added to it."""

    def __init__(self) -> None:
        self.statements: list[_FakeBound] = []
        self.idempotent = False

    def set_is_idempotent(self, flag: bool) -> None:
        self.idempotent = flag

    def add_statement(self, statement: _FakeBound) -> None:
        self.statements.append(statement)

    @property
    def values(self) -> list[list[object]]:
        return [statement.values for statement in self.statements]


class _FakeCluster:
    """acsylla's Cluster: connecting takes a while; the first ``refuse`` connects fail."""

    def __init__(self, refuse: int = 0) -> None:
        self.sessions: list[_FakeSession] = []
        self.connects = 0
        self.refuse = refuse
        self.prepares = 0
        self.prepare_error: BaseException | None = None
        self.write_s = 0.0
        self.write_error: BaseException | None = None
        self.write_errors: list[BaseException] = []  # raised by the next writes, in turn
        self.executes = 0
        self.freed = 0  # writes whose coroutine ended (acsylla frees its future there)
        self.bind_error: BaseException | None = None  # raised binding a row whose id is "bad"
        self.options: dict[str, object] = {}
        self.writing = threading.Event()
        self.destroyed = False

    async def create_session(self, keyspace: str) -> _FakeSession:
        self.connects += 1
        await asyncio.sleep(0.05)  # connecting takes a while: other batches arrive meanwhile
        if self.connects <= self.refuse:
            raise _acsylla_error("CassErrorLibNoHostsAvailable", "No hosts available")
        session = _FakeSession(self)
        self.sessions.append(session)
        return session

    def destroy(self) -> None:
        self.destroyed = True


@pytest.fixture
def clusters(monkeypatch: pytest.MonkeyPatch) -> list[_FakeCluster]:
    """The fake clusters the writers of a test create (each a fresh one, refusing none)."""
    import acsylla

    made: list[_FakeCluster] = []

    def create_cluster(hosts: list[str], **kwargs: object) -> _FakeCluster:
        made.append(_FakeCluster(refuse=made[0].refuse if made else 0))
        made[-1].options = {"hosts": hosts, **kwargs}
        return made[-1]

    monkeypatch.setattr(acsylla, "create_cluster", create_cluster)
    monkeypatch.setattr(acsylla, "create_batch_unlogged", _FakeBatch)
    return made


class _Outcomes:
    """Collects what ``done`` was called with, per batch, and waits for a number of them."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.calls: dict[int, list[BaseException | None]] = {}

    def done(self, batch: int) -> Callable[[BaseException | None], None]:
        def call(error: BaseException | None) -> None:
            with self.lock:
                self.calls.setdefault(batch, []).append(error)
                self.lock.notify_all()
        return call

    def wait(self, batches: int, timeout_s: float = 10.0) -> dict[int, list[BaseException | None]]:
        with self.lock:
            self.lock.wait_for(lambda: len(self.calls) >= batches, timeout_s)
            return dict(self.calls)


def _writer(url: str = "cassandra://db:9042/ks") -> AcsyllaWriter:
    return AcsyllaWriter(CassandraOptions.from_url(url, Settings()), "INSERT task", "INSERT index")


_ROW = [0] * 21


def test_batches_arriving_while_the_writer_connects_share_one_session(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer()
    outcomes = _Outcomes()
    for n in range(5):
        writer.write([_ROW], [], "storing 1 task", outcomes.done(n))
    calls = outcomes.wait(5)
    writer.close()
    assert calls == {n: [None] for n in range(5)}
    (cluster,) = clusters
    assert len(cluster.sessions) == 1, f"{len(cluster.sessions)} sessions opened for one writer"
    assert len(cluster.sessions[0].rows) == 5 and cluster.sessions[0].closed


def test_a_batch_pending_at_close_is_waited_for(clusters: list[_FakeCluster]) -> None:
    writer = _writer()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))  # connects
    assert outcomes.wait(1) == {0: [None]}
    clusters[0].write_s = 0.3  # Cassandra takes a while to acknowledge the next batch
    writer.write([_ROW, _ROW], [], "storing 2 tasks", outcomes.done(1))
    writer.close(timeout_s=10)
    assert outcomes.wait(2, timeout_s=0).get(1) == [None], "close dropped a pending batch"
    assert clusters[0].sessions[0].closed and clusters[0].destroyed


def test_a_batch_still_pending_when_close_gives_up_fails_as_transient(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert outcomes.wait(1) == {0: [None]}
    clusters[0].write_s = 3600.0  # a node that never answers the next write
    clusters[0].writing.clear()
    writer.write([_ROW], [], "storing task t2", outcomes.done(1))
    assert clusters[0].writing.wait(10)
    writer.close(timeout_s=0.2)
    calls = outcomes.wait(2)
    assert calls[0] == [None]
    (error,) = calls[1]
    assert isinstance(error, BackendError), calls
    assert "storing task t2" in str(error) and "closed" in str(error)
    assert is_transient(error), "the worker must retry (or leave the offset), not dead-letter"
    assert clusters[0].freed == clusters[0].executes, "a write left waiting after close"


def test_every_write_racing_close_ends_once_or_is_refused() -> None:
    """Writes from another thread while the writer closes: none is left hanging."""
    import acsylla

    cluster = _FakeCluster()
    cluster.write_s = 0.002
    outcomes = _Outcomes()
    refused: list[int] = []
    started = threading.Event()

    def keep_writing(writer: AcsyllaWriter) -> None:
        for n in range(2000):
            try:
                writer.write([_ROW], [], f"storing task {n}", outcomes.done(n))
            except BackendError:
                refused.append(n)
                return
            if n == 50:
                started.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(acsylla, "create_cluster", lambda hosts, **kw: cluster)
        writer = _writer()
        thread = threading.Thread(target=keep_writing, args=(writer,))
        thread.start()
        assert started.wait(10)
        writer.close(timeout_s=0.05)
        thread.join(10)
    assert refused, "a write after close must be refused"
    calls = outcomes.wait(refused[0], timeout_s=10)
    assert sorted(calls) == list(range(refused[0])), "writes whose batch never ended"
    assert all(len(each) == 1 for each in calls.values()), "a batch ended twice"


def test_connect_attempts_share_one_cluster_and_batches_waiting_share_a_failure(
    clusters: list[_FakeCluster],
) -> None:
    import acsylla

    cluster = _FakeCluster(refuse=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(acsylla, "create_cluster", lambda hosts, **kw: clusters.append(cluster)
                      or cluster)
        writer = _writer()
        outcomes = _Outcomes()
        for n in range(5):  # all arrive while the first attempt connects
            writer.write([_ROW], [], f"storing task {n}", outcomes.done(n))
        calls = outcomes.wait(5)
        assert cluster.connects == 1, "batches waiting for a connect that failed retried it"
        for (error,) in calls.values():
            assert isinstance(error, BackendError) and is_transient(error)
            assert "no host available" in str(error)
        writer.write([_ROW], [], "storing task 5", outcomes.done(5))
        writer.write([_ROW], [], "storing task 6", outcomes.done(6))
        assert outcomes.wait(7)[5][0] is not None  # Cassandra still down at the second try
        writer.write([_ROW], [], "storing task 7", outcomes.done(7))  # back
        assert outcomes.wait(8)[7] == [None]
        writer.close()
    assert cluster.connects == 3 and len(cluster.sessions) == 1
    assert len(clusters) == 1, f"{len(clusters)} clusters built for one writer"
    assert cluster.destroyed and cluster.sessions[0].closed


def test_failed_connects_leave_no_file_descriptor_open() -> None:
    """A closed local port refuses at once: each failed connect must free what it opened."""
    writer = _writer("cassandra://127.0.0.1:9/ks")  # nothing listens on port 9
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert outcomes.wait(1)[0][0] is not None
    before = _open_fds()
    for n in range(1, 9):
        writer.write([_ROW], [], "storing 1 task", outcomes.done(n))
        assert outcomes.wait(n + 1)[n][0] is not None
    grown = _open_fds() - before
    writer.close()
    assert grown <= 2, f"{grown} file descriptors more after 8 failed connects"


def test_a_missing_table_fails_each_batch_for_good_on_one_session(
    clusters: list[_FakeCluster],
) -> None:
    import acsylla

    cluster = _FakeCluster()
    cluster.prepare_error = _acsylla_error("CassErrorServerInvalidQuery",
                                           "unconfigured table tasks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(acsylla, "create_cluster", lambda hosts, **kw: cluster)
        writer = _writer()
        outcomes = _Outcomes()
        for n in range(3):
            writer.write([_ROW], [], f"storing task {n}", outcomes.done(n))
            outcomes.wait(n + 1)
        cluster.prepare_error = None  # `streamtasks migrate` ran
        writer.write([_ROW], [], "storing task 3", outcomes.done(3))
        calls = outcomes.wait(4)
        writer.close()
    for n in range(3):
        (error,) = calls[n]
        assert isinstance(error, BackendError) and not is_transient(error)
        assert "streamtasks migrate" in str(error) and f"storing task {n}" in str(error)
    assert calls[3] == [None]
    assert len(cluster.sessions) == 1, "a session per failed prepare"


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_an_error_that_cannot_be_described_still_ends_its_batch(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))  # connects
    assert outcomes.wait(1) == {0: [None]}
    clusters[0].write_error = _Unprintable()
    writer.write([_ROW], [], "storing task t1", outcomes.done(1))
    calls = outcomes.wait(2)
    writer.close()
    (error,) = calls.get(1, [None])
    assert isinstance(error, BackendError) and "storing task t1" in str(error)
    assert "_Unprintable" in str(error)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


class _InstantWriter:
    """Stands for AcsyllaWriter in TaskRows: each batch is acknowledged on another thread."""

    def __init__(self, rows: TaskRows, max_in_flight: int) -> None:
        self.rows, self.max_in_flight = rows, max_in_flight
        self.raise_error: BaseException | None = None
        self.over_limit = False

    def owned_here(self) -> bool:
        return False  # its batches end on another thread: every caller takes slots

    def write(self, rows: list[object], batches: object, what: str,
              done: Callable[[BaseException | None], None]) -> None:
        if self.raise_error is not None:
            raise self.raise_error
        held = self.max_in_flight - self.rows._slots.free
        self.over_limit |= held > self.max_in_flight
        threading.Timer(0.001, done, args=(None,)).start()

    def close(self, timeout_s: float) -> None:
        pass


def _task_rows(max_in_flight: int) -> tuple[TaskRows, _InstantWriter]:
    options = CassandraOptions.from_url("cassandra://db:9042/ks?writer=acsylla", Settings())
    connection = SimpleNamespace(options=options, ks="ks", begin=lambda future, ready: ("s", 0),
                                 error=lambda err, what: backend_error(err, what, options))
    rows = TaskRows(connection, None, str, 0, max_in_flight)  # type: ignore[arg-type]
    writer = _InstantWriter(rows, max_in_flight)
    rows._fast = writer  # type: ignore[assignment]
    return rows, writer


def _metas(count: int) -> list[TaskMeta]:
    return [TaskMeta(task_id=f"t{i}", state="SUCCESS", name="n", queue="q", finished_ms=1000 + i)
            for i in range(count)]


def test_batches_stored_from_several_threads_never_deadlock_on_the_in_flight_slots() -> None:
    """Each batch wants every slot: two batches each holding some would wait forever."""
    rows, writer = _task_rows(max_in_flight=8)
    stuck: list[str] = []

    def store(thread: int) -> None:
        for n in range(40):
            future = rows.store_many(_metas(8))
            try:
                future.result(timeout=10)
            except Exception as err:  # a timeout: name the stuck batch
                stuck.append(f"thread {thread} batch {n}: {type(err).__name__}")
                return

    threads = [threading.Thread(target=store, args=(t,), daemon=True) for t in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as on a busy machine
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "threads blocked taking in-flight slots"
    assert not stuck and not writer.over_limit
    assert rows._slots.free == 8  # every slot given back


def test_in_flight_slots_are_taken_at_most_all_and_never_given_back_beyond_the_limit() -> None:
    slots = InFlightSlots(4)
    assert slots.take(10) == 4 and slots.free == 0  # a batch larger than the limit
    slots.give(3)
    with pytest.raises(ValueError, match="2 in-flight slots given back, only 1 are taken"):
        slots.give(2)
    slots.give(1)
    assert slots.free == 4


def test_a_batch_waiting_for_its_slots_is_not_overtaken_by_a_smaller_one() -> None:
    slots = InFlightSlots(4)
    slots.take(4)
    order: list[str] = []
    big_waits = threading.Event()

    def take(name: str, count: int) -> None:
        if name == "big":
            big_waits.set()
        slots.take(count)
        order.append(name)

    big = threading.Thread(target=take, args=("big", 3), daemon=True)
    big.start()
    assert big_waits.wait(10)
    assert _wait_for(lambda: slots._taking.locked())  # the big batch waits at the head
    small = threading.Thread(target=take, args=("small", 1), daemon=True)
    small.start()
    slots.give(1)  # enough for the small batch, not for the big one
    small.join(0.3)
    assert order == [], "the small batch took the slot the big one was waiting for"
    slots.give(3)
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and slots.free == 0


def test_a_writer_failing_to_take_a_batch_fails_its_future_and_gives_its_slots_back() -> None:
    rows, writer = _task_rows(max_in_flight=4)
    writer.raise_error = RuntimeError("Event loop is closed")
    future = rows.store_many(_metas(4))
    with pytest.raises(BackendError, match=r"storing 4 tasks.*Event loop is closed"):
        future.result(timeout=10)
    writer.raise_error = None
    done = threading.Event()
    threading.Thread(target=lambda: (rows.store_many(_metas(4)).result(10), done.set()),
                     daemon=True).start()
    assert done.wait(10), "the failed batch kept its in-flight slots"


def _interrupt() -> None:
    raise KeyboardInterrupt  # as a callback's SystemExit would, it ends run_forever


def test_a_loop_thread_that_dies_fails_its_batches_and_the_next_batch_restarts_it(
    clusters: list[_FakeCluster], caplog: pytest.LogCaptureFixture,
) -> None:
    writer = _writer()
    first = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", first.done(0))  # connects
    assert first.wait(1) == {0: [None]}
    clusters[0].write_s, clusters[0].writing = 3600.0, threading.Event()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing task t1", outcomes.done(0))
    assert clusters[0].writing.wait(10)
    with caplog.at_level(logging.ERROR, logger="streamtasks.backend.acsylla"):
        writer._loop.call_soon_threadsafe(_interrupt)  # type: ignore[union-attr]
        (error,) = outcomes.wait(1)[0]
    assert isinstance(error, BackendError) and is_transient(error)
    assert "storing task t1" in str(error) and "loop stopped" in str(error)
    assert "loop stopped (KeyboardInterrupt" in caplog.text
    writer.write([_ROW], [], "storing task t2", outcomes.done(1))  # a fresh loop and session
    assert outcomes.wait(2)[1] == [None]
    writer.close()
    assert len(clusters) == 2 and len(clusters[1].sessions[0].rows) == 1


def test_the_urls_hosts_timeouts_and_consistency_reach_the_c_driver(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer("cassandra://a:9142,b:9142/ks?connect_timeout=2.5&request_timeout=7"
                     "&consistency=QUORUM")
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert outcomes.wait(1) == {0: [None]}
    writer.close()
    import acsylla

    options = clusters[0].options
    assert options["hosts"] == ["a", "b"] and options["port"] == 9142
    assert (options["connect_timeout"], options["request_timeout"]) == (2.5, 7.0)
    assert options["consistency"] == acsylla.Consistency.QUORUM


@pytest.mark.parametrize(("errors", "executes", "fails"), [
    (["CassErrorServerWriteTimeout"], 2, None),  # timed out on the server: sent once more
    (["CassErrorServerWriteTimeout"] * 2, 2, "did not answer in time"),  # once only
    (["CassErrorLibRequestTimedOut"], 1, "timed out after"),  # the client's: not resent
    (["CassErrorServerUnavailable"], 1, "not enough live replicas"),
])
def test_only_a_server_write_timeout_is_sent_once_more(
    clusters: list[_FakeCluster], errors: list[str], executes: int, fails: str | None,
) -> None:
    writer = _writer()
    # connected, and the first write ended (not only begun: the errors set below are
    # for the second write alone)
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert outcomes.wait(1) == {0: [None]}
    cluster = clusters[0]
    cluster.write_errors = [_acsylla_error(name, "boom") for name in errors]
    writer.write([_ROW], [], "storing task t1", outcomes.done(1))
    (error,) = outcomes.wait(2)[1]
    writer.close()
    assert cluster.executes - 1 == executes
    sent = cluster.sessions[0].sent[1:]
    assert all(again.values == sent[0].values and again.idempotent for again in sent)
    if fails is None:
        assert error is None
    else:
        assert isinstance(error, BackendError) and fails in str(error).lower()
        assert is_transient(error)


def _connected(clusters: list[_FakeCluster]) -> tuple[AcsyllaWriter, _Outcomes, _FakeSession]:
    """A writer whose first batch connected and ended (batch 0 of the outcomes)."""
    writer = _writer()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert outcomes.wait(1) == {0: [None]}
    return writer, outcomes, clusters[0].sessions[0]


def _entry(task_id: str, ms: int = 1_764_500_000_123) -> list[object]:
    return ["q", "SUCCESS", ms - ms % 3_600_000, 3, ms, task_id, "n", 60]


def test_a_lone_listing_entry_is_an_insert_and_a_partitions_several_one_unlogged_batch(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, session = _connected(clusters)
    session.sent.clear()
    writer.write([], [[_entry("a")], [_entry("b"), _entry("c")]], "storing 3 tasks",
                 outcomes.done(1))
    assert outcomes.wait(2)[1] == [None]
    writer.close()
    single, batch = sorted(session.sent, key=lambda s: isinstance(s, _FakeBatch))
    assert isinstance(single, _FakeBound) and single.idempotent
    # the bucket and the time: epoch ms bound as seconds
    assert single.values == ["q", "SUCCESS", 1_764_496_800.0005, 3, 1_764_500_000.1235,
                             *_entry("a")[5:]]
    assert isinstance(batch, _FakeBatch) and batch.idempotent
    assert [v[5] for v in batch.values] == ["b", "c"]
    assert batch.values[0][2:5] == [1_764_496_800.0005, 3, 1_764_500_000.1235]


def test_a_listing_batch_that_timed_out_on_the_server_is_sent_once_more_as_it_was(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, session = _connected(clusters)
    session.sent.clear()
    clusters[0].write_errors = [_acsylla_error("CassErrorServerWriteTimeout", "boom")]
    writer.write([], [[_entry("b"), _entry("c")]], "storing 2 tasks", outcomes.done(1))
    assert outcomes.wait(2)[1] == [None]
    writer.close()
    first, again = session.sent
    assert isinstance(again, _FakeBatch) and again.values == first.values
    assert again.idempotent


def test_a_row_that_cannot_be_bound_fails_its_batch_by_name_after_the_others_are_written(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, session = _connected(clusters)
    clusters[0].bind_error = TypeError("invalid value type for column attempts")
    bad = ["bad", *_ROW[1:]]
    writer.write([_ROW, bad, _ROW], [[_entry("a")]], "storing 3 tasks", outcomes.done(1))
    (error,) = outcomes.wait(2)[1]
    writer.close()
    assert isinstance(error, BackendError) and "storing 3 tasks" in str(error)
    assert "invalid value type for column attempts" in str(error)
    assert len(session.rows) == 1 + 3, "the writes that could be bound were not all written"


def test_a_write_the_session_refuses_before_sending_fails_its_batch(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, session = _connected(clusters)
    session.closed = True  # acsylla raises "Session closed" at execute's first step
    writer.write([_ROW, _ROW], [[_entry("a")]], "storing 2 tasks", outcomes.done(1))
    (error,) = outcomes.wait(2)[1]
    session.closed = False
    writer.close()
    assert isinstance(error, BackendError) and "storing 2 tasks" in str(error)
    assert "Session closed" in str(error)


def test_written_batches_leave_nothing_for_the_cyclic_garbage_collector(
    clusters: list[_FakeCluster],
) -> None:
    """A worker writes thousands of rows a second: cycles per row would pile up between
    collections (and a collection's pause lands on the worker's latency)."""
    writer, outcomes, _ = _connected(clusters)
    gc.collect()
    gc.disable()
    try:
        for n in range(1, 21):
            writer.write([_ROW] * 10, [[_entry("a")], [_entry("b"), _entry("c")]],
                         "storing 10 tasks", outcomes.done(n))
        calls = outcomes.wait(21)
        cyclic = gc.collect()
    finally:
        gc.enable()
    writer.close()
    assert all(calls[n] == [None] for n in range(1, 21))
    assert cyclic == 0, f"{cyclic} objects of 20 batches were freed only by the cyclic GC"


def test_a_write_whose_future_is_cancelled_fails_its_batch_instead_of_hanging(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, _ = _connected(clusters)
    clusters[0].write_errors = [asyncio.CancelledError()]
    writer.write([_ROW, _ROW], [], "storing 2 tasks", outcomes.done(1))
    (error,) = outcomes.wait(2)[1]
    writer.close()
    assert isinstance(error, BackendError) and "storing 2 tasks" in str(error)


def test_a_fault_while_starting_a_batchs_writes_still_ends_the_batch_and_the_writer_goes_on(
    clusters: list[_FakeCluster], monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer, outcomes, _ = _connected(clusters)

    def broken(self: _FakeSession) -> object:
        raise RuntimeError("a fault of the writer's own")

    with monkeypatch.context() as patch:
        patch.setattr(_FakeSession, "execute_batch", property(broken))
        writer.write([_ROW], [[_entry("a")]], "storing task t1", outcomes.done(1))
        (error,) = outcomes.wait(2)[1]
    writer.write([_ROW], [[_entry("a")]], "storing task t2", outcomes.done(2))
    assert outcomes.wait(3)[2] == [None]
    writer.close()
    assert isinstance(error, BackendError) and "storing task t1" in str(error)


@pytest.mark.parametrize("ms", [0, 1, -1, -1001, 1764500000123, 2183226373411, 2165497250430,
                                1079337347472, 541169507341, 253402300799999])
def test_timestamps_survive_acsyllas_seconds_to_ms_truncation(ms: int) -> None:
    from streamtasks.backend.cassandra.fastwrite import _seconds

    (seconds,) = _seconds([ms], (0,))
    assert int(seconds * 1000) == ms  # what acsylla's bind does with a number


def _pump_until(writer: AcsyllaWriter, outcomes: _Outcomes, batches: int,
                timeout_s: float = 10.0) -> dict[int, list[BaseException | None]]:
    """Pump an owned writer until ``batches`` batches ended (the owner's loop turns)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        calls = outcomes.wait(batches, timeout_s=0)
        if len(calls) >= batches:
            return calls
        writer.pump(0.01)
    return outcomes.wait(batches, timeout_s=0)


def _owned_connected() -> tuple[AcsyllaWriter, _Outcomes]:
    """A writer owned by this thread whose first batch connected and ended (batch 0)."""
    writer = _writer()
    assert writer.own()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    assert _pump_until(writer, outcomes, 1) == {0: [None]}
    return writer, outcomes


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "streamtasks-acsylla"]


def test_an_owned_writer_writes_only_when_its_owner_pumps_and_starts_no_thread(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer()
    assert writer.own() and writer.owned_here()
    outcomes = _Outcomes()
    writer.write([_ROW], [], "storing 1 task", outcomes.done(0))
    time.sleep(0.05)
    assert outcomes.wait(1, timeout_s=0) == {}, "written without a pump of its owner"
    assert _pump_until(writer, outcomes, 1) == {0: [None]}
    assert _writer_threads() == [], "an owned writer started a loop thread"
    writer.close()
    assert clusters[0].sessions[0].closed and clusters[0].destroyed


def test_an_owned_writer_ends_a_batch_handed_over_by_another_thread_at_the_owners_pump(
    clusters: list[_FakeCluster],
) -> None:
    writer = _writer()
    assert writer.own()
    outcomes = _Outcomes()
    ended_on: list[str] = []

    def done(error: BaseException | None) -> None:
        ended_on.append(threading.current_thread().name)
        outcomes.done(0)(error)

    other = threading.Thread(target=writer.write, args=([_ROW], [], "storing 1 task", done),
                             name="another")
    other.start()
    other.join(5)
    assert _pump_until(writer, outcomes, 1) == {0: [None]}
    assert ended_on == [threading.current_thread().name], "not ended on the owner's thread"
    writer.close()


def test_a_writer_whose_loop_thread_started_is_not_owned_and_pump_elsewhere_does_nothing(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes, _ = _connected(clusters)  # its loop runs on a thread of its own
    assert not writer.own() and not writer.owned_here()
    writer.pump(0.01)  # nothing: not its owner
    writer.write([_ROW], [], "storing 1 task", outcomes.done(1))
    assert outcomes.wait(2)[1] == [None]
    writer.close()
    closed = _writer()
    closed.close()
    assert not closed.own(), "a closed writer was owned"


def test_a_released_writer_ends_its_batches_on_a_thread_of_its_own_again(
    clusters: list[_FakeCluster],
) -> None:
    writer, outcomes = _owned_connected()
    clusters[0].write_s = 0.2
    writer.write([_ROW], [], "storing 1 task", outcomes.done(1))  # handed over, not started
    writer.release()
    assert not writer.owned_here() and _writer_threads() == ["streamtasks-acsylla"]
    assert outcomes.wait(2)[1] == [None], "a batch handed over before release never ended"
    writer.close()
    assert _writer_threads() == []


def test_the_owner_closing_waits_for_a_pending_batch(clusters: list[_FakeCluster]) -> None:
    writer, outcomes = _owned_connected()
    clusters[0].write_s = 0.2
    writer.write([_ROW, _ROW], [], "storing 2 tasks", outcomes.done(1))
    writer.close(timeout_s=10)  # runs the loop here until the batch is acknowledged
    assert outcomes.wait(2, timeout_s=0).get(1) == [None], "close dropped a pending batch"


def test_a_batch_never_answered_when_the_owner_closes_fails_as_transient(
    clusters: list[_FakeCluster],
) -> None:
    stuck, outcomes = _owned_connected()
    clusters[0].write_s = 3600.0  # a node that never answers
    stuck.write([_ROW], [], "storing task t9", outcomes.done(1))
    stuck.pump()
    stuck.close(timeout_s=0.2)
    (error,) = outcomes.wait(2, timeout_s=0)[1]
    assert isinstance(error, BackendError) and "storing task t9" in str(error)
    assert is_transient(error)


def test_the_thread_owning_the_writer_takes_no_in_flight_slot_and_others_do(
    clusters: list[_FakeCluster],
) -> None:
    rows = TaskRows.__new__(TaskRows)  # only what _store_fast uses
    rows._slots = InFlightSlots(2)
    rows._fast = _writer()
    assert rows._fast.own()
    from concurrent.futures import Future
    futures: list[Future[None]] = []
    for _ in range(3):  # more rows than slots: the owner never waits for them
        future: Future[None] = Future()
        rows._store_fast(future, "storing 3 tasks", [((0,) * 21, ())] * 3, [])
        futures.append(future)
    assert rows._slots.free == 2
    deadline = time.monotonic() + 10
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        rows.pump_writes(0.01)
    assert [f.exception() for f in futures] == [None] * 3
    rows._fast.close()
