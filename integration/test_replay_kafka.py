"""Replay reprocesses each task once, on the real Kafka and Cassandra (executions counted).

A topic holds every retry attempt and every workflow step as its own record; a replay
must start each task once and let the workflow produce the rest. Each test uses its own
namespace and a worker process that appends one line per execution to a log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from integration._services import REPO
from integration._workers import (
    executions,
    make_app,
    new_namespace,
    wait_committed_to_high,
    wait_lines,
    worker_env,
    workers,
)
from streamtasks import App, chain
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return worker_env(new_namespace("replay"), IT_EXEC_LOG=str(tmp_path / "exec.log"),
                      STREAMTASKS_DELAY_TIERS="1s,5s")


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[App]:
    application = make_app(env)
    yield application
    application.close()


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamtasks.cli", *argv],
                          env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def all_done(app: App) -> None:
    """Wait until the worker group has committed every record of the queue's topic."""
    wait_committed_to_high([(app.settings.group_id("default"), app.settings.topic("default"))],
                           timeout_s=90)


@pytest.mark.timeout(300)
def test_replaying_a_chain_and_a_retried_task_runs_each_exactly_once_more(
    app: App, env: dict[str, str]
) -> None:
    log = Path(env["IT_EXEC_LOG"])
    since = datetime.now(UTC).replace(tzinfo=None).isoformat()  # naive: UTC
    # Given a 3-step chain (records: A by this client, B and C by the worker) and a task
    # that failed twice before succeeding (records: attempts 1, 2, 3 of one id)
    # (by name, as a pipeline without the tasks' code does)
    steps = chain(Signature("it.count", (3,)), Signature("it.count"),
                  Signature("it.count")).apply_async(app=app)
    flaky = app.send("it.flaky", args=["k", 2])
    app.flush(timeout_s=60)
    with workers(env, 1):
        wait_lines(log, 6, timeout_s=120)  # 3, 6, 12 and k three times
        assert steps.get(timeout=60) == 24 and flaky.get(timeout=60) == 3
        all_done(app)
        first = executions(log)
        assert (first["3"], first["6"], first["12"]) == (1, 1, 1)
        assert sum(n for tag, n in first.items() if tag.startswith("k:")) == 3

        # When the queue is replayed from before the first send (a dry run first)
        dry = cli(env, "replay", "--queue", "default", "--since", since, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        lines = dry.stdout.splitlines()
        assert len([line for line in lines if "\t" in line]) == 2  # A and the flaky task
        assert "       1  it.count" in lines and "       1  it.flaky" in lines
        assert lines[-1].startswith("read 6, matched 2, would send 2; left out 4 derived")
        done = cli(env, "replay", "--queue", "default", "--since", since)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("read 6, matched 2, sent 2")
        wait_lines(log, 10, timeout_s=120)
        all_done(app)
        # Then each step ran exactly once more, and the retried task once (it succeeds now)
        again = executions(log)
        assert (again["3"], again["6"], again["12"]) == (2, 2, 2)
        assert sum(n for tag, n in again.items() if tag.startswith("k:")) == 4

        # When the same window, which now holds the first replay's copies too, is replayed
        twice = cli(env, "replay", "--queue", "default", "--since", since)
        assert twice.returncode == 0, twice.stderr
        assert twice.stdout.startswith("read 10, matched 2, sent 2"), twice.stdout
        assert "2 repeated id(s)" in twice.stdout
        wait_lines(log, 14, timeout_s=120)
        all_done(app)
    # Then each task ran once more again, not once per copy
    thrice = executions(log)
    assert (thrice["3"], thrice["6"], thrice["12"]) == (3, 3, 3)
    assert sum(n for tag, n in thrice.items() if tag.startswith("k:")) == 5
