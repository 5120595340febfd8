"""The backend URL's ``writer`` option and the acsylla writer's error mapping (no server)."""

from __future__ import annotations

import sys

import pytest

from streamtasks import Settings
from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.backend.cassandra.fastwrite import as_backend_error
from streamtasks.errors import BackendError, ConfigError
from streamtasks.worker.effects import is_transient


def test_the_writer_defaults_to_cassandra_driver_and_acsylla_is_opt_in() -> None:
    assert CassandraOptions.from_url("cassandra://db:9042/ks", Settings()).writer == (
        "cassandra-driver")
    options = CassandraOptions.from_url("cassandra://db:9042/ks?writer=acsylla", Settings())
    assert options.writer == "acsylla"


def test_an_unknown_writer_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="writer 'rust' is not one of cassandra-driver, acsylla"):
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
