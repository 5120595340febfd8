"""Benchmarks on the local Kafka and Cassandra; prints figures, asserts nothing.

    python bench/run.py [--tasks 20000] [--baseline-tasks 3000]

1. send rate: ``app.send`` of N no-op tasks, then ``app.flush()``.
2. drain rate: one ``streamtasks worker`` process (concurrency 8) drains the N tasks;
   measured from its first commit to the last (its start-up excluded); then the same
   with ``--processes 2``.
3. the alternative, in the same run: a naive consumer loop (the shape kombu's Kafka
   transport and many hand-written workers have) that writes each result with a
   synchronous Cassandra call and commits each offset synchronously.
"""

from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtasks import App, Settings  # noqa: E402

BROKER = os.environ.get("STREAMTASKS_BROKER", "kafka://127.0.0.1:9092")
BACKEND = os.environ.get("STREAMTASKS_BACKEND", "cassandra://127.0.0.1:9042/streamtasks")


def make_env(namespace: str) -> dict[str, str]:
    """The environment of a benchmark's namespace; its topics are deleted at exit."""
    if namespace not in _DROPPED_AT_EXIT:
        _DROPPED_AT_EXIT.add(namespace)
        atexit.register(drop_topics, namespace)
    # replication is left to the defaults (1 on the single node, 3 on the 3-node cluster)
    # unless chosen in the environment
    chosen = {k: v for k, v in os.environ.items() if k == "STREAMTASKS_REPLICATION_FACTOR"}
    return {"STREAMTASKS_BROKER": BROKER, "STREAMTASKS_BACKEND": BACKEND,
            "STREAMTASKS_NAMESPACE": namespace, "STREAMTASKS_PARTITIONS": "6",
            "STREAMTASKS_LOG_LEVEL": "warning", **chosen}


_DROPPED_AT_EXIT: set[str] = set()


def drop_topics(namespace: str) -> None:
    """Delete the topics of a benchmark's namespace (``{namespace}.*``).

    Every run makes a fresh namespace of ~100 partitions (queue, delay tiers, dead
    letters, control): kept, they piled up on a long-lived dev Kafka until it died of
    "Too many open files" with ~20,000 partitions.
    """
    admin = AdminClient({"bootstrap.servers": BROKER.split("://", 1)[1]})
    try:
        names = [t for t in admin.list_topics(timeout=10).topics
                 if t.startswith(namespace + ".")]
        for future in admin.delete_topics(names, operation_timeout=30).values() if names else ():
            future.result()
    except Exception as err:  # a benchmark's figures stand without it: say so, go on
        print(f"could not delete the topics of {namespace}.*: {err}", file=sys.stderr)


def send_tasks(app: App, count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        app.send("bench.noop")
    app.flush(timeout_s=300)
    return count / (time.perf_counter() - t0)


def committed_total(group: str, topic: str, partitions: int) -> int:
    probe = Consumer({"bootstrap.servers": BROKER.split("://", 1)[1], "group.id": group})
    try:
        tps = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        probe.close()


def drain_with_worker(namespace: str, count: int, processes: int = 1) -> tuple[float, float]:
    env = {**os.environ, **make_env(namespace)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8", "--processes", str(processes)],
        cwd=ROOT, env=env)
    group, topic = f"{namespace}.default", f"{namespace}.default"
    first = None
    try:
        while True:
            done = committed_total(group, topic, 6)
            now = time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done >= count:
                break
            if now - started > 600:
                raise SystemExit(f"worker did not drain {count} tasks in 600 s ({done} done)")
            time.sleep(0.05)
        assert first is not None
        steady = (count - first[1]) / max(now - first[0], 1e-9)
        overall = count / (now - started)
        return steady, overall
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def naive_baseline(app: App, count: int) -> float:
    """Per record: decode, run, synchronous INSERT, synchronous commit."""
    from cassandra.cluster import Cluster

    namespace = app.settings.namespace
    host, _, port = BACKEND.split("://", 1)[1].split("/", 1)[0].partition(":")
    keyspace = BACKEND.rsplit("/", 1)[-1].split("?", 1)[0]  # options (writer=...) off
    cluster = Cluster([host], port=int(port or 9042))
    session = cluster.connect(keyspace)
    insert = session.prepare("INSERT INTO tasks (task_id, name, queue, state) VALUES (?, ?, ?, ?)")
    consumer = Consumer({"bootstrap.servers": BROKER.split("://", 1)[1],
                         "group.id": f"{namespace}.naive", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([f"{namespace}.default"])
    done, t0 = 0, None
    while done < count:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        t0 = t0 or time.perf_counter()
        task = app.codec.decode_task(msg.value())
        app.tasks["bench.noop"].fn()
        session.execute(insert, (task.id, task.name, task.queue, "SUCCESS"))
        consumer.commit(message=msg, asynchronous=False)
        done += 1
    rate = (count - 1) / (time.perf_counter() - (t0 or 0))
    consumer.close()
    cluster.shutdown()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--baseline-tasks", type=int, default=3_000)
    ns = parser.parse_args()

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    app = App("bench", settings=Settings.from_env(env=make_env(namespace)))
    from bench.bench_app import noop

    app.tasks["bench.noop"] = noop
    app.backend.migrate()
    app.ensure_queue("default")
    send_rate = send_tasks(app, ns.tasks)
    steady, overall = drain_with_worker(namespace, ns.tasks)

    two_ns = f"bench-2p-{uuid.uuid4().hex[:8]}"
    two_app = App("bench", settings=Settings.from_env(env=make_env(two_ns)))
    two_app.tasks["bench.noop"] = noop
    two_app.ensure_queue("default")
    send_tasks(two_app, ns.tasks)
    steady_2p, overall_2p = drain_with_worker(two_ns, ns.tasks, processes=2)
    two_app.close()

    base_ns = f"bench-naive-{uuid.uuid4().hex[:8]}"
    base_app = App("bench", settings=Settings.from_env(env=make_env(base_ns)))
    base_app.tasks["bench.noop"] = noop
    base_app.ensure_queue("default")
    send_tasks(base_app, ns.baseline_tasks)
    naive = naive_baseline(base_app, ns.baseline_tasks)

    print()
    print(f"{'measure':58} {'tasks/s':>10}")
    send_label = f"send: app.send x{ns.tasks} + flush"
    print(f"{send_label:58} {send_rate:>10,.0f}")
    print(f"{'drain: 1 worker process, concurrency 8 (steady)':58} {steady:>10,.0f}")
    print(f"{'drain: same, including worker start-up':58} {overall:>10,.0f}")
    print(f"{'drain: worker --processes 2 (steady)':58} {steady_2p:>10,.0f}")
    print(f"{'drain: same, including start-up':58} {overall_2p:>10,.0f}")
    naive_label = f"alternative: sync INSERT + sync commit per record ({ns.baseline_tasks})"
    print(f"{naive_label:58} {naive:>10,.0f}")
    app.close()
    base_app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
