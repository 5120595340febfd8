"""One worker serving many queues: its RSS and threads once every group is joined.

A worker holds one consumer group membership per queue, plus one per queue for the
delay forwarder (issue 9). This starts ``streamtasks worker`` for 1 and for 20 queues
against the local Kafka + Cassandra and prints, side by side, the process's resident
memory and thread count once it owns partitions of every queue.

    python bench/many_queues.py [--queues 1,20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parent.parent


def _status(pid: int) -> tuple[float, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    return rss_mib, int(fields["Threads"])


def _joined(admin: AdminClient, groups: list[str]) -> bool:
    described = admin.describe_consumer_groups(groups, request_timeout=10)
    for future in described.values():
        group = future.result()
        if not any(m.assignment.topic_partitions for m in group.members):
            return False
    return True


def measure(count: int, bootstrap: str) -> tuple[float, int, float]:
    """Start a worker on ``count`` queues; return (RSS MiB, threads, seconds to join)."""
    namespace = f"bench-mq-{uuid.uuid4().hex[:6]}"
    queues = [f"q{i}" for i in range(count)]
    env = {**os.environ, "STREAMTASKS_NAMESPACE": namespace, "STREAMTASKS_PARTITIONS": "2",
           "STREAMTASKS_LOG_LEVEL": "warning"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "examples.tasks:app",
         "--queues", ",".join(queues), "--concurrency", "8"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    groups = [f"{namespace}.{q}" for q in queues] + [f"{namespace}.{q}.delayer" for q in queues]
    try:
        deadline = time.monotonic() + 180
        while not _joined(admin, groups):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker on {count} queues did not join its groups")
            time.sleep(0.5)
        joined_s = time.monotonic() - started
        time.sleep(2)
        rss, threads = _status(proc.pid)
        return rss, threads, joined_s
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queues", default="1,20")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    ns = parser.parse_args()
    print(f"{'queues':>6} {'groups':>6} {'RSS MiB':>8} {'threads':>8} {'joined in':>10}")
    for count in (int(c) for c in ns.queues.split(",")):
        rss, threads, joined_s = measure(count, ns.bootstrap)
        print(f"{count:>6} {2 * count:>6} {rss:>8.1f} {threads:>8} {joined_s:>9.1f}s")


if __name__ == "__main__":
    main()
