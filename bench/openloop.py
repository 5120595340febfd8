"""Latency under open-loop load: tasks sent on a fixed schedule at 50% and 80% of a rate.

    python bench/openloop.py [--rate 4000] [--seconds 10]

Closed-loop measures (send, wait, send) hide queueing: here the send times are fixed in
advance (task i at t0 + i / rate), whatever the worker does, and each task's latency is
its row's ``finished_ms`` minus its scheduled send time — the time to the task's end;
the durable row follows within the write's latency (about a millisecond locally). One
``streamtasks worker`` (concurrency 8) serves the queue; prints p50 / p99 / p99.9.
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
from streamtasks import App, Settings  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(app: App, rate: float, seconds: float) -> list[float]:
    """Send ``rate`` tasks/s for ``seconds`` on a fixed schedule; return latencies (ms)."""
    count = int(rate * seconds)
    scheduled: dict[str, float] = {}
    t0 = time.time() + 0.5
    for i in range(count):
        due = t0 + i / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        scheduled[app.send("bench.noop").id] = due * 1000
        if i % 500 == 0:
            app.broker.poll(0)
    app.flush(timeout_s=120)
    ids = list(scheduled)
    deadline = time.monotonic() + 120
    metas = app.backend.fetch_many(ids)
    while any(m is None or not m.ready for m in metas) and time.monotonic() < deadline:
        time.sleep(0.5)
        metas = app.backend.fetch_many(ids)
    return [m.finished_ms - scheduled[m.task_id] for m in metas
            if m is not None and m.finished_ms is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=4000.0,
                        help="the drain rate the loads are fractions of (tasks/s)")
    parser.add_argument("--seconds", type=float, default=10.0)
    ns = parser.parse_args()
    namespace = f"bench-ol-{uuid.uuid4().hex[:8]}"
    env = make_env(namespace)
    app = App("bench", settings=Settings.from_env(env=env))
    from bench.bench_app import noop

    app.tasks["bench.noop"] = noop
    app.ensure_queue("default")
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8"], cwd=ROOT, env={**os.environ, **env})
    try:
        app.send("bench.noop", confirm=True).get(timeout=120)  # the worker has joined
        time.sleep(2)
        print(f"\n{'load':>20} {'tasks':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
        for share in (0.5, 0.8):
            latencies = run_load(app, ns.rate * share, ns.seconds)
            print(f"{f'{share:.0%} of {ns.rate:,.0f}/s':>20} {len(latencies):>7} "
                  f"{percentile(latencies, 0.5):>8.1f} {percentile(latencies, 0.99):>8.1f} "
                  f"{percentile(latencies, 0.999):>9.1f}")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
