"""What confirming a run's children costs the run: its duration with and without the wait.

    python bench/children_confirm.py [--children 10] [--runs 60]

A fresh namespace on the local Kafka and Cassandra; ``--runs`` parents each send
``--children`` children, drained by an in-process worker. Printed: the median and p90
duration of a parent's run (from the task's start to its outcome, the wait for Kafka's
acknowledgements included), the first 10 runs left out as warm-up, once with the wait
(``Running.confirm_sends``, the worker's behaviour) and once with it replaced by a no-op
(the behaviour before: children still queued when the run ended). Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from integration._workers import make_app, new_namespace, worker_env  # noqa: E402
from streamtasks.context import Running  # noqa: E402
from streamtasks.worker import consumer  # noqa: E402

WARM_UP = 10


def measure(children: int, runs: int) -> list[float]:
    """Return the parents' run durations in ms (warm-up left out)."""
    app = make_app(worker_env(new_namespace("confirmcost"), STREAMTASKS_PARTITIONS="2"))
    took: list[float] = []

    @app.task(name="kid", queue="kids")
    def kid(i: int) -> None:
        return None

    @app.task(name="fan")
    def fan(n: int) -> None:
        for i in range(n):
            kid.delay(i)

    finished = consumer.Worker._finished

    def timed(self: Any, job: Any, outcome: Any, *rest: Any) -> None:
        took.append((outcome.finished_ns - outcome.started_ns) / 1e6)
        finished(self, job, outcome, *rest)

    consumer.Worker._finished = timed  # type: ignore[method-assign]
    try:
        for _ in range(runs):
            fan.delay(children)
        app.flush()
        app.drain(["default"], timeout_s=300)
    finally:
        consumer.Worker._finished = finished  # type: ignore[method-assign]
        app.close()
    return took[WARM_UP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=10)
    parser.add_argument("--runs", type=int, default=60)
    ns = parser.parse_args()
    confirm = Running.confirm_sends
    for label in ("confirmed", "not confirmed", "confirmed", "not confirmed"):
        Running.confirm_sends = (  # type: ignore[method-assign]
            confirm if label == "confirmed" else lambda self: None)
        took = sorted(measure(ns.children, ns.runs))
        print(f"{label:>14}: {len(took)} runs of a parent sending {ns.children} children: "
              f"median {statistics.median(took):.2f} ms, p90 {took[int(len(took) * 0.9)]:.2f} ms")
    Running.confirm_sends = confirm  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
