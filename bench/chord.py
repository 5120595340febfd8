"""A 10,000-member chord against the same members as a plain group; prints figures.

    python bench/chord.py [--members 10000]

One ``streamtasks worker`` process (concurrency 8) runs both, on the local Kafka and
Cassandra, in one run:

1. group: N members, no callback; timed from sending to the last member's row being
   final (``GroupResult.get``).
2. chord: the same N members and a body that receives the N results; timed from
   sending to the body's result. The difference is the join (a member row, a count of
   its 64-member shard, and for the last of a shard a mark and a count of the marks)
   plus the one lightweight transaction and the read of all results.

3. chain: 100 steps of ``x + 1``, timed to the last step's result, beside the same 100
   calls made one after another by the client (``delay().get()`` each): the hop a
   worker makes from one step to the next against the client's round trip.

It also prints the largest partition the chord wrote (rows per ``group_members``
partition, and the number of ``group_shards`` marks): nothing grows with N but the
number of partitions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import make_env  # noqa: E402
from streamtasks import App, GroupResult, Settings, chain, chord, group  # noqa: E402
from streamtasks.backend.base import GROUP_SHARD_SIZE  # noqa: E402
from streamtasks.signature import Signature  # noqa: E402


def start_worker(namespace: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **make_env(namespace)}
    return subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8"], cwd=ROOT, env=env)


def partition_sizes(app: App, group_id: str, members: int) -> tuple[int, int, int]:
    """Return (member partitions, most rows in one, shard marks) of a chord's join rows."""
    session = app.backend.session  # type: ignore[attr-defined]
    keyspace = app.backend.keyspace  # type: ignore[attr-defined]
    shards = -(-members // GROUP_SHARD_SIZE)
    largest = 0
    for shard in range(shards):
        row = session.execute(
            f'SELECT COUNT(*) AS n FROM "{keyspace}".group_members '
            "WHERE group_id = %s AND shard = %s", (group_id, shard)).one()
        largest = max(largest, row["n"])
    marks = session.execute(
        f'SELECT COUNT(*) AS n FROM "{keyspace}".group_shards WHERE group_id = %s',
        (group_id,)).one()["n"]
    return shards, largest, marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=10_000)
    ns = parser.parse_args()
    n = ns.members

    namespace = f"bench-chord-{uuid.uuid4().hex[:8]}"
    app = App("bench", settings=Settings.from_env(env=make_env(namespace)))
    app.backend.migrate()
    app.ensure_queue("default")
    members = [Signature("bench.one", (i,), app=app) for i in range(n)]
    worker = start_worker(namespace)
    try:
        # warm-up: the worker has joined its group and connected to Cassandra
        Signature("bench.one", (0,), app=app).delay().get(timeout=120)

        t0 = time.perf_counter()
        plain = group(members).apply_async()
        app.flush(timeout_s=300)
        assert isinstance(plain, GroupResult)
        assert plain.get(timeout=600) == list(range(n))
        group_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        fired = chord(members, Signature("bench.count", app=app)).apply_async()
        app.flush(timeout_s=300)
        assert fired.get(timeout=600) == n
        chord_s = time.perf_counter() - t0
        assert isinstance(fired.parent, GroupResult)
        shards, largest, marks = partition_sizes(app, fired.parent.id, n)

        steps = 100
        t0 = time.perf_counter()
        last = chain(*[Signature("bench.inc", (0,) if i == 0 else (), app=app)
                       for i in range(steps)]).apply_async()
        app.flush()
        assert last.get(timeout=600) == steps
        chain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        value = 0
        for _ in range(steps):
            value = Signature("bench.inc", (value,), app=app).delay().get(timeout=60)
        client_s = time.perf_counter() - t0
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    app.close()

    print()
    print(f"{'measure (1 worker process, concurrency 8)':58} {'seconds':>8} {'members/s':>10}")
    print(f"{f'group of {n:,} members, until all rows final':58} {group_s:>8.2f} "
          f"{n / group_s:>10,.0f}")
    print(f"{f'chord of {n:,} members, until the body returned':58} {chord_s:>8.2f} "
          f"{n / chord_s:>10,.0f}")
    print(f"{f'chain of {steps} steps, per step':58} {chain_s / steps:>8.4f}")
    print(f"{f'alternative: {steps} delay().get() round trips, per call':58} "
          f"{client_s / steps:>8.4f}")
    print(f"join rows: {shards} member partitions of at most {largest} rows; "
          f"{marks} shard marks in one partition")
    return 0


if __name__ == "__main__":
    sys.exit(main())
