from __future__ import annotations

from collections.abc import Iterator

import pytest

from streamtasks import states
from streamtasks.backend import MemoryBackend, ResultBackend, TaskMeta, backend_from_url
from streamtasks.backend.base import GROUP_FAILED, GroupClaim
from streamtasks.errors import BackendError, ConfigError
from streamtasks.settings import Settings
from tests.contracts.backend_contract import BackendContract, json_text, make_codec


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[ResultBackend]:
        backend = MemoryBackend(make_codec())
        yield backend
        backend.close()


def test_fail_writes_fails_the_next_n_stores() -> None:
    backend = MemoryBackend()
    backend.fail_writes(2)
    metas = [TaskMeta(task_id=f"t{i}", state=states.SUCCESS) for i in range(3)]
    futures = [backend.store(m) for m in metas]
    for future in futures[:2]:
        with pytest.raises(BackendError, match="injected"):
            future.result(timeout=1)
    assert futures[2].result(timeout=1) is None
    assert backend.fetch("t0") is None
    assert backend.fetch("t2") == metas[2]
    assert backend.store_calls == 3


def test_fail_writes_with_a_given_error() -> None:
    backend = MemoryBackend()
    backend.fail_writes(1, BackendError("cassandra down"))
    with pytest.raises(BackendError, match="cassandra down"):
        backend.store(TaskMeta(task_id="a", state=states.STARTED)).result()
    assert backend.store(TaskMeta(task_id="a", state=states.STARTED)).result() is None


def test_stored_rows_do_not_alias_the_caller() -> None:
    backend = MemoryBackend()
    meta = TaskMeta(task_id="a", state=states.SUCCESS, result={"x": [1]}, extra={"k": "v"})
    backend.store(meta).result()
    meta.result["x"].append(2)
    meta.extra["k"] = "changed"
    got = backend.fetch("a")
    assert got is not None
    assert got.result == {"x": [1]}
    assert got.extra == {"k": "v"}
    got.result["x"].append(3)
    assert backend.fetch("a") == TaskMeta(task_id="a", state=states.SUCCESS, result={"x": [1]},
                                          extra={"k": "v"})


def test_backend_from_url() -> None:
    settings = Settings()
    memory = backend_from_url("memory://", settings, make_codec(), json_text)
    assert isinstance(memory, MemoryBackend)
    cassandra = backend_from_url(
        "cassandra://127.0.0.1:9042/ks?username=u&password=secret", settings, make_codec(),
        json_text,
    )
    assert type(cassandra).__name__ == "CassandraBackend"
    assert "secret" not in repr(cassandra)
    with pytest.raises(ConfigError, match="scheme"):
        backend_from_url("redis://x", settings, make_codec(), json_text)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("cassandra://127.0.0.1:9042/", "keyspace"),
        ("cassandra://127.0.0.1:9042/bad-name", "keyspace"),
        ("cassandra://127.0.0.1:9042/ks?consistency=MOST", "consistency"),
        ("cassandra://127.0.0.1:9042/ks?nope=1", "unknown option"),
        ("cassandra://127.0.0.1:9042/ks?ssl=maybe", "ssl"),
        ("cassandra://127.0.0.1:9042/ks?request_timeout=-1", "request_timeout"),
    ],
)
def test_cassandra_url_errors(url: str, message: str) -> None:
    from streamtasks.backend.cassandra import CassandraBackend

    with pytest.raises(ConfigError, match=message):
        CassandraBackend(url, Settings(), make_codec(), json_text)


def test_cassandra_url_options() -> None:
    from streamtasks.backend.cassandra import CassandraOptions

    opts = CassandraOptions.from_url(
        "cassandra://a:9042,b:9043/ks?username=u&password=p&ssl=true&local_dc=dc1"
        "&replication_factor=3&consistency=quorum&request_timeout=2.5",
        Settings(consistency="ONE"),
    )
    assert opts.hosts == (("a", 9042), ("b", 9043))
    assert opts.keyspace == "ks"
    assert opts.consistency == "QUORUM"
    assert opts.ssl and opts.local_dc == "dc1" and opts.request_timeout_s == 2.5
    assert "'p'" not in repr(opts)
    assert opts.replication() == "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    plain = CassandraOptions.from_url("cassandra://h/ks", Settings(consistency="ONE"))
    assert plain.consistency == "ONE"
    assert plain.hosts == (("h", 9042),)
    assert plain.replication() == "{'class': 'SimpleStrategy', 'replication_factor': 1}"


def test_migrations_are_found_in_order() -> None:
    from streamtasks.backend.cassandra import load_migrations

    migrations = load_migrations()
    assert migrations[0].name == "001_initial"
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    statements = migrations[0].statements('"ks"', "{'class': 'SimpleStrategy'}")
    assert statements[0].startswith('CREATE KEYSPACE IF NOT EXISTS "ks"')
    assert all("{keyspace}" not in s and "--" not in s for s in statements)
    assert any("tasks_by_queue" in s for s in statements)


@pytest.mark.parametrize(
    ("result_ttl_s", "group_expires_s", "expected"),
    [(3600, 7 * 86400, 7 * 86400), (7200, 3600, 7200), (0, 3600, 0), (3600, 0, 0)],
)
def test_group_rows_live_at_least_as_long_as_task_rows(
    result_ttl_s: int, group_expires_s: int, expected: int
) -> None:
    from streamtasks.backend.cassandra import group_ttl_s

    assert group_ttl_s(result_ttl_s, group_expires_s) == expected


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ('ALTER TABLE "ks".group_triggers ADD settled boolean', ("group_triggers", "settled")),
        ("alter table t\n  add reason text", ("t", "reason")),
        ("ALTER TABLE ks.t ADD m map<text, text>", ("t", "m")),
        ("ALTER TABLE t ADD (a int, b int)", None),
        ("ALTER TABLE t DROP a", None),
        ("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)", None),
    ],
)
def test_added_column_recognises_one_column_alters(
    statement: str, expected: tuple[str, str] | None
) -> None:
    from streamtasks.backend.cassandra import added_column

    assert added_column(statement) == expected


def test_every_alter_add_of_the_migrations_is_recognised() -> None:
    from streamtasks.backend.cassandra import added_column, load_migrations

    for migration in load_migrations():
        for statement in migration.statements('"ks"', "{}"):
            if " ADD " in statement.upper():
                assert added_column(statement) is not None, (migration.name, statement)


def test_settle_group_keeps_the_claim_and_sets_settled() -> None:
    backend = MemoryBackend()
    won = backend.claim_group("g", "r1", GROUP_FAILED, "boom").result()
    backend.settle_group("g").result()
    assert backend.group_claim("g") == GroupClaim("r1", GROUP_FAILED, won.claimed_ms, True, "boom")
    backend.clear()
    assert backend.group_claim("g") is None
