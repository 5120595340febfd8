"""The backend contract on a real Cassandra (STREAMTASKS_BACKEND, a test keyspace).

Fails (never skips) when Cassandra is not reachable.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from integration._gate import Gate
from streamtasks import states
from streamtasks.backend.base import GROUP_FAILED, GROUP_FIRED, ResultBackend, TaskMeta
from streamtasks.backend.cassandra import (
    LISTING_SHARDS,
    CassandraBackend,
    listing_shard,
    load_migrations,
)
from streamtasks.backend.cassandra.rows import LISTING_SLICE_MS
from streamtasks.errors import BackendError, ConfigError
from streamtasks.settings import Settings
from tests.contracts.backend_contract import BackendContract, json_text, make_codec

pytestmark = pytest.mark.integration

DEFAULT_URL = "cassandra://127.0.0.1:9042/streamtasks_test"
TTL_S = 3600
GROUP_TTL_S = 7 * 24 * 3600  # Settings.group_expires_s by default


def backend_url() -> str:
    return os.environ.get("STREAMTASKS_BACKEND") or DEFAULT_URL


def url_with_keyspace(url: str, keyspace: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + keyspace))


def url_with_option(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


def make_backend(url: str, **settings: int) -> CassandraBackend:
    options: dict[str, int] = {"result_expires_s": TTL_S, "backend_max_in_flight": 64}
    options.update(settings)
    return CassandraBackend(url, Settings(**options), make_codec(), json_text)


#: The row writers the contract runs on (the backend URL's ``writer`` option).
WRITERS = ("cassandra-driver", "acsylla")


@pytest.fixture(scope="module", params=WRITERS)
def cassandra(request: pytest.FixtureRequest) -> Iterator[CassandraBackend]:
    backend = make_backend(url_with_option(backend_url(), f"writer={request.param}"))
    assert backend.options.writer == request.param
    backend.migrate()  # raises BackendError (the tests error, never skip) when unreachable
    yield backend
    backend.close()


class TestCassandraBackend(BackendContract):
    @pytest.fixture
    def backend(self, cassandra: CassandraBackend) -> Iterator[ResultBackend]:
        yield cassandra


def test_result_json_text_readable_by_plain_cql(cassandra: CassandraBackend) -> None:
    task_id = str(uuid.uuid4())
    result = {"sum": [1, 2, 3], "name": "ok", "big": 2**70}
    meta = TaskMeta(task_id=task_id, state=states.SUCCESS, queue="json", result=result)
    cassandra.store(meta).result(timeout=30)
    row = cassandra.session.execute(
        f'SELECT result, state FROM "{cassandra.keyspace}".tasks WHERE task_id = %s', (task_id,)
    ).one()
    assert row["state"] == "SUCCESS"
    assert json.loads(row["result"]) == result


def test_rows_carry_the_ttl(cassandra: CassandraBackend) -> None:
    task_id = str(uuid.uuid4())
    started_ms = int(time.time() * 1000)
    cassandra.store(TaskMeta(task_id=task_id, state=states.STARTED, queue="ttl",
                             started_ms=started_ms)).result(timeout=30)
    ks = cassandra.keyspace
    row = cassandra.session.execute(
        f'SELECT TTL(state) AS ttl FROM "{ks}".tasks WHERE task_id = %s', (task_id,)
    ).one()
    assert 0 < row["ttl"] <= TTL_S
    rows = cassandra.session.execute(
        f'SELECT TTL(name) AS ttl, task_id, shard FROM "{ks}".tasks_by_state '
        "WHERE queue = 'ttl' AND state = 'STARTED' ALLOW FILTERING"
    )
    assert {r["shard"] for r in rows if r["task_id"] == task_id} == {listing_shard(started_ms)}
    rows = cassandra.session.execute(
        f'SELECT TTL(name) AS ttl, task_id FROM "{ks}".tasks_by_state '
        "WHERE queue = 'ttl' AND state = 'STARTED' ALLOW FILTERING"
    )
    ttls = [r["ttl"] for r in rows if r["task_id"] == task_id]
    assert len(ttls) == 1
    assert 0 < ttls[0] <= TTL_S


def test_results_finished_together_share_a_listing_partition(
    cassandra: CassandraBackend,
) -> None:
    # Given 120 results finished in the same millisecond (more than one batch of entries)
    queue = f"slice-{uuid.uuid4().hex[:8]}"
    finished_ms = int(time.time() * 1000)
    metas = [TaskMeta(task_id=f"{queue}-{i}", state=states.SUCCESS, queue=queue, name="t",
                      finished_ms=finished_ms) for i in range(120)]
    # When they are stored at once, and one of them again (a store retried)
    cassandra.store_many(metas).result(timeout=60)
    cassandra.store(metas[7]).result(timeout=30)
    # Then every entry is in the one partition of their time slice, once, and listed
    rows = cassandra.session.execute(
        f'SELECT task_id, shard FROM "{cassandra.keyspace}".tasks_by_state '
        "WHERE queue = %s AND state = 'SUCCESS' ALLOW FILTERING", (queue,)
    ).all()
    assert sorted(r["task_id"] for r in rows) == sorted(m.task_id for m in metas)
    assert {r["shard"] for r in rows} == {listing_shard(finished_ms)}
    listed = cassandra.list_tasks(queue, states.SUCCESS, finished_ms - 1, finished_ms + 1,
                                  limit=500)
    assert sorted(m.task_id for m in listed) == sorted(m.task_id for m in metas)


def test_listing_shards_rotate_with_time() -> None:
    assert [listing_shard(i * LISTING_SLICE_MS) for i in range(LISTING_SHARDS + 1)] == [
        *range(LISTING_SHARDS), 0]
    assert listing_shard(LISTING_SLICE_MS - 1) == listing_shard(0)


def group_row_ttls(backend: CassandraBackend, group_id: str) -> dict[str, int]:
    """TTL left on the group's member row, trigger row and settled mark."""
    ks = backend.keyspace
    queries = {
        "member": f'SELECT TTL(result_value) AS ttl FROM "{ks}".group_members '
        "WHERE group_id = %s AND shard = 0",
        # group_shards has key columns only, which TTL() cannot read; it is written
        # with the same USING TTL as the member rows
        "claim": f'SELECT TTL(claimer) AS ttl FROM "{ks}".group_triggers WHERE group_id = %s',
        "reason": f'SELECT TTL(reason) AS ttl FROM "{ks}".group_triggers WHERE group_id = %s',
        "settled": f'SELECT TTL(settled) AS ttl FROM "{ks}".group_triggers WHERE group_id = %s',
    }
    ttls = {}
    for name, query in queries.items():
        row = backend.session.execute(query, (group_id,)).one()
        assert row is not None, name
        ttls[name] = row["ttl"]
    return ttls


