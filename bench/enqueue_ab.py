"""A/B of enqueue by ``.delay()`` between source trees, alternated in one run; prints figures.

    python bench/enqueue_ab.py TREE [TREE ...] [--tasks 50000] [--rounds 4]
                               [--task noop|one] [--pyspy PREFIX]

Each round, for each tree in turn, a fresh process started from that tree (its cwd and
PYTHONPATH) sends N tasks to a fresh namespace on the local Kafka (6 partitions, no worker)
with ``task.delay()``, then ``app.flush()``; before the clock starts it has sent one task
and flushed (connected, topic metadata known). Printed per run:

- sends/s: N / wall time of the loop and the flush;
- main-thread CPU per send (``time.thread_time``) over the loop and the flush: what one
  Python thread pays per ``.delay()``, delivery reports served by the flush included;
- the same over the loop alone, and over the cheapest tenth of the loop (timed in ten
  slices: the slice least disturbed by other processes on a shared machine);
- the process's CPU per send over the loop and the flush (librdkafka's threads too).

``--task one`` sends ``one(i)`` (an int argument) instead of the argument-less ``noop()``.
With ``--pyspy``, ``py-spy record --nonblocking -r 500`` (raw collapsed stacks) samples the
sender over its loop and flush into ``PREFIX-<tree>-<round>.txt``. Trees are plain exports,
e.g. ``git archive COMMIT | tar -x -C /tmp/old``, or a worktree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

#: The loop is timed in this many slices; the cheapest slice is the least disturbed by
#: other processes on a shared machine.
SLICES = 10


def child(tree: Path, tasks: int, task_name: str, pyspy: str | None) -> None:
    """Send ``tasks`` tasks with ``.delay()`` from ``tree``'s code; print the figures as JSON."""
    sys.path.insert(0, str(tree))
    from bench.run import make_env
    from streamtasks import App, Settings

    app = App("bench", settings=Settings.from_env(env=make_env(f"enq-{uuid.uuid4().hex[:8]}")))

    @app.task(name="bench.noop")
    def noop() -> None:
        """Only sent."""

    @app.task(name="bench.one")
    def one(i: int) -> int:
        """Only sent."""
        return i

    app.ensure_queue("default")
    noop.delay()
    app.flush(timeout_s=60)  # warm: connected, topic metadata known
    spy = None
    if pyspy:
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "500", "--format",
                                "raw", "-o", pyspy, "--pid", str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach
    slice_size = max(tasks // SLICES, 1)
    slices: list[float] = []
    wall0, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    for first in range(0, tasks, slice_size):
        start = time.thread_time()
        if task_name == "one":
            for i in range(first, min(first + slice_size, tasks)):
                one.delay(i)
        else:
            for _ in range(min(slice_size, tasks - first)):
                noop.delay()
        slices.append((time.thread_time() - start) / slice_size * 1e6)
    loop_cpu = time.thread_time() - cpu0
    app.flush(timeout_s=300)
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    proc = time.process_time() - proc0
    if spy is not None:
        spy.send_signal(2)
        spy.wait(60)
    app.close()
    print(json.dumps({"per_s": tasks / wall, "cpu_us": cpu / tasks * 1e6,
                      "loop_cpu_us": loop_cpu / tasks * 1e6, "best_slice_us": min(slices),
                      "process_cpu_us": proc / tasks * 1e6}))


def run(tree: Path, tasks: int, task_name: str, pyspy: str | None) -> dict[str, float]:
    """Run one sender process from ``tree``; return its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
               "--tasks", str(tasks), "--task", task_name]
    if pyspy:
        command += ["--pyspy", pyspy]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True,
                         text=True, timeout=900)
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="*", help="source trees")
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--task", choices=("noop", "one"), default="noop")
    parser.add_argument("--pyspy", metavar="PREFIX")
    parser.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        child(Path(ns.child), ns.tasks, ns.task, ns.pyspy)
        return 0
    if not ns.trees:
        parser.error("give at least one source tree")
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in ns.trees}
    for round_ in range(ns.rounds):
        for tree in ns.trees:
            path = Path(tree).resolve()
            out = f"{ns.pyspy}-{path.name}-{round_}.txt" if ns.pyspy else None
            figures = run(path, ns.tasks, ns.task, out)
            results[tree].append(figures)
            print(f"round {round_} {tree}: {figures['per_s']:,.0f} sends/s, "
                  f"{figures['cpu_us']:.1f} us main-thread CPU/send "
                  f"({figures['loop_cpu_us']:.1f} in the loop, "
                  f"{figures['best_slice_us']:.1f} in its cheapest tenth), "
                  f"{figures['process_cpu_us']:.1f} us process CPU/send", flush=True)
    for tree, runs in results.items():
        def series(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            values = [r[key] for r in runs]
            return (" / ".join(format(v, fmt) for v in values)
                    + f" (median {format(statistics.median(values), fmt)})")

        print(f"{tree}: {series('per_s', ',.0f')} sends/s; "
              f"{series('cpu_us', '.1f')} us main-thread CPU/send; "
              f"{series('best_slice_us', '.1f')} us in the cheapest tenth of the loop; "
              f"{series('process_cpu_us', '.1f')} us process CPU/send")
    return 0


if __name__ == "__main__":
    sys.exit(main())
