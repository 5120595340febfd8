"""A/B of the worker's drain between source trees, alternated in one run; prints figures.

    python bench/ab_drain.py TREE[?OPTIONS] [TREE[?OPTIONS] ...] [--tasks 20000] [--rounds 3]
                             [--pyspy PREFIX]

Each round, for each tree in turn: N no-op tasks are sent to a fresh queue (6
partitions), then one ``streamtasks worker`` (concurrency 8) started from that tree (its
cwd and PYTHONPATH) drains them. Printed per run: the drain rate from the worker's first
commit to its last, and the worker's CPU time per task over the same span (utime + stime
from /proc) — CPU per task moves far less than the rate on a shared machine. With
``--pyspy``, ``py-spy record --gil`` (raw collapsed stacks) samples each worker over the
drain into ``PREFIX-<tree>-<round>.txt``. Trees are plain exports, e.g.
``git archive COMMIT | tar -x -C /tmp/old``. A tree given as ``TREE?writer=acsylla``
runs its worker with those options appended to the backend URL (the same tree may be
given twice, with and without, to compare backend options in one run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import committed_total, make_env, send_tasks  # noqa: E402
from streamtasks import App, Settings  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_options(url: str, options: str) -> str:
    """Return the service ``url`` with the query ``options`` appended (none: as is)."""
    if not options:
        return url
    return url + ("&" if "?" in url else "?") + options


def drain(tree: Path, tasks: int, pyspy: str | None, options: str = "") -> tuple[float, float]:
    """Return (tasks/s, worker CPU us per task) of one drain by a worker from ``tree``.

    ``options`` (``writer=acsylla``) are appended to the worker's backend URL.
    """
    namespace = f"ab-{uuid.uuid4().hex[:8]}"
    app = App("bench", settings=Settings.from_env(env=make_env(namespace)))
    app.ensure_queue("default")
    send_tasks(app, tasks)
    app.close()
    env = {**os.environ, **make_env(namespace), "PYTHONPATH": str(tree)}
    env["STREAMTASKS_BACKEND"] = with_options(env["STREAMTASKS_BACKEND"], options)
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", "8"], cwd=tree, env=env)
    group = topic = f"{namespace}.default"
    spy = None
    first: tuple[float, int, float] | None = None
    deadline = time.monotonic() + 600
    try:
        while True:
            done = committed_total(group, topic, 6)
            now = time.perf_counter()
            if done and first is None:
                first = (now, done, cpu_s(worker.pid))
                if pyspy:
                    spy = subprocess.Popen(
                        ["py-spy", "record", "--gil", "-r", "200", "--format", "raw",
                         "-o", pyspy, "--pid", str(worker.pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if done >= tasks:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{tree}: {done} of {tasks} tasks after 600 s")
            time.sleep(0.05)
        assert first is not None
        drained = tasks - first[1]
        cpu = cpu_s(worker.pid) - first[2]
        return drained / max(now - first[0], 1e-9), cpu / max(drained, 1) * 1e6
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        worker.terminate()
        worker.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="+", help="source trees, each as TREE or TREE?OPTIONS")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pyspy", metavar="PREFIX")
    ns = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {tree: [] for tree in ns.trees}
    for round_ in range(ns.rounds):
        for tree in ns.trees:
            path, _, options = tree.partition("?")
            label = Path(path).name + (f"-{options.replace('=', '-')}" if options else "")
            out = f"{ns.pyspy}-{label}-{round_}.txt" if ns.pyspy else None
            rate, cpu = drain(Path(path).resolve(), ns.tasks, out, options)
            results[tree].append((rate, cpu))
            print(f"round {round_} {tree}: {rate:,.0f} tasks/s, {cpu:.0f} us CPU/task",
                  flush=True)
    for tree, runs in results.items():
        rates = " / ".join(f"{rate:,.0f}" for rate, _ in runs)
        cpus = " / ".join(f"{cpu:.0f}" for _, cpu in runs)
        print(f"{tree}: {rates} tasks/s (median {statistics.median(r for r, _ in runs):,.0f}); "
              f"{cpus} us CPU/task (median {statistics.median(c for _, c in runs):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