def test_group_rows_carry_the_group_ttl(cassandra: CassandraBackend) -> None:
    group_id = str(uuid.uuid4())
    assert cassandra.join_group(group_id, 0, 1, {"x": 1}).result(timeout=30)
    claim = cassandra.claim_group(group_id, "record-1", GROUP_FAILED, "boom").result(timeout=30)
    assert claim.held_by("record-1", GROUP_FAILED)
    cassandra.settle_group(group_id).result(timeout=30)
    ttls = group_row_ttls(cassandra, group_id)
    # group rows outlive the task rows: group_expires_s (7 days) > result_expires_s (1 h)
    assert all(TTL_S < ttl <= GROUP_TTL_S for ttl in ttls.values()), ttls


def test_group_ttl_is_at_least_the_result_ttl() -> None:
    backend = make_backend(backend_url(), result_expires_s=2 * TTL_S, group_expires_s=TTL_S)
    try:
        group_id = str(uuid.uuid4())
        assert backend.join_group(group_id, 0, 1, "ok").result(timeout=30)
        backend.claim_group(group_id, "record-1", GROUP_FAILED, "boom").result(timeout=30)
        backend.settle_group(group_id).result(timeout=30)
        ttls = group_row_ttls(backend, group_id)
        assert all(TTL_S < ttl <= 2 * TTL_S for ttl in ttls.values()), ttls
    finally:
        backend.close()


