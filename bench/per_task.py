"""The worker's per-task pieces, each timed alone in this process; prints µs per call.

    python bench/per_task.py [--number 20000]

What a worker does per record besides the result write (``bench/store_path.py``): decode
the Avro task message, bind its arguments to the task's signature, and enter and leave
the run's scope (trace span, log fields, request). Each figure is the best of 5 repeats
of this thread's CPU time (not wall time), so it moves little on a busy machine: compare
two versions by running this alternately from each tree.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtasks import App  # noqa: E402
from streamtasks.codec.convert import bind_arguments  # noqa: E402
from streamtasks.context import Running  # noqa: E402
from streamtasks.message import TaskMessage  # noqa: E402
from streamtasks.worker.executor import _scope  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20_000)
    ns = parser.parse_args()
    app = App("bench", broker="memory://", backend="memory://")

    @app.task(name="bench.noop")
    def noop() -> None:
        """Do nothing."""

    msg = TaskMessage(id="7d3c1a52-0f0e-4b8e-9a51-6d2f5c1e9b10", name="bench.noop",
                      queue="default", args=[], kwargs={},
                      traceparent=f"00-{'1' * 32}-{'2' * 16}-01")
    data = app.codec.encode_task(msg)
    context = {"task_id": msg.id, "queue": msg.queue, "attempt": msg.attempt,
               "partition": 0, "offset": 5, "traceparent": msg.traceparent}
    running = Running(noop, msg, 0, 5, "bench")

    def scope() -> None:
        with _scope(msg.name, context, running):
            pass

    pieces: dict[str, Callable[[], object]] = {
        "decode_task": lambda: app.codec.decode_task(data),
        "bind_arguments": lambda: bind_arguments(noop.fn, [], {}),
        "run scope (trace, log fields, request)": scope,
    }
    for name, piece in pieces.items():
        best = min(timeit.repeat(piece, timer=time.thread_time, number=ns.number,
                                 repeat=5)) / ns.number
        print(f"{name:40} {best * 1e6:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
