"""A worker under SIGTERM drains within the grace period the Kubernetes manifests assume,
and writes JSON log lines whose task lines carry the task's fields (real Kafka, Cassandra).

This module is also the worker's app (``--app integration.test_drain_kafka:app``): its
tasks log through structlog and stdlib logging, so the worker's task lines can be read.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from integration._rows import Rows
from integration._services import REPO
from integration._workers import committed_and_high, make_app, new_namespace, worker_env
from streamtasks import App, states

app = App.from_env("drain")
task_log = structlog.get_logger("drain.tasks")


@app.task(name="drain.nap")
def nap(label: str, ms: int) -> str:
    """Log the start, hold a slot ``ms`` milliseconds, log the end; return ``label``."""
    task_log.info("nap started", label=label)
    time.sleep(ms / 1000)
    logging.getLogger("drain.tasks").info("nap finished %s", label)
    return label


@app.task(name="drain.fail")
def fail(label: str) -> None:
    """Log, then fail (a traceback in the worker's logs)."""
    logging.getLogger("drain.tasks").warning("about to fail %s", label)
    raise RuntimeError(f"{label} fails on purpose")


# -- what the manifests assume --------------------------------------------------------------


def _manifest_grace() -> tuple[float, float]:
    """(terminationGracePeriodSeconds of the worker Deployment, STREAMTASKS_SHUTDOWN_GRACE_S)."""
    docs = list(yaml.safe_load_all((REPO / "deploy/k8s/base/worker.yaml").read_text()))
    pod = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]
    config = yaml.safe_load((REPO / "deploy/k8s/common/config.yaml").read_text())
    return float(pod["terminationGracePeriodSeconds"]), float(
        config["data"]["STREAMTASKS_SHUTDOWN_GRACE_S"])


def _start_worker(env: dict[str, str], err: Path, concurrency: int) -> subprocess.Popen[bytes]:
    with err.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
             "integration.test_drain_kafka:app", "--queues", "default",
             "--concurrency", str(concurrency)],
            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=stderr,
        )


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a stderr line that is not JSON: {line!r}") from None
    return parsed


def _wait_events(path: Path, event: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count(f'"{event}') >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {event!r} lines within {timeout_s}s")


@pytest.mark.timeout(300)
def test_sigterm_drains_within_the_manifests_grace_and_commits_every_started_task(
    tmp_path: Path,
) -> None:
    # Given a worker configured as the manifests configure it, busy with 1 s tasks
    termination_grace_s, shutdown_grace_s = _manifest_grace()
    assert shutdown_grace_s < termination_grace_s
    env = worker_env(new_namespace("drain"), STREAMTASKS_LOG_FORMAT="json",
                     STREAMTASKS_LOG_LEVEL="info",
                     STREAMTASKS_SHUTDOWN_GRACE_S=str(shutdown_grace_s))
    sender = make_app(env)
    sender.ensure_queue("default")
    rows = Rows()
    err = tmp_path / "worker.err"
    worker = _start_worker(env, err, concurrency=8)
    try:
        ids = [sender.send("drain.nap", args=[f"t{i}", 1000]).id for i in range(200)]
        sender.flush(timeout_s=60)
        _wait_events(err, "nap started", 12, timeout_s=120)
        # When it gets SIGTERM while tasks run
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=termination_grace_s + 30)
        took_s = time.monotonic() - began
        # Then it exits 0 within terminationGracePeriodSeconds
        assert code == 0, err.read_text()[-3000:]
        assert took_s < termination_grace_s, f"drain took {took_s:.1f}s"
        lines = _json_lines(err)
        started = {line["task_id"]: line for line in lines if line["event"] == "nap started"}
        finished = {line["task_id"] for line in lines
                    if str(line["event"]).startswith("nap finished")}
        # every task that started finished (none cut off), and the backlog was left alone
        assert started and set(started) == finished
        assert len(started) < len(ids)
        # every started task's row is written, SUCCESS
        counts = rows.wait_states(list(started), states.SUCCESS, timeout_s=10)
        assert counts[states.SUCCESS] == len(started), counts
        # and the committed offsets cover every one of them: a next owner repeats none
        committed = committed_and_high(sender.settings.group_id("default"),
                                       sender.settings.topic("default"))
        behind = [(line["partition"], line["offset"]) for line in started.values()
                  if (committed[line["partition"]][0] or 0) <= line["offset"]]
        assert not behind, f"started records not committed: {behind}; committed {committed}"
        print(f"\nSIGTERM drain: {len(started)} running tasks finished, exit 0 in "
              f"{took_s:.1f}s (terminationGracePeriodSeconds {termination_grace_s:.0f})")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
        rows.close()
        sender.close()


@pytest.mark.timeout(180)
def test_json_logs_are_json_only_and_task_lines_carry_the_task(tmp_path: Path) -> None:
    # Given a worker with STREAMTASKS_LOG_FORMAT=json
    env = worker_env(new_namespace("jsonlogs"), STREAMTASKS_LOG_FORMAT="json",
                     STREAMTASKS_LOG_LEVEL="info")
    sender = make_app(env)
    sender.ensure_queue("default")
    err = tmp_path / "worker.err"
    worker = _start_worker(env, err, concurrency=4)
    try:
        # When it runs tasks that log (structlog and stdlib) and one that fails
        ok = [sender.send("drain.nap", args=[f"j{i}", 10]) for i in range(3)]
        bad = sender.send("drain.fail", args=["j-bad"])
        sender.flush(timeout_s=60)
        for result in ok:
            assert result.get(timeout=60) in {"j0", "j1", "j2"}
        with pytest.raises(Exception, match="fails on purpose"):
            bad.get(timeout=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        # Then every stderr line is JSON, stdout is empty
        lines = _json_lines(err)
        assert worker.stdout is not None and worker.stdout.read() == b""
        assert lines and all({"event", "level", "timestamp"} <= set(line) for line in lines)
        # and each task line names its task, queue, attempt, partition, offset and trace
        task_lines = [line for line in lines if line.get("logger") == "drain.tasks"]
        assert len(task_lines) == 3 * 2 + 1
        ids = {r.id for r in ok} | {bad.id}
        for line in task_lines:
            assert line["task_id"] in ids and line["queue"] == "default"
            assert line["task"] in {"drain.nap", "drain.fail"} and line["attempt"] == 1
            assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
            assert len(line["trace_id"]) == 32
        # no secrets and no debug lines
        assert not [line for line in lines if line["level"] == "debug"]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
        sender.close()