def test_a_not_applied_claim_returns_the_stored_row(cassandra: CassandraBackend) -> None:
    group_id = str(uuid.uuid4())
    won = cassandra.claim_group(group_id, "record-1", GROUP_FIRED).result(timeout=30)
    cassandra.settle_group(group_id).result(timeout=30)
    got = cassandra.claim_group(group_id, "record-2", GROUP_FAILED, "late").result(timeout=30)
    # the LWT's answer carries the existing row's columns, settled and claimed_at included
    assert (got.claimer, got.outcome, got.settled, got.reason) == (
        "record-1", GROUP_FIRED, True, None)
    assert got.claimed_ms == won.claimed_ms


def test_consistency_one_is_fine_on_a_single_replica() -> None:
    backend = make_backend(url_with_option(backend_url(), "consistency=ONE"))
    try:
        backend.check_groups()
        group_id = str(uuid.uuid4())
        assert backend.join_group(group_id, 0, 1, "ok").result(timeout=30)
        assert backend.claim_group(group_id, "r", GROUP_FIRED).result(timeout=30).held_by(
            "r", GROUP_FIRED)
    finally:
        backend.close()


def test_consistency_one_is_refused_for_groups_on_three_replicas(
    cassandra: CassandraBackend,
) -> None:
    # a keyspace replicated three times (on one node: every write at ONE still succeeds)
    keyspace = "streamtasks_rf3_" + uuid.uuid4().hex[:8]
    cassandra.session.execute(
        f'CREATE KEYSPACE "{keyspace}" WITH replication = '
        "{'class': 'SimpleStrategy', 'replication_factor': 3}",
        timeout=60,
    )
    backend = make_backend(
        url_with_option(url_with_keyspace(backend_url(), keyspace), "consistency=ONE")
    )
    try:
        with pytest.raises(ConfigError, match=r"consistency ONE.*3 replicas"):
            backend.check_groups()
        with pytest.raises(ConfigError, match="consistency ONE"):
            backend.join_group("g", 0, 1, None)
        with pytest.raises(ConfigError, match="consistency ONE"):
            backend.claim_group("g", "r", GROUP_FIRED)
        with pytest.raises(ConfigError, match="consistency ONE"):
            backend.group_claim("g")
    finally:
        backend.close()
        cassandra.session.execute(f'DROP KEYSPACE IF EXISTS "{keyspace}"', timeout=60)


def test_migrate_is_idempotent_on_a_fresh_keyspace() -> None:
    keyspace = "streamtasks_mig_" + uuid.uuid4().hex[:8]
    backend = make_backend(url_with_keyspace(backend_url(), keyspace))
    try:
        names = [m.name for m in load_migrations()]
        assert backend.applied_migrations() == []
        assert backend.migrate() == names
        assert backend.migrate() == []
        assert backend.applied_migrations() == names
        meta = TaskMeta(task_id="t", state=states.SUCCESS, result=1)
        backend.store(meta).result(timeout=30)
        assert backend.fetch("t") == meta
    finally:
        backend.session.execute(f'DROP KEYSPACE IF EXISTS "{keyspace}"', timeout=60)
        backend.close()


def test_a_migration_interrupted_after_its_alter_can_be_run_again() -> None:
    keyspace = "streamtasks_mig_" + uuid.uuid4().hex[:8]
    backend = make_backend(url_with_keyspace(backend_url(), keyspace))
    try:
        backend.migrate()
        # Given 004 applied but not recorded (as when interrupted before its record),
        # when migrate runs again, then its ALTER ... ADD of existing columns is skipped
        backend.session.execute(
            f'DELETE FROM "{keyspace}".schema_migrations WHERE version = 4', timeout=60
        )
        assert backend.migrate() == ["004_group_settled"]
        assert backend.migrate() == []
    finally:
        backend.session.execute(f'DROP KEYSPACE IF EXISTS "{keyspace}"', timeout=60)
        backend.close()


def test_migrate_twice_on_the_test_keyspace_applies_nothing(cassandra: CassandraBackend) -> None:
    assert cassandra.migrate() == []
    assert cassandra.applied_migrations() == [m.name for m in load_migrations()]


