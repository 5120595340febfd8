"""The result write path alone: client CPU per task of ``store_many``; prints figures.

    python bench/store_path.py [--batch 32] [--tasks 6400]

Writes ``--tasks`` no-op SUCCESS rows (and their listing entries) through the project's
Cassandra backend, ``--batch`` per ``store_many`` call as a worker turn does, with a few
batches in flight. Prints this process's CPU time per task (the driver's I/O thread
included) and wall time per task. CPU per task moves far less than wall time on a shared
machine: compare two versions by running this alternately from each tree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import deque
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtasks import App, Settings  # noqa: E402
from streamtasks.backend.base import TaskMeta  # noqa: E402

BACKEND = os.environ.get("STREAMTASKS_BACKEND", "cassandra://127.0.0.1:9042/streamtasks")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=6400)
    ns = parser.parse_args()
    app = App("bench", settings=Settings.from_env(
        env={"STREAMTASKS_BACKEND": BACKEND, "STREAMTASKS_BROKER": "memory://"}))
    backend = app.backend
    backend.migrate()
    queue = f"store-{uuid.uuid4().hex[:8]}"
    backend.store(TaskMeta(task_id=f"{queue}-warm", state="SUCCESS", queue=queue)).result()
    now = int(time.time() * 1000)
    batches = [
        [TaskMeta(task_id=uuid.uuid4().hex, state="SUCCESS", name="bench.noop", queue=queue,
                  attempts=1, worker="bench", created_ms=now, started_ms=now,
                  finished_ms=now + i) for _ in range(ns.batch)]
        for i in range(ns.tasks // ns.batch)
    ]
    window = max(1, 256 // ns.batch)
    pending: deque[Future[None]] = deque()
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        if len(pending) >= window:
            pending.popleft().result()
        pending.append(backend.store_many(batch))
    while pending:
        pending.popleft().result()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tasks = len(batches) * ns.batch
    print(f"store_many x{ns.batch}: {cpu / tasks * 1e6:.1f} us CPU/task, "
          f"{wall / tasks * 1e6:.1f} us wall/task ({tasks} tasks)")
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
