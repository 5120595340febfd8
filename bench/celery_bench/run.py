"""Celery 5 + Redis side of `make bench`; prints one JSON object.

    bench/.venv-celery/bin/python bench/celery_bench/run.py --redis 127.0.0.1:P [--tasks N]

Starts a worker (threads pool, concurrency 8, prefetch multiplier default 4, without
gossip/mingle/heartbeat), warms it with one task, then measures: ``--roundtrips``
sequential ``noop.delay().get()`` (p50/p99); a burst of N ``noop.delay()`` (enqueue rate)
and the clock from the first send to the last result stored in the Redis backend (every
result is checked, MGET 500 at a time); the worker's RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[int((len(ordered) - 1) * p / 100)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True, help="host:port")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--roundtrips", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    ns = parser.parse_args()
    os.environ["CELERY_BENCH_REDIS"] = ns.redis
    sys.path.insert(0, str(HERE))
    import celery
    import redis
    from tasks import noop

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "threads",
         "--concurrency", str(ns.concurrency), "--loglevel", "warning", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-Q", "celery_bench"],
        cwd=HERE, env={**os.environ}, stdout=sys.stderr)
    try:
        noop.delay().get(timeout=120)  # warm: the worker is up and has run a task
        lat = []
        for _ in range(ns.roundtrips):
            t0 = time.perf_counter()
            noop.delay().get(timeout=10)
            lat.append((time.perf_counter() - t0) * 1000)

        ids = []
        start = time.perf_counter()
        for _ in range(ns.tasks):
            ids.append(noop.delay().id)
        sent = time.perf_counter() - start
        client = redis.Redis.from_url(f"redis://{ns.redis}/0")
        keys = [f"celery-task-meta-{i}" for i in ids]
        done = 0
        while done < len(keys):
            batch = keys[done:done + 500]
            advanced = 0
            for raw in client.mget(batch):
                if raw is None or json.loads(raw)["status"] != "SUCCESS":
                    break
                advanced += 1
            done += advanced
            if advanced < len(batch):
                time.sleep(0.002)
            if time.perf_counter() - start > 600:
                raise SystemExit(f"celery: {done} of {ns.tasks} results stored after 600 s")
        total = time.perf_counter() - start
        print(json.dumps({
            "tasks": ns.tasks, "end_to_end_per_s": ns.tasks / total,
            "enqueue_per_s": ns.tasks / sent, "seconds": total,
            "roundtrip_p50_ms": statistics.median(lat), "roundtrip_p99_ms": pct(lat, 99),
            "rss_mb": rss_mb(worker.pid), "version": celery.__version__,
        }))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