def test_missing_tables_say_run_migrate() -> None:
    backend = make_backend(url_with_keyspace(backend_url(), "streamtasks_never_migrated"))
    try:
        with pytest.raises(BackendError, match="streamtasks migrate"):
            backend.fetch("x")
        future = backend.store(TaskMeta(task_id="x", state=states.SUCCESS))
        with pytest.raises(BackendError, match="streamtasks migrate"):
            future.result(timeout=30)
        with pytest.raises(BackendError, match="streamtasks migrate"):
            backend.join_group("g", 0, 1, None).result(timeout=30)
        with pytest.raises(BackendError, match="streamtasks migrate"):
            backend.group_claim("g")
    finally:
        backend.close()


def test_unreachable_cassandra_fails_fast_and_clearly() -> None:
    backend = make_backend("cassandra://127.0.0.1:1/streamtasks_test?username=u&password=hunter2")
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.fetch("x")
    message = str(caught.value)
    assert "127.0.0.1:1" in message
    assert "check that Cassandra is running" in message
    assert "hunter2" not in message
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:1\b"):
        backend.store(TaskMeta(task_id="x", state=states.SUCCESS)).result(timeout=30)
    assert time.monotonic() - started < 15
    backend.close()


def test_closed_backend_refuses(cassandra: CassandraBackend) -> None:
    backend = make_backend(backend_url())
    backend.store(TaskMeta(task_id=str(uuid.uuid4()), state=states.SUCCESS))
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.fetch("x")


def test_timestamps_round_trip_to_the_millisecond(cassandra: CassandraBackend) -> None:
    # acsylla binds a number for a timestamp as seconds: every ms value must survive
    base = int(time.time() * 1000)
    metas = [TaskMeta(task_id=str(uuid.uuid4()), state=states.SUCCESS, queue="ms", name="t",
                      created_ms=base + i, started_ms=base + 3 * i + 1,
                      finished_ms=base + 7 * i + 9, attempts=i, group_index=i,
                      extra={"k": str(i)}) for i in range(200)]
    # and times whose seconds as a float times 1000 fall just short of the ms (truncated
    # by acsylla: 1 ms early): before 2004-11 and from 2038-01-19 on
    metas += [TaskMeta(task_id=str(uuid.uuid4()), state=states.SUCCESS, queue="ms", name="t",
                       created_ms=ms, finished_ms=ms + 1)
              for ms in (2183226373411, 2165497250430, 1079337347472, 541169507341)]
    cassandra.store_many(metas).result(timeout=60)
    got = cassandra.fetch_many([m.task_id for m in metas])
    assert [(g.created_ms, g.started_ms, g.finished_ms, g.attempts) if g else None
            for g in got] == [(m.created_ms, m.started_ms, m.finished_ms, m.attempts)
                              for m in metas]


