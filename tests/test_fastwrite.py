"""The backend URL's ``writer`` option and the acsylla writer's error mapping (no server)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from types import SimpleNamespace

import pytest

from streamtasks import Settings
from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter, as_backend_error, driver_log
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
    def __init__(self) -> None:
        self.rows: list[list[object]] = []
        self.closed = False

    async def create_prepared(self, cql: str) -> _FakePrepared:
        return _FakePrepared(self, cql)

    async def execute(self, bound: _FakeBound) -> None:
        self.rows.append(bound.values)

    async def close(self) -> None:
        self.closed = True


class _FakePrepared:
    def __init__(self, session: _FakeSession, cql: str) -> None:
        self.session, self.cql = session, cql

    def bind(self) -> _FakeBound:
        return _FakeBound()


class _FakeBound:
    values: list[object]

    def set_is_idempotent(self, flag: bool) -> None:
        pass

    def bind_list(self, values: list[object]) -> None:
        self.values = values


class _FakeCluster:
    def __init__(self, sessions: list[_FakeSession]) -> None:
        self.sessions = sessions

    async def create_session(self, keyspace: str) -> _FakeSession:
        await asyncio.sleep(0.05)  # connecting takes a while: other batches arrive meanwhile
        session = _FakeSession()
        self.sessions.append(session)
        return session


def test_batches_arriving_while_the_writer_connects_share_one_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import acsylla

    sessions: list[_FakeSession] = []
    monkeypatch.setattr(acsylla, "create_cluster", lambda hosts, **kw: _FakeCluster(sessions))
    options = CassandraOptions.from_url("cassandra://db:9042/ks", Settings())
    writer = AcsyllaWriter(options, "INSERT task", "INSERT index")
    outcomes: list[BaseException | None] = []
    finished = threading.Event()

    def done(error: BaseException | None) -> None:
        outcomes.append(error)
        if len(outcomes) == 5:
            finished.set()

    row = [0] * 21
    for _ in range(5):
        writer.write([row], [], "storing 1 task", done)
    assert finished.wait(10), outcomes
    writer.close()
    assert outcomes == [None] * 5
    assert len(sessions) == 1, f"{len(sessions)} sessions opened for one writer"
    assert len(sessions[0].rows) == 5 and sessions[0].closed
