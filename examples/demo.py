"""The demo `make demo` runs: tasks through local Kafka, results in local Cassandra.

It starts one worker process per queue, sends tasks as a pipeline would, and reads
the results back through the library; then prints the CQL to read a row in cqlsh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.tasks import (  # noqa: E402
    Dataset,
    add,
    app,
    delete_dataset,
    import_dataset,
    multiply,
    report,
    total,
)
from streamtasks import chain, chord, group  # noqa: E402
from streamtasks.errors import StreamTasksError  # noqa: E402

QUEUES = {"default": 2, "datasets-import": 4, "datasets-delete": 1}


def start_workers() -> list[subprocess.Popen[bytes]]:
    procs = []
    for queue, concurrency in QUEUES.items():
        app.ensure_queue(queue)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "examples.tasks:app",
             "--queues", queue, "--concurrency", str(concurrency)],
            cwd=ROOT, env={**os.environ, "STREAMTASKS_LOG_LEVEL": "warning"},
        ))
    return procs


def main() -> int:
    app.backend.migrate()
    workers = start_workers()
    try:
        t0 = time.perf_counter()
        small = total.delay(list(range(1, 11)))
        big = total.delay(list(range(1_000_000)))
        imports = [import_dataset.delay(Dataset(f"sales-{i}", f"s3://bucket/sales-{i}.csv", 5000))
                   for i in range(4)]
        deletion = delete_dataset.delay("sales-old", hard=True)
        app.flush()
        print(f"sent 7 tasks in {time.perf_counter() - t0:.3f}s (the caller answers at once)")

        print("sum(1..10)         =", small.get(timeout=120))
        print("sum(range(10**6))  =", big.get(timeout=120))
        for r in imports:
            print("import             =", r.get(timeout=120))
        print("delete             =", deletion.get(timeout=120))
        keyspace = app.settings.backend.rsplit("/", 1)[-1].split("?")[0]
        print("\nRead the big sum's row in cqlsh:")
        print(f"  SELECT task_id, name, state, result, finished_at FROM {keyspace}.tasks "
              f"WHERE task_id = '{big.id}';")
        print(f"or: streamtasks result {big.id}")
        workflows()
        return 0
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=60)


def workflows() -> None:
    """Chain, group and chord (docs/workflows.md), across the demo's queues."""
    steps = chain(add.s(2, 3), multiply.s(4), add.s(1)).apply_async()
    squares = group(multiply.s(i, i) for i in range(5)).apply_async()
    batch = [Dataset(f"batch-{i}", f"s3://bucket/batch-{i}.csv", 1000 * (i + 1)) for i in range(3)]
    # members on the datasets-import queue, the body on default: runs once, when all succeeded
    imported = chord([import_dataset.s(d) for d in batch], report.s()).apply_async()
    app.flush()
    print("\nworkflows:")
    print("chain (2+3)*4+1    =", steps.get(timeout=120))
    print("group of squares   =", squares.get(timeout=120))
    print("chord report       =", imported.get(timeout=120))


def run() -> int:
    """Run the demo; a service that cannot be reached is one line on stderr, exit 1."""
    try:
        return main()
    except StreamTasksError as err:
        print(f"demo: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
