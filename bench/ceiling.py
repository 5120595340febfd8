"""The ceiling: a bare Python loop against the same Kafka and Cassandra; prints tasks/s.

    python bench/ceiling.py [--tasks 20000] [--json]

N no-op tasks are sent (``app.send`` + flush) to a fresh queue, then one loop in one
process drains them: ``consume(500)`` → Avro decode with the project's codec → one
``execute_async`` INSERT per task into the streamtasks ``tasks`` table (at most 512 in
flight; the project's session, so LOCAL_QUORUM and the same TTL) → once the batch's writes
are acknowledged, an asynchronous offset commit. Nothing else: no pool, no listing
entry, no retries, no follow-ups — what one Python process can do per task with the
same services. Clock: first record in hand → last write acknowledged and committed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtasks import App, Settings  # noqa: E402

BROKER = os.environ.get("STREAMTASKS_BROKER", "kafka://127.0.0.1:9092")
BACKEND = os.environ.get("STREAMTASKS_BACKEND", "cassandra://127.0.0.1:9042/streamtasks")
WINDOW = 512
POLL = 500


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(tasks: int) -> dict[str, float]:
    namespace = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    env = {"STREAMTASKS_BROKER": BROKER, "STREAMTASKS_BACKEND": BACKEND,
           "STREAMTASKS_NAMESPACE": namespace, "STREAMTASKS_PARTITIONS": "6",
           "STREAMTASKS_LOG_LEVEL": "warning"}
    app = App("bench", settings=Settings.from_env(env=env))
    app.backend.migrate()
    app.ensure_queue("default")
    for _ in range(tasks):
        app.send("bench.noop")
    app.flush(timeout_s=300)

    session = app.backend.session  # type: ignore[attr-defined]
    ks = BACKEND.rsplit("/", 1)[-1].split("?", 1)[0]
    insert = session.prepare(
        f"INSERT INTO {ks}.tasks (task_id, name, queue, state, worker, finished_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL 86400")
    consumer = Consumer({"bootstrap.servers": BROKER.split("://", 1)[1],
                         "group.id": f"{namespace}.ceiling", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([app.settings.topic("default")])
    codec = app.codec
    in_flight: collections.deque = collections.deque()
    done, t0 = 0, 0.0
    deadline = time.monotonic() + 600
    while done < tasks:
        if time.monotonic() > deadline:
            raise SystemExit(f"ceiling: {done} of {tasks} tasks after 600 s")
        batch = consumer.consume(POLL, 0.5)
        if not batch:
            continue
        t0 = t0 or time.perf_counter()
        now = int(time.time() * 1000)
        ends: dict[tuple[str, int], int] = {}
        for msg in batch:
            if msg.error():
                continue
            ends[(msg.topic(), msg.partition())] = msg.offset() + 1
            task = codec.decode_task(msg.value())
            if len(in_flight) >= WINDOW:
                in_flight.popleft().result()
            in_flight.append(session.execute_async(
                insert, (task.id, task.name, task.queue, "SUCCESS", "ceiling", now, now)))
            done += 1
        while in_flight:
            in_flight.popleft().result()
        if ends:  # the last commit waits for the broker
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                            asynchronous=done < tasks)
    elapsed = time.perf_counter() - t0
    rss = rss_mb()
    consumer.close()
    app.close()
    return {"tasks": tasks, "drain_per_s": tasks / elapsed, "seconds": elapsed, "rss_mb": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    ns = parser.parse_args()
    result = run(ns.tasks)
    if ns.json:
        print(json.dumps(result))
    else:
        print(f"ceiling: bare loop, one INSERT per task: {result['drain_per_s']:,.0f} tasks/s "
              f"({ns.tasks} tasks, {result['seconds']:.2f} s, RSS {result['rss_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
