"""The driver's records of a failed first connect are not printed beside our error."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from cassandra.cluster import NoHostAvailable

from streamtasks.backend.cassandra.connection import CassandraOptions, Connection
from streamtasks.errors import BackendError
from streamtasks.settings import Settings

DRIVER = logging.getLogger("cassandra.cluster")


class FakeCluster:
    """Logs what the driver logs while connecting, then fails or gives a session."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    def connect(self) -> Any:
        # (the app's log gate collapses repeats: each test's lines are its own)
        DRIVER.warning("[control connection] Error connecting to 127.0.0.1:1: %s", self.fails)
        if self.fails:
            DRIVER.error("Control connection failed to connect, shutting down Cluster:")
            raise NoHostAvailable("Unable to connect to any servers",
                                  {"127.0.0.1:1": ConnectionRefusedError(111, "refused")})
        return SimpleNamespace()

    def shutdown(self) -> None:
        pass


def _connection(monkeypatch: pytest.MonkeyPatch, fails: bool) -> Connection:
    conn = Connection(CassandraOptions.from_url("cassandra://127.0.0.1:1/ks", Settings()))
    monkeypatch.setattr(conn, "_make_cluster", lambda: FakeCluster(fails))
    return conn


def _driver_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cassandra.cluster"]


def test_a_failed_first_connect_is_one_error_without_the_drivers_records(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:1.*refused"):
        _connection(monkeypatch, fails=True).session()
    assert _driver_lines(caplog) == []
    # and the driver logs as usual outside a connect
    DRIVER.warning("a node is down (connect-logs test)")
    assert _driver_lines(caplog) == ["a node is down (connect-logs test)"]


def test_the_drivers_records_of_a_connect_that_succeeds_are_passed_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    _connection(monkeypatch, fails=False).session()
    assert _driver_lines(caplog) == [
        "[control connection] Error connecting to 127.0.0.1:1: False"]
