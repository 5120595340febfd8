from __future__ import annotations

import re
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
    # an explicit factor wins whatever the nodes
    assert opts.replication(1) == "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    assert opts.replication(5) == "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    plain = CassandraOptions.from_url("cassandra://h/ks", Settings(consistency="ONE"))
    assert plain.consistency == "ONE"
    assert plain.hosts == (("h", 9042),)


@pytest.mark.parametrize(("nodes", "expected"), [(1, 1), (2, 2), (3, 3), (5, 3)])
@pytest.mark.parametrize("option", ["", "?replication_factor=auto", "?replication_factor=AUTO"])
def test_a_keyspace_without_a_replication_factor_gets_min_3_nodes(
    nodes: int, expected: int, option: str
) -> None:
    from streamtasks.backend.cassandra import CassandraOptions

    plain = CassandraOptions.from_url(f"cassandra://h/ks{option}", Settings())
    assert plain.replication(nodes) == (
        f"{{'class': 'SimpleStrategy', 'replication_factor': {expected}}}")
    in_dc = CassandraOptions.from_url(f"cassandra://h/ks?local_dc=dc1{option and '&'}"
                                      f"{option[1:]}", Settings())
    assert in_dc.replication(nodes) == f"{{'class': 'NetworkTopologyStrategy', 'dc1': {expected}}}"


@pytest.mark.parametrize("given", ["0", "-1", "three", "2.5"])
def test_a_bad_keyspace_replication_factor_is_refused(given: str) -> None:
    from streamtasks.backend.cassandra import CassandraOptions

    with pytest.raises(ConfigError, match=rf"option replication_factor must be a positive "
                                          rf"number or auto, got '{re.escape(given)}'"):
        CassandraOptions.from_url(f"cassandra://h/ks?replication_factor={given}", Settings())


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


SIMPLE = "org.apache.cassandra.locator.SimpleStrategy"
NTS = "org.apache.cassandra.locator.NetworkTopologyStrategy"


def simple(rf: int) -> dict[str, str]:
    return {"class": SIMPLE, "replication_factor": str(rf)}


def nts(**dcs: int) -> dict[str, str]:
    return {"class": NTS, **{dc: str(rf) for dc, rf in dcs.items()}}


@pytest.mark.parametrize("level", ["ONE", "LOCAL_ONE", "ANY", "TWO", "THREE", "one"])
@pytest.mark.parametrize("replication", [simple(3), simple(2), nts(dc1=3), nts(dc1=1, dc2=1)])
def test_counted_levels_are_refused_with_more_than_one_replica(
    level: str, replication: dict[str, str]
) -> None:
    from streamtasks.backend.cassandra import check_group_consistency

    with pytest.raises(ConfigError, match=r"consistency .*setting consistency.*LOCAL_QUORUM"):
        check_group_consistency(level, "SERIAL", replication, "ks")


@pytest.mark.parametrize("level", ["ONE", "LOCAL_ONE", "LOCAL_QUORUM", "QUORUM", "ALL"])
@pytest.mark.parametrize("replication", [simple(1), nts(dc1=1), nts(dc1=1, dc2=0)])
def test_a_single_replica_accepts_every_level(level: str, replication: dict[str, str]) -> None:
    from streamtasks.backend.cassandra import check_group_consistency

    serial = "LOCAL_SERIAL" if level.startswith("LOCAL_") else "SERIAL"
    assert check_group_consistency(level, serial, replication, "ks") == []


@pytest.mark.parametrize("level", ["LOCAL_QUORUM", "QUORUM", "EACH_QUORUM", "ALL"])
@pytest.mark.parametrize("serial", ["SERIAL", "LOCAL_SERIAL"])
def test_quorum_class_levels_are_accepted_on_one_data_center(level: str, serial: str) -> None:
    from streamtasks.backend.cassandra import check_group_consistency

    for replication in (simple(3), nts(dc1=3), nts(dc1=3, dc2=0)):
        assert check_group_consistency(level, serial, replication, "ks") == []


@pytest.mark.parametrize("serial", ["QUORUM", "LOCAL_QUORUM", "ONE", "ALL"])
def test_a_serial_consistency_other_than_serial_is_refused(serial: str) -> None:
    from streamtasks.backend.cassandra import check_group_consistency

    with pytest.raises(ConfigError, match=r"serial_consistency"):
        check_group_consistency("QUORUM", serial, simple(1), "ks")


def test_local_serial_is_refused_on_several_data_centers() -> None:
    from streamtasks.backend.cassandra import check_group_consistency

    with pytest.raises(ConfigError, match=r"serial_consistency=LOCAL_SERIAL.*dc1, dc2.*SERIAL"):
        check_group_consistency("LOCAL_QUORUM", "LOCAL_SERIAL", nts(dc1=3, dc2=3), "ks")
    # SERIAL decides across them; LOCAL_QUORUM joins are only warned about
    warnings = check_group_consistency("LOCAL_QUORUM", "SERIAL", nts(dc1=3, dc2=3), "ks")
    assert len(warnings) == 1 and "one data center" in warnings[0]
    assert check_group_consistency("QUORUM", "SERIAL", nts(dc1=3, dc2=3), "ks") == []


def test_replicas_reads_the_system_schema_map() -> None:
    from streamtasks.backend.cassandra import replicas

    assert replicas(simple(3)) == {"*": 3}
    assert replicas(nts(dc1=3, dc2=2)) == {"dc1": 3, "dc2": 2}
    assert replicas({"class": NTS, "dc1": "3/1", "dc2": "0"}) == {"dc1": 3}


@pytest.mark.parametrize(
    ("query", "serial"),
    [("", "LOCAL_SERIAL"), ("?consistency=QUORUM", "SERIAL"),
     ("?serial_consistency=serial", "SERIAL"),
     ("?consistency=QUORUM&serial_consistency=LOCAL_SERIAL", "LOCAL_SERIAL")],
)
def test_serial_consistency_option(query: str, serial: str) -> None:
    from streamtasks.backend.cassandra import CassandraOptions

    opts = CassandraOptions.from_url("cassandra://h/ks" + query, Settings())
    assert opts.serial_consistency == serial


@pytest.mark.parametrize(
    ("query", "message"),
    [("?serial_consistency=QUORUM", "serial_consistency=QUORUM"),
     ("?serial_consistency=NOPE", "unknown Cassandra consistency"),
     ("?consistency=SERIAL", "serial level"),
     ("?consistency=LOCAL_SERIAL", "serial level")],
)
def test_serial_consistency_errors(query: str, message: str) -> None:
    from streamtasks.backend.cassandra import CassandraOptions

    with pytest.raises(ConfigError, match=message):
        CassandraOptions.from_url("cassandra://h/ks" + query, Settings())


def test_memory_backend_accepts_any_group_configuration() -> None:
    assert MemoryBackend().check_groups() is None
