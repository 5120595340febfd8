"""Cost of RECEIVED / STARTED tracking on short tasks: drain rate, A/B/C in one run.

    python bench/progress_cost.py [--tasks 3000] [--rounds 3] [--memory]

Per round and variant, N no-op tasks are sent to a fresh namespace on the local Kafka,
then drained by an in-process worker writing to the local Cassandra; the rate counts from
the worker's start to idle. With ``--memory`` both are ``memory://``: no I/O, so the
figure is the bookkeeping's CPU cost alone (short tasks make no progress write).
Variants, interleaved each round so that the machine's load falls on all alike:

- ``off``: ``track_started_after_ms=0`` (no progress bookkeeping at all);
- ``threshold``: the default, ``track_started_after_ms=200`` (short tasks: a deque entry,
  no write);
- ``at-once``: ``track_started=True`` (a STARTED write per task, for comparison).

Prints each rate and this process's CPU time per task (less sensitive to the machine's
other load than the wall clock), with the median ratios to ``off``; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtasks import App, Settings  # noqa: E402

BROKER = os.environ.get("STREAMTASKS_BROKER", "kafka://127.0.0.1:9092")
BACKEND = os.environ.get("STREAMTASKS_BACKEND", "cassandra://127.0.0.1:9042/streamtasks")
VARIANTS = {
    "off": {"track_started_after_ms": 0.0},
    "threshold": {"track_started_after_ms": 200.0},
    "at-once": {"track_started": True},
}


def drain_rate(count: int, options: dict[str, object], memory: bool) -> tuple[float, float]:
    """Send ``count`` no-op tasks, drain them with an in-process worker.

    Returns tasks per second (wall clock) and this process's CPU microseconds per task
    (less sensitive to the other processes on a busy machine).
    """
    broker, backend = ("memory://", "memory://") if memory else (BROKER, BACKEND)
    settings = Settings(broker=broker, backend=backend, partitions=6, commit_interval_s=0.05,
                        namespace="bp" + uuid.uuid4().hex[:10], log_level="warning",
                        **options)  # type: ignore[arg-type]
    app = App("bench-progress", settings=settings)

    @app.task(name="bench.noop")
    def noop() -> None:
        """Do nothing."""

    for _ in range(count):
        noop.delay()
    app.flush(timeout_s=300)
    worker = app.worker(["default"], concurrency=8)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        worker.run_until_idle(600)
        rate = count / (time.perf_counter() - started)
        cpu_us = (time.process_time() - cpu) / count * 1e6
    finally:
        worker.close()
        app.close()
    return rate, cpu_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="memory:// broker and backend")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_no in range(args.rounds):
        order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            rate, cpu_us = drain_rate(args.tasks, VARIANTS[name], args.memory)
            rates[name].append(rate)
            cpus[name].append(cpu_us)
            print(f"round {round_no + 1} {name:9s} {rate:8.0f} tasks/s {cpu_us:7.1f} CPU us/task",
                  flush=True)
    base, base_cpu = statistics.median(rates["off"]), statistics.median(cpus["off"])
    for name in VARIANTS:
        rate, cpu_us = statistics.median(rates[name]), statistics.median(cpus[name])
        print(f"{name:9s} median {rate:8.0f} tasks/s (x{rate / base:.3f}), "
              f"{cpu_us:7.1f} CPU us/task (x{cpu_us / base_cpu:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