def test_the_acsylla_writer_names_a_missing_table() -> None:
    from streamtasks.backend.cassandra.connection import CassandraOptions
    from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter
    from streamtasks.worker.effects import is_transient

    options = CassandraOptions.from_url(url_with_option(backend_url(), "writer=acsylla"),
                                        Settings())
    writer = AcsyllaWriter(options, "INSERT INTO no_such_table (a) VALUES (?)",
                           "INSERT INTO no_such_table (a) VALUES (?)")
    outcome: list[BaseException | None] = []
    done = __import__("threading").Event()

    def finished(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    try:
        writer.write([("x",)], [], "storing task x", finished)
        assert done.wait(60)
    finally:
        writer.close()
    error = outcome[0]
    assert isinstance(error, BackendError)
    assert "no_such_table" in str(error) and "storing task x" in str(error)
    assert "streamtasks migrate" in str(error)
    assert not is_transient(error)  # a missing table never heals by itself


def test_the_acsylla_writer_fails_batches_transiently_while_cassandra_is_away_then_connects(
) -> None:
    # Given the acsylla writer reaching Cassandra through a gate that is shut
    import threading

    from streamtasks.backend.cassandra.connection import CassandraOptions
    from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter
    from streamtasks.backend.cassandra.rows import _insert_cql
    from streamtasks.worker.effects import is_transient

    reader = make_backend(backend_url())
    reader.migrate()
    node = urlsplit(backend_url())
    gate = Gate((node.hostname or "127.0.0.1", node.port or 9042))
    keyspace = node.path.strip("/")
    url = url_with_option(f"cassandra://127.0.0.1:{gate.port}/{keyspace}", "writer=acsylla")
    writer = AcsyllaWriter(CassandraOptions.from_url(url, Settings()), *_insert_cql(keyspace))
    ended: list[BaseException | None] = []
    cond = threading.Condition()

    def done(error: BaseException | None) -> None:
        with cond:
            ended.append(error)
            cond.notify_all()

    def store(task_id: str) -> BaseException | None:
        count = len(ended)
        now = int(time.time() * 1000)
        row = (task_id, "t", "q", states.SUCCESS, "1", None, None, None, None, 1, "w",
               now, now, now, now, None, None, None, None, None, TTL_S)
        writer.write([row], [], f"storing task {task_id}", done)
        with cond:
            assert cond.wait_for(lambda: len(ended) > count, 60), "the batch never ended"
            return ended[count]

    try:
        # When batches arrive while Cassandra cannot be reached, each fails, transiently
        for _ in range(3):
            error = store(str(uuid.uuid4()))
            assert isinstance(error, BackendError) and is_transient(error), error
            assert "no host available" in str(error)
        # Then once it is back the next batch connects and is written
        gate.open()
        task_id = str(uuid.uuid4())
        assert store(task_id) is None
        fetched = reader.fetch(task_id)
        assert fetched is not None and fetched.state == states.SUCCESS
        # And an outage after connecting fails batches transiently, then heals by itself
        gate.shut()
        error = store(str(uuid.uuid4()))
        assert isinstance(error, BackendError) and is_transient(error), error
        gate.open()
        deadline = time.monotonic() + 60
        while (error := store(str(uuid.uuid4()))) is not None:
            assert time.monotonic() < deadline, f"never wrote again: {error}"
            time.sleep(0.5)
    finally:
        writer.close()
        gate.shut()
        reader.close()


def test_the_acsylla_writer_fails_a_batch_by_name_on_a_value_it_cannot_bind_and_writes_the_rest(
) -> None:
    import threading

    from streamtasks.backend.cassandra.connection import CassandraOptions
    from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter
    from streamtasks.backend.cassandra.rows import HOUR_MS, _insert_cql

    reader = make_backend(backend_url())
    reader.migrate()
    keyspace = urlsplit(backend_url()).path.strip("/")
    options = CassandraOptions.from_url(url_with_option(backend_url(), "writer=acsylla"),
                                        Settings())
    writer = AcsyllaWriter(options, *_insert_cql(keyspace))
    queue, now = f"bind-{uuid.uuid4().hex[:8]}", int(time.time() * 1000)
    ids = [str(uuid.uuid4()) for _ in range(3)]

    def row(task_id: str, attempts: object) -> tuple[object, ...]:
        return (task_id, "t", queue, states.SUCCESS, "1", None, None, None, None, attempts,
                "w", now, now, now, now, None, None, None, None, None, TTL_S)

    def entry(task_id: str, shard: int) -> tuple[object, ...]:
        return (queue, states.SUCCESS, now - now % HOUR_MS, shard, now, task_id, "t", TTL_S)

    outcome: list[BaseException | None] = []
    done = threading.Event()
    try:
        # Given a batch whose second row has text where its column takes an int, a lone
        # listing entry (a plain INSERT) and two of another partition (an UNLOGGED BATCH)
        writer.write([row(ids[0], 1), row(ids[2], "one"), row(ids[1], 1)],
                     [[entry(ids[0], 0)], [entry(ids[1], 1), entry(ids[2], 1)]],
                     "storing 3 tasks", lambda error: (outcome.append(error), done.set()))
        assert done.wait(60), "the batch never ended"
    finally:
        writer.close()
    # Then it fails naming the batch and the value, and every other write was made
    (error,) = outcome
    assert isinstance(error, BackendError) and "storing 3 tasks" in str(error)
    assert "'one'" in str(error)
    listed = reader.list_tasks(queue, states.SUCCESS, now - 1, now + 1)
    assert sorted(m.task_id for m in listed) == sorted(ids[:2])
    assert reader.fetch(ids[2]) is None
    reader.close()
