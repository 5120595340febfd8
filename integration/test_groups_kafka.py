"""`streamtasks groups migrate` on the real Kafka: offsets of an old queue-set group are
carried to the per-queue groups, and a worker of the new version starts where the old
one stopped.

Each test uses its own namespace. These tests fail, never skip, when Kafka is down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import pytest

from integration._services import REPO
from integration._workers import new_namespace, worker_env
from streamtasks import App, Settings
from streamtasks.broker.base import Consumer, Record, TopicPartition

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "streamtasks.cli"]
PARTITIONS = 3
RECORDS_PER_PARTITION = 20


class Listener:
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned.update(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.assigned.difference_update(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.assigned.difference_update(partitions)

    def on_commit(self, committed: Mapping[TopicPartition, int],
                  failed: Mapping[TopicPartition, int], error: str | None) -> None:
        pass


@pytest.fixture
def env() -> dict[str, str]:
    return worker_env(new_namespace("groups"), STREAMTASKS_PARTITIONS=str(PARTITIONS))


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[App]:
    application = App("it-groups", settings=Settings.from_env(env=env))
    yield application
    application.close()


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def join(app: App, group: str, topics: list[str], listener: Listener,
         read: list[Record] | None = None) -> Consumer:
    """Join ``group`` and poll until every partition of ``topics`` is assigned here.

    Records polled meanwhile are added to ``read``.
    """
    consumer = app.broker.consumer(group, topics, listener)
    deadline = time.monotonic() + 60
    while len(listener.assigned) < PARTITIONS * len(topics):
        assert time.monotonic() < deadline, f"{group} got {sorted(listener.assigned)}"
        records = consumer.poll(0.5, 1)
        if read is not None:
            read.extend(records)
    return consumer


def fill(app: App, topics: list[str]) -> None:
    for topic in topics:
        for p in range(PARTITIONS):
            for i in range(RECORDS_PER_PARTITION):
                app.broker.send(topic, f"{p}-{i}".encode(), partition=p)
    assert app.broker.flush(30) == 0


def first_offsets(app: App, group: str, topic: str) -> dict[int, int]:
    """Join ``group`` as a new-version worker would; return the first offset read per
    partition (then leave without committing)."""
    read: list[Record] = []
    consumer = join(app, group, [topic], Listener(), read)
    first: dict[int, int] = {}
    deadline = time.monotonic() + 60
    try:
        while True:
            for record in read:
                first.setdefault(record.partition, record.offset)
            if len(first) == PARTITIONS:
                break
            assert time.monotonic() < deadline, f"read only {first}"
            read = consumer.poll(0.5, 100)
    finally:
        consumer.close()
    return first


def test_migrate_copies_the_old_groups_offsets_and_new_workers_resume_there(
    app: App, env: dict[str, str]
) -> None:
    topology = app.settings.topology
    for queue in ("a", "b"):
        app.ensure_queue(queue)
    topic_a, topic_b = topology.topic("a"), topology.topic("b")
    fill(app, [topic_a, topic_b])
    old_group, _ = topology.legacy_group_ids(["a", "b"])
    # Given a worker of the old version that served a and b in one group and committed
    old = join(app, old_group, [topic_a, topic_b], Listener())
    committed = {TopicPartition(t, p): 5 + p + (3 if t == topic_b else 0)
                 for t in (topic_a, topic_b) for p in range(PARTITIONS)}
    old.commit(committed, asynchronous=False)
    old.close()
    # and a new group of queue a that already has its own offset on one partition
    own = TopicPartition(topic_a, 2)
    app.broker.set_group_offsets(topology.group_id("a"), {own: 1})

    # When the operator runs a dry run, nothing is written
    argv = ["groups", "migrate", "--from-group", old_group, "--queues", "a,b"]
    dry = cli(env, *argv, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would copy {topic_b}[1] offset 9 -> {topology.group_id('b')}" in dry.stdout
    assert app.broker.group_offsets(topology.group_id("b")) == {}

    # When it runs the migration
    done = cli(env, *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"copied 5 offset(s), kept 1 from {old_group}"
    assert f"kept {topic_a}[2] offset 1 in {topology.group_id('a')}" in done.stdout

    # Then each queue's group holds the old offsets (its own one kept)
    expected_a = {tp: off for tp, off in committed.items() if tp.topic == topic_a}
    expected_a[own] = 1
    assert app.broker.group_offsets(topology.group_id("a")) == expected_a
    assert app.broker.group_offsets(topology.group_id("b")) == {
        tp: off for tp, off in committed.items() if tp.topic == topic_b
    }
    # and a worker of the new version starts reading exactly there
    assert first_offsets(app, topology.group_id("b"), topic_b) == {0: 8, 1: 9, 2: 10}
    assert first_offsets(app, topology.group_id("a"), topic_a) == {0: 5, 1: 6, 2: 1}


def test_migrate_refuses_while_a_new_group_has_members(app: App, env: dict[str, str]) -> None:
    topology = app.settings.topology
    app.ensure_queue("a")
    topic = topology.topic("a")
    old_group, _ = topology.legacy_group_ids(["a", "x"])
    app.broker.set_group_offsets(old_group, {TopicPartition(topic, 0): 3})
    member = join(app, topology.group_id("a"), [topic], Listener())
    try:
        refused = cli(env, "groups", "migrate", "--from-group", old_group, "--queues", "a,x")
    finally:
        member.close()
    assert refused.returncode == 1
    assert f"{topology.group_id('a')} (1 member(s))" in refused.stderr
    assert "stop the workers of the new version" in refused.stderr
    assert app.broker.group_offsets(topology.group_id("a")) == {}
