"""Dead-letter tools and replay on the real Kafka (and Cassandra for the worker's rows).

Each test uses its own namespace, so topics never collide. These tests fail, never
skip, when Kafka or Cassandra cannot be reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from integration._services import REPO
from integration._workers import new_namespace, worker_env
from streamtasks import App, Settings
from streamtasks.broker.base import Record, TopicPartition
from streamtasks.headers import ATTEMPT, TASK_ID
from streamtasks.ops import REPLAY_OF

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "streamtasks.cli"]


def make_app(env: dict[str, str]) -> App:
    return App("it-ops", settings=Settings.from_env(env=env))


@pytest.fixture(scope="module", autouse=True)
def migrated() -> None:
    app = make_app(worker_env("migrate"))
    app.backend.migrate()
    app.close()


@pytest.fixture
def env() -> dict[str, str]:
    return worker_env(new_namespace("ops"))


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[App]:
    application = make_app(env)
    yield application
    application.close()


def cli(env: dict[str, str], *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def topic_size(app: App, topic: str) -> int:
    count = app.broker.partition_count(topic)
    marks = [app.broker.watermarks(TopicPartition(topic, p)) for p in range(count)]
    return sum(high - low for low, high in marks)


def read_topic(app: App, topic: str) -> list[Record]:
    records: list[Record] = []
    for p in range(app.broker.partition_count(topic)):
        tp = TopicPartition(topic, p)
        low, high = app.broker.watermarks(tp)
        records.extend(app.broker.read(tp, low, high))
    return records


def send_batch(app: App, count: int, tag: str) -> None:
    for i in range(count):
        app.send("it.replayed", args=[i], kwargs={"batch": tag}, queue="stream")
    app.flush(timeout_s=60)


@pytest.mark.timeout(180)
def test_replay_of_a_time_window_resends_exactly_the_middle_batch(
    app: App, env: dict[str, str]
) -> None:
    # Given a stream of 50,000 tasks in three batches, the middle one in its own window
    started = time.monotonic()
    app.ensure_queue("stream")
    send_batch(app, 20_000, "before")
    time.sleep(0.6)
    since = now_ms()
    time.sleep(0.6)
    send_batch(app, 10_000, "middle")
    time.sleep(0.6)
    until = now_ms()
    time.sleep(0.6)
    send_batch(app, 20_000, "after")
    produced = time.monotonic() - started
    assert topic_size(app, app.settings.topic("stream")) == 50_000

    # When the window around the middle batch is replayed into another queue
    replay_started = time.monotonic()
    done = cli(env, "replay", "--queue", "stream", "--since", iso(since), "--until", iso(until),
               "--into", "replayed")
    replayed = time.monotonic() - replay_started

    # Then exactly the middle batch arrives there, each pointing at its original
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read 10000, matched 10000, sent 10000"
    assert "replay: 10000/10000 records read" in done.stderr
    into = read_topic(app, app.settings.topic("replayed"))
    assert len(into) == 10_000
    sample = app.codec.decode_task(into[0].value or b"")
    assert sample.kwargs == {"batch": "middle"} and sample.queue == "replayed"
    assert sample.options["replay_of"] == into[0].headers[REPLAY_OF].decode() != sample.id
    assert {app.codec.decode_task(r.value or b"").kwargs["batch"] for r in into} == {"middle"}

    # A dry run of the same window by name counts and sends nothing
    dry = cli(env, "replay", "--queue", "stream", "--since", iso(since), "--until", iso(until),
              "--name", "no.such.task", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "read 10000, matched 0, would send 0"
    print(f"\n50,000 produced in {produced:.1f}s; 10,000 replayed by the CLI in {replayed:.1f}s")


@pytest.mark.timeout(240)
def test_dead_letters_list_requeue_and_purge_through_the_cli(
    app: App, env: dict[str, str]
) -> None:
    # Given five tasks of a name no worker knows, dead-lettered by a worker
    ids = [app.send("it.ghost", args=[i], queue="q").id for i in range(5)]
    app.flush()
    worker = app.worker(["q"])
    try:
        worker.run_until_idle(60)
    finally:
        worker.close()
    assert worker.stats["dead_lettered"] == 5

    # list shows them
    listed = cli(env, "dlq", "list", "--queue", "q")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split("\t") == ["TASK_ID", "NAME", "REASON", "ERROR", "DEAD_AT"]
    rows = [line.split("\t") for line in lines]
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert all(r[1:3] == ["it.ghost", "unknown-task"] for r in rows)
    assert all(r[3].startswith("UnknownTaskError: ") and r[4].endswith("+00:00") for r in rows)

    # requeue by id, then all of that reason: same ids, attempt 1, back on the queue's topic
    one = cli(env, "dlq", "requeue", "--queue", "q", "--id", ids[2])
    assert one.returncode == 0 and one.stdout.strip() == "requeued 1", one.stderr
    every = cli(env, "dlq", "requeue", "--queue", "q", "--all", "--reason", "unknown-task")
    assert every.returncode == 0 and every.stdout.strip() == "requeued 5", every.stderr
    assert "requeue: 5/5 records read" in every.stderr
    main_records = read_topic(app, app.settings.topic("q"))
    sent = Counter(r.headers[TASK_ID].decode() for r in main_records)
    assert sent == Counter({**{i: 2 for i in ids}, ids[2]: 3})
    assert all(r.headers[ATTEMPT] == b"1" for r in main_records)

    # once the task exists, the requeued records run
    @app.task(name="it.ghost")
    def ghost(i: int) -> int:
        return i + 100

    worker = app.worker(["q"])
    try:
        worker.run_until_idle(60)
    finally:
        worker.close()
    assert [app.result(i).get(timeout=30) for i in ids] == [100, 101, 102, 103, 104]

    # purge empties the dead-letter topic
    purged = cli(env, "dlq", "purge", "--queue", "q")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == f"purged 5 dead letter(s) from {app.settings.dlq_topic('q')}"
    assert topic_size(app, app.settings.dlq_topic("q")) == 0
    empty = cli(env, "dlq", "list", "--queue", "q")
    assert empty.returncode == 0 and empty.stdout == "TASK_ID\tNAME\tREASON\tERROR\tDEAD_AT\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "list", "--queue", "nowhere"], "queue nowhere has no topic {ns}.nowhere.dlq; "
         "create it with streamtasks topics create --queue nowhere"),
        (["replay", "--queue", "nowhere", "--since", "-1h"],
         "queue nowhere has no topic {ns}.nowhere;"),
        (["replay", "--queue", "q", "--since", "last tuesday"], "expected an ISO-8601 time"),
        (["replay", "--queue", "q", "--since", "2026-01-02T00:00:00+00:00",
          "--until", "2026-01-01T00:00:00+00:00"], "--since must be before --until"),
        (["replay", "--queue", "q", "--from-offset", "0:10", "--to-offset", "0:2"],
         "--from-offset (0:10) is after --to-offset (0:2)"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(
    env: dict[str, str], argv: list[str], message: str
) -> None:
    done = cli(env, *argv, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message.format(ns=env["STREAMTASKS_NAMESPACE"]) in done.stderr


def test_broker_read_stops_at_the_end_and_delete_records_moves_the_low_watermark(
    app: App,
) -> None:
    topic = app.settings.topic("plain")
    app.broker.create_topics(app.topic_specs("plain", partitions=1))
    for i in range(10):
        app.broker.send(topic, str(i).encode(), partition=0)
    app.broker.flush(30)
    tp = TopicPartition(topic, 0)
    assert [r.offset for r in app.broker.read(tp, 3, 7)] == [3, 4, 5, 6]
    assert [r.value for r in app.broker.read(tp, 8, 100)] == [b"8", b"9"]
    assert list(app.broker.read(tp, 10, 20)) == []
    app.broker.delete_records({tp: 5})
    assert app.broker.watermarks(tp) == (5, 10)
    assert [r.offset for r in app.broker.read(tp, 0, 10)] == [5, 6, 7, 8, 9]
    assert app.broker.topic_exists(topic)
    assert not app.broker.topic_exists(app.settings.topic("never-made"))
