"""Latency under open-loop load: tasks sent on a fixed schedule at 50% and 80% of a rate.

    python bench/openloop.py [--rate N] [--seconds 10]

``--rate`` defaults to the burst end-to-end rate of one worker process in
``bench/results/latest.json`` (``make bench`` runs ``compare.py`` first), else 4,000/s.

Closed-loop measures (send, wait, send) hide queueing: here the send times are fixed in
advance (task i at t0 + i / rate), whatever the worker does, and each task's latency is
its row's ``finished_ms`` minus its scheduled send time — the time to the task's end;
the durable row follows within the write's latency (about a millisecond locally). One
``streamtasks worker`` (concurrency 8) serves the queue; prints p50 / p99 / p99.9.

Each load runs in two layouts of the same machine (``--layouts``): ``shared``, every
process free to run on every CPU; and ``split``, the local services' JVMs (Kafka and
Cassandra of ``deploy/local``, found by their pid files) held to the first CPU and the
worker and this sender to the others — the production layout, where the broker and the
database do not run on the worker's cores. The services get their CPUs back at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ab_drain import cpu_s, with_options  # noqa: E402
from bench.run import make_env  # noqa: E402
from streamtasks import App, Settings  # noqa: E402

#: The sender's shortest sleep. Sleeping until each task's own send time (every 250 us
#: at 4,000/s) woke the sender 4,000 times a second and cost it a third of a core on a
#: 2-core machine the worker, Kafka and Cassandra share; tasks already due go at once.
SLEEP_MIN_S = 0.001


#: The sender's producer waits up to 5 ms to fill a batch (librdkafka's own default; the
#: project's producer waits 1 ms, for a lone task's round trip). Sending 4,000 tasks a
#: second with 1 ms made ~5x the produce requests and fetches, and Kafka took 44-48% of
#: a core instead of 23% on this 2-core machine, which the worker shares with it.
SENDER_LINGER = "linger.ms=5"

#: Where ``deploy/local/services.sh`` keeps the pid files of the single-node services.
SERVICES_DATA = ROOT / "deploy" / "local" / ".data"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measured_rate(default: float = 4000.0) -> float:
    """The burst rate of one worker process in ``bench/results/latest.json``, else ``default``."""
    try:
        latest = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
        rate = float(latest["results"]["streamtasks_1p"]["end_to_end_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"no burst rate in bench/results/latest.json: loads are of {default:,.0f}/s")
        return default
    print(f"loads are fractions of the burst rate measured by compare.py: {rate:,.0f}/s "
          f"(bench/results/latest.json, {latest.get('when', '?')})")
    return rate


def cpu_times() -> tuple[int, int]:
    """The machine's busy and total CPU time so far (jiffies, all cores; /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def service_pids() -> dict[int, set[int]]:
    """The local services' running JVMs: pid → the CPUs they may use now (to put back)."""
    pids = {}
    for name in ("kafka", "cassandra"):
        try:
            pid = int((SERVICES_DATA / f"{name}.pid").read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"-Dstreamtasks.service=" in cmdline.read():
                    pids[pid] = os.sched_getaffinity(pid)
        except (OSError, ValueError):
            continue
    return pids


def pin(pid: int, cpus: set[int]) -> None:
    """Hold every thread of process ``pid`` to ``cpus`` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue


def split_layout(services: dict[int, set[int]], worker: int, every: set[int]) -> str | None:
    """Put the services on the first CPU and ``worker`` and this process on the others.

    Return why the layout cannot be had here, else None.
    """
    if len(every) < 2:
        return "one CPU only"
    if len(services) < 2:
        return f"Kafka and Cassandra of deploy/local are not both running ({SERVICES_DATA})"
    first = min(every)
    for pid in services:
        pin(pid, {first})
    for pid in (worker, os.getpid()):
        pin(pid, every - {first})
    return None


def shared_layout(services: dict[int, set[int]], worker: int, every: set[int]) -> None:
    """Give the services the CPUs they had, and ``worker`` and this process ``every``."""
    for pid, cpus in (*services.items(), (worker, every), (os.getpid(), every)):
        try:
            pin(pid, cpus)
        except FileNotFoundError:  # the process ended
            continue


def run_load(app: App, rate: float, seconds: float
             ) -> tuple[list[tuple[float, float, float, float, float]], float]:
    """Send ``rate`` tasks/s for ``seconds`` on a fixed schedule.

    Return per task: its latency (ms), its scheduled send (epoch ms), and its parts:
    scheduled send to created (the sender's lag), created to started (Kafka and the
    worker's queue), started to finished; and how busy the machine's CPUs were while
    the tasks were sent (0-1: everything on it, Kafka and Cassandra included).
    """
    count = int(rate * seconds)
    scheduled: dict[str, float] = {}
    t0 = time.time() + 0.5
    busy_before = None
    for i in range(count):
        due = t0 + i / rate
        wait = due - time.time()
        if wait > 0:  # send what is due, then sleep: never early, at most ~1 ms late
            time.sleep(max(wait, SLEEP_MIN_S))
        if busy_before is None:
            busy_before = cpu_times()
        scheduled[app.send("bench.noop").id] = due * 1000
        if i % 500 == 0:
            app.broker.poll(0)
    busy_after = cpu_times()
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]) if (
        busy_before is not None) else 0.0
    app.flush(timeout_s=120)
    ids = list(scheduled)
    deadline = time.monotonic() + 120
    metas = app.backend.fetch_many(ids)
    while any(m is None or not m.ready for m in metas) and time.monotonic() < deadline:
        time.sleep(0.5)
        metas = app.backend.fetch_many(ids)
    rows: list[tuple[float, float, float, float, float]] = []
    for m in metas:
        if m is None or m.finished_ms is None:
            continue
        due, created, started = scheduled[m.task_id], m.created_ms or 0, m.started_ms or 0
        rows.append((m.finished_ms - due, due, created - due, started - created,
                     m.finished_ms - started))
    return rows, busy


def print_load(app: App, worker: int, layout: str, share: float, rate: float,
               seconds: float, dump: str | None) -> None:
    """Run one load and print its line (and write its rows with ``--dump``)."""
    cpu_before = cpu_s(worker)
    rows, busy = run_load(app, rate * share, seconds)
    cpu_us = (cpu_s(worker) - cpu_before) / max(1, len(rows)) * 1e6
    total, _, sender, queued, ran = ([row[i] for row in rows] for i in range(5))
    if dump:
        with open(f"{dump}-{layout}-{share:.0%}.csv", "w", encoding="utf-8") as out:
            out.writelines(",".join(f"{v:.1f}" for v in row) + "\n"
                           for row in sorted(rows, key=lambda r: r[1]))
    print(f"{layout:>6} {f'{share:.0%} of {rate:,.0f}/s':>20} {len(rows):>7} "
          f"{percentile(total, 0.5):>8.1f} {percentile(total, 0.99):>8.1f} "
          f"{percentile(total, 0.999):>9.1f}   {'':>17} {percentile(sender, 0.99):>6.1f} "
          f"{percentile(queued, 0.99):>6.1f} {percentile(ran, 0.99):>6.1f}"
          f"   {cpu_us:>9.0f} us   {busy:>16.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=None,
                        help="the drain rate the loads are fractions of (tasks/s; default: "
                             "latest.json's burst rate of one worker process, else 4000)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shares", default="0.5,0.8",
                        help="the loads, as fractions of the rate (comma-separated)")
    parser.add_argument("--layouts", default="shared,split",
                        help="shared (every process on every CPU) and/or split (the "
                             "services' JVMs on the first CPU, the worker and the sender on "
                             "the others); comma-separated")
    parser.add_argument("--dump", metavar="PREFIX",
                        help="write each task's figures to PREFIX-<layout>-<load>.csv "
                             "(scheduled order)")
    ns = parser.parse_args()
    layouts = [name.strip() for name in ns.layouts.split(",") if name.strip()]
    unknown = sorted(set(layouts) - {"shared", "split"})
    if unknown or not layouts:
        parser.error(f"--layouts takes shared and/or split, got {ns.layouts!r}")
    if ns.rate is None:
        ns.rate = measured_rate()
    namespace = f"bench-ol-{uuid.uuid4().hex[:8]}"
    env = make_env(namespace)
    sender_env = {**env, "STREAMTASKS_BROKER": with_options(env["STREAMTASKS_BROKER"],
                                                           SENDER_LINGER)}
    app = App("bench", settings=Settings.from_env(env=sender_env))
    from bench.bench_app import noop

    app.tasks["bench.noop"] = noop
    app.ensure_queue("default")
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8"], cwd=ROOT, env={**os.environ, **env})
    services, every = service_pids(), os.sched_getaffinity(0)
    try:
        app.send("bench.noop", confirm=True).get(timeout=120)  # the worker has joined
        time.sleep(2)
        print(f"\n{'layout':>6} {'load':>20} {'tasks':>7} {'p50 ms':>8} {'p99 ms':>8}"
              f" {'p99.9 ms':>9}   p99 of its parts: {'sender':>6} {'queued':>6} {'run':>6}"
              f"   worker CPU/task   machine CPU busy")
        for layout in layouts:
            if layout == "split":
                why = split_layout(services, worker.pid, every)
                if why is not None:
                    print(f"{layout:>6} not measured: {why}")
                    continue
            else:
                shared_layout(services, worker.pid, every)
            for share in (float(x) for x in ns.shares.split(",")):
                print_load(app, worker.pid, layout, share, ns.rate, ns.seconds, ns.dump)
    finally:
        shared_layout(services, worker.pid, every)
        worker.terminate()
        worker.wait(timeout=60)
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
