"""A worker's memory with a small and a huge backlog: RSS must not grow with the backlog.

    python bench/backlog_rss.py [--small 10000] [--large 1000000] [--seconds 20]

For each backlog size: send the tasks (no worker running), start one ``streamtasks
worker`` (concurrency 8), sample its RSS every 0.5 s for ``--seconds`` while it drains,
and print the peak beside the records it finished meanwhile. Records wait in Kafka, not
in the worker: it takes no more than ``max_in_flight`` (1000) at a time, and librdkafka's
prefetch is bounded by its queue settings.
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

from bench.run import committed_total, make_env, send_tasks  # noqa: E402
from streamtasks import App, Settings  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(backlog: int, seconds: float) -> tuple[float, int, float]:
    """Return (peak RSS MiB, tasks done, send rate) for a worker draining ``backlog``."""
    namespace = f"bench-rss-{uuid.uuid4().hex[:8]}"
    env = make_env(namespace)
    app = App("bench", settings=Settings.from_env(env=env))
    from bench.bench_app import noop

    app.tasks["bench.noop"] = noop
    app.ensure_queue("default")
    send_rate = send_tasks(app, backlog)
    app.close()
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8"], cwd=ROOT, env={**os.environ, **env})
    peak = 0.0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and worker.poll() is None:
            peak = max(peak, rss_mib(worker.pid))
            time.sleep(0.5)
        done = committed_total(f"{namespace}.default", f"{namespace}.default", 6)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    return peak, done, send_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    ns = parser.parse_args()
    rows = [(n, *measure(n, ns.seconds)) for n in (ns.small, ns.large)]
    print(f"\n{'backlog':>10} {'peak RSS MiB':>13} {'done in window':>15} {'sent/s':>9}")
    for backlog, peak, done, send_rate in rows:
        print(f"{backlog:>10,} {peak:>13.1f} {done:>15,} {send_rate:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
