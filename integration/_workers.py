"""Start and stop real worker processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from integration._services import REPO, backend_url, broker_url, kafka_bootstrap
from streamtasks import App, Settings


def worker_env(namespace: str, **extra: str) -> dict[str, str]:
    """Environment for the test process and its workers: one fresh namespace per test."""
    env = {
        "STREAMTASKS_BROKER": broker_url(),
        "STREAMTASKS_BACKEND": backend_url(),
        "STREAMTASKS_NAMESPACE": namespace,
        "STREAMTASKS_PARTITIONS": "6",
        "STREAMTASKS_LOG_LEVEL": "warning",
        "STREAMTASKS_SHUTDOWN_GRACE_S": "10",
    }
    env.update(extra)
    return env


def make_app(env: dict[str, str]) -> App:
    """The test process's app, configured like its workers by ``env``."""
    return App("it", settings=Settings.from_env(env=env))


def executions(log: Path) -> Counter[str]:
    """How often each tag was written to an execution log (``IT_EXEC_LOG``)."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


def new_namespace(prefix: str) -> str:
    return f"it-{prefix}-{uuid.uuid4().hex[:8]}"


class WorkerProcess:
    """One ``streamtasks worker`` process."""

    def __init__(self, env: dict[str, str], queues: str = "default", concurrency: int = 8,
                 log_path: Path | None = None) -> None:
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
             "integration.worker_app:app", "--queues", queues, "--concurrency",
             str(concurrency)],
            cwd=REPO, env={**os.environ, **env}, stdout=self.log, stderr=self.log,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close_log()

    def close_log(self) -> None:
        if self.log is not subprocess.DEVNULL:
            self.log.close()  # type: ignore[union-attr]


@contextmanager
def workers(env: dict[str, str], count: int, **options: object) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(env, **options) for _ in range(count)]  # type: ignore[arg-type]
    try:
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=30)
            p.close_log()


def wait_lines(path: Path, lines: int, timeout_s: float) -> None:
    """Wait until the file at ``path`` has ``lines`` lines (an execution log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {lines} executions within {timeout_s}s")


def wait_groups_settled(groups: list[str], members: int, timeout_s: float = 120) -> None:
    """Wait until each consumer group is stable with ``members`` members, all assigned.

    Workers that start together rebalance their groups (the queue's and the delay
    forwarder's) for a few seconds; a latency measured meanwhile measures that.
    """
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups(groups, request_timeout=10)
        settled = 0
        for future in described.values():
            group = future.result()
            assigned = [m for m in group.members if m.assignment.topic_partitions]
            if group.state == ConsumerGroupState.STABLE and len(assigned) == members:
                settled += 1
        if settled == len(groups):
            return
        time.sleep(0.2)
    raise AssertionError(f"groups {groups} not stable with {members} members in {timeout_s}s")
