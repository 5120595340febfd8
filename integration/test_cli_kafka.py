"""``topics list / alter`` and ``purge`` through the command line on the real Kafka.

Each test uses its own namespace, so topics never collide. These tests fail, never
skip, when Kafka cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from integration._services import REPO
from integration._workers import new_namespace, worker_env
from streamtasks import App, Settings
from streamtasks.broker.base import TopicPartition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "streamtasks.cli"]


@pytest.fixture
def env() -> dict[str, str]:
    return worker_env(new_namespace("cli"))


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[App]:
    application = App("it-cli", settings=Settings.from_env(env=env))
    yield application
    application.close()


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    # stdin is not a terminal here, as in a script or CI job.
    return subprocess.run([*CLI, *argv], env={**os.environ, **env}, cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)


def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = cli(env, "topics", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {d["queue"]: d for d in map(json.loads, done.stdout.splitlines())}


def send(app: App, count: int) -> None:
    for i in range(count):
        app.send("it.nobody", args=[i], queue="q")
    app.flush(timeout_s=60)


def test_topics_list_and_alter_grow_every_topic_of_a_queue(env, app):
    done = cli(env, "topics", "create", "--queue", "q", "--partitions", "2")
    assert done.returncode == 0, done.stderr
    send(app, 3)
    q = listed(env)["q"]
    assert (q["partitions"], q["lag"], q["group"]) == (2, 3, app.settings.group_id("q"))
    assert list(listed(env)) == ["q"]  # the DLQ and delay tiers are not queues

    done = cli(env, "topics", "alter", "--queue", "q", "--partitions", "4")
    assert done.returncode == 0, done.stderr
    counts = {s.name: app.broker.partition_count(s.name) for s in app.topic_specs("q")}
    assert set(counts.values()) == {4}, counts
    assert listed(env)["q"]["partitions"] == 4

    done = cli(env, "topics", "alter", "--queue", "q", "--partitions", "3")
    assert done.returncode == 2 and "cannot shrink queue q to 3 partitions" in done.stderr
    done = cli(env, "topics", "create", "--queue", "q", "--partitions", "6")
    assert done.returncode == 0
    assert f"{app.settings.topic('q')}: exists (4 partitions; asked for 6)" in done.stdout


def test_purge_deletes_the_waiting_records_and_needs_yes_off_a_terminal(env, app):
    assert cli(env, "topics", "create", "--queue", "q", "--partitions", "2").returncode == 0
    send(app, 5)
    done = cli(env, "purge", "--queue", "q")
    assert done.returncode == 2 and "--yes" in done.stderr
    done = cli(env, "purge", "--queue", "q", "--yes")
    assert done.returncode == 0, done.stderr
    topic = app.settings.topic("q")
    assert done.stdout.strip() == f"purged 5 record(s) from {topic} (5 not yet run)"
    marks = [app.broker.watermarks(TopicPartition(topic, p)) for p in range(2)]
    assert sum(high - low for low, high in marks) == 0
    assert listed(env)["q"]["lag"] == 0
    send(app, 1)  # the queue still works after a purge
    assert listed(env)["q"]["lag"] == 1
