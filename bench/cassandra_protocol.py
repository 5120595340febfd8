"""Client CPU per task-row insert with Cassandra native protocol 4 and 5, side by side.

    python bench/cassandra_protocol.py [--inserts 20000] [--rounds 3]

The Python driver computes protocol 5's frame checksums (CRC24 / CRC32) in Python; this
measures what that costs the worker, whose loop issues one insert per task: the
process CPU time per ``execute_async`` of the ``tasks`` row (a window of 512 in flight).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid

from cassandra.cluster import Cluster

HOST = os.environ.get("CASSANDRA_HOST", "127.0.0.1")
KEYSPACE = os.environ.get("CASSANDRA_KEYSPACE", "streamtasks")
COLUMNS = ["task_id", "name", "queue", "state", "result", "result_value", "error_type",
           "error_message", "traceback", "attempts", "worker", "created_at", "started_at",
           "finished_at", "updated_at", "parent_id", "root_id", "group_id", "group_index",
           "extra"]


def measure(protocol: int, inserts: int) -> tuple[float, float]:
    """Return (inserts/s, client CPU µs per insert) for one round."""
    cluster = Cluster([HOST], protocol_version=protocol)
    session = cluster.connect(KEYSPACE)
    insert = session.prepare(f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES "
                             f"({', '.join('?' for _ in COLUMNS)}) USING TTL ?")
    window, left, done = threading.Semaphore(512), [inserts], threading.Event()
    lock = threading.Lock()

    def answered(_: object) -> None:
        window.release()
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()

    now = int(time.time() * 1000)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(inserts):
        window.acquire()
        row = (str(uuid.uuid4()), "bench.noop", "default", "SUCCESS", "null", b"\x00", None,
               None, None, 1, "bench", now, now, now, now, None, None, None, None, None, 600)
        session.execute_async(insert, row).add_callbacks(answered, answered)
    done.wait(120)
    rate = inserts / (time.perf_counter() - wall)
    per_insert_us = (time.process_time() - cpu) / inserts * 1e6
    cluster.shutdown()
    return rate, per_insert_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inserts", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    print(f"{'protocol':>8} {'round':>5} {'inserts/s':>10} {'CPU µs/insert':>14}")
    for round_ in range(ns.rounds):
        for protocol in (4, 5):
            rate, per_insert = measure(protocol, ns.inserts)
            print(f"{protocol:>8} {round_ + 1:>5} {rate:>10,.0f} {per_insert:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
