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
                 log_path: Path | None = None, app: str = "integration.worker_app:app",
                 extra: tuple[str, ...] = ()) -> None:
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamtasks.cli", "worker", "--app", app,
             "--queues", queues, "--concurrency", str(concurrency), *extra],
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


def stop_all(procs: list[WorkerProcess]) -> None:
    """SIGTERM every worker process, then SIGKILL what has not exited within 60 s."""
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


@contextmanager
def workers(env: dict[str, str], count: int, **options: object) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(env, **options) for _ in range(count)]  # type: ignore[arg-type]
    try:
        yield procs
    finally:
        stop_all(procs)


def wait_lines(path: Path, lines: int, timeout_s: float) -> None:
    """Wait until the file at ``path`` has ``lines`` lines (an execution log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {lines} executions within {timeout_s}s")


def wait_labels(path: Path, labels: int, timeout_s: float) -> None:
    """Wait until the execution log at ``path`` names ``labels`` distinct labels.

    A line is ``label:value``; repeats of a label count once, so a run that repeats
    tasks cannot make the wait end before every task ran.
    """
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = len({line.partition(":")[0] for line in exec_lines(path)})
        if seen >= labels:
            return
        time.sleep(0.2)
    raise AssertionError(f"{seen} of {labels} distinct tasks ran within {timeout_s}s")


#: NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS.
_COORDINATOR_BUSY = frozenset({16, 15, 14})


def wait_groups_settled(groups: list[str], members: int, timeout_s: float = 120) -> None:
    """Wait until each consumer group is stable with ``members`` members, all assigned.

    Workers that start together rebalance their groups (the queue's and the delay
    forwarder's) for a few seconds; a latency measured meanwhile measures that.
    """
    from confluent_kafka import ConsumerGroupState, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups(groups, request_timeout=10)
        settled = 0
        for future in described.values():
            try:
                group = future.result()
            except KafkaException as err:  # the coordinator moving or loading: ask again
                if not (err.args[0].retriable() or err.args[0].code() in _COORDINATOR_BUSY):
                    raise
                continue
            assigned = [m for m in group.members if m.assignment.topic_partitions]
            if group.state == ConsumerGroupState.STABLE and len(assigned) == members:
                settled += 1
        if settled == len(groups):
            return
        time.sleep(0.2)
    raise AssertionError(f"groups {groups} not stable with {members} members in {timeout_s}s")


def exec_lines(log: Path) -> list[str]:
    """The lines of an execution log (``IT_EXEC_LOG``), in the order they were written."""
    return log.read_text().split() if log.exists() else []


def pids_by_label(log: Path) -> dict[str, list[int]]:
    """``label -> [pid, ...]`` in execution order, from lines ``label:pid`` (it.tag, it.step)."""
    out: dict[str, list[int]] = {}
    for line in exec_lines(log):
        label, _, pid = line.rpartition(":")
        if label and pid.isdigit():
            out.setdefault(label, []).append(int(pid))
    return out


def committed_and_high(group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """``partition -> (committed offset of group or None, high watermark)`` of ``topic``.

    Read with a consumer that never joins ``group`` (an offset fetch, not a membership).
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap(), "group.id": group,
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(meta.partitions)
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        out: dict[int, tuple[int | None, int]] = {}
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=10)
            out[tp.partition] = (tp.offset if tp.offset >= 0 else None, high)
        return out
    finally:
        consumer.close()


def wait_committed_to_high(pairs: list[tuple[str, str]], timeout_s: float) -> dict[
    tuple[str, str], dict[int, tuple[int | None, int]]
]:
    """Wait until each ``(group, topic)`` has committed every partition's high watermark.

    Partitions that never received a record (high 0) count as caught up. Returns the
    last reading; raises AssertionError naming the partitions behind.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {pair: committed_and_high(*pair) for pair in pairs}
        behind = {
            f"{group} {topic}[{p}]": f"committed {c} high {h}"
            for (group, topic), parts in seen.items()
            for p, (c, h) in parts.items() if h > 0 and c != h
        }
        if not behind:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"committed offsets behind the high watermark after "
                                 f"{timeout_s}s: {behind}")
        time.sleep(0.5)


def wait_namespace_quiet(namespace: str, groups_at_least: int, quiet_s: float = 3.0,
                         timeout_s: float = 90) -> list[str]:
    """Wait until every consumer group of ``namespace`` is stable and unchanged for ``quiet_s``.

    Whatever the groups are called: a worker that names its groups differently is
    still waited for. Returns the group ids seen (at least ``groups_at_least``).
    """
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    deadline = time.monotonic() + timeout_s
    last: object = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        listed = admin.list_consumer_groups(request_timeout=10).result()
        ids = sorted(g.group_id for g in listed.valid if g.group_id.startswith(namespace + "."))
        snapshot: object = None
        if len(ids) >= groups_at_least:
            described = admin.describe_consumer_groups(ids, request_timeout=10)
            groups = [f.result() for f in described.values()]
            if all(g.state == ConsumerGroupState.STABLE and g.members for g in groups):
                snapshot = sorted(
                    (g.group_id, m.member_id,
                     tuple(sorted((tp.topic, tp.partition)
                                  for tp in m.assignment.topic_partitions)))
                    for g in groups for m in g.members
                )
        if snapshot is None or snapshot != last:
            last, since = snapshot, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return ids
        time.sleep(0.3)
    raise AssertionError(f"consumer groups of {namespace} not quiet for {quiet_s}s "
                         f"within {timeout_s}s")


@contextmanager
def workers_for(env: dict[str, str], queue_sets: list[str], log_dir: Path | None = None,
                **options: object) -> Iterator[list[WorkerProcess]]:
    """One worker process per entry of ``queue_sets`` (e.g. ``["a", "a,b"]``).

    Processes appended to the yielded list are stopped too: SIGTERM, then SIGKILL
    after 60 s. With ``log_dir``, worker ``n`` writes its output to ``worker-n.log``.
    """
    procs: list[WorkerProcess] = []

    def log_of(n: int) -> Path | None:
        return log_dir / f"worker-{n}.log" if log_dir else None

    try:
        for n, queues in enumerate(queue_sets):
            procs.append(WorkerProcess(env, queues=queues, log_path=log_of(n),
                                       **options))  # type: ignore[arg-type]
        yield procs
    finally:
        stop_all(procs)
