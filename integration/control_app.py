"""Tasks of the control integration tests (integration/test_control_kafka.py).

Settings come from STREAMTASKS_*; ``IT_EXEC_LOG`` names the execution log and
``IT_SCHEDULE_EVERY`` (seconds) declares the periodic task ``ctl.tick``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from integration.worker_app import _record_execution
from streamtasks import App
from streamtasks.worker.procpool import SoftTimeLimitExceeded

app = App.from_env("control")


@app.task(name="ctl.tick", queue="ticks", bind=True)
def tick(self: Any) -> None:
    """Record the id of this firing (one id per due time)."""
    _record_execution(f"tick:{self.request.id}")


if os.environ.get("IT_SCHEDULE_EVERY"):
    app.periodic(every=float(os.environ["IT_SCHEDULE_EVERY"]), name="it.tick")(tick)


@app.task(name="ctl.count")
def count(i: int) -> int:
    """Record one execution of ``i``."""
    _record_execution(str(i))
    return i


@app.task(name="ctl.slow")
def slow(ms: int) -> None:
    """Record the start, then hold a worker thread for ``ms`` milliseconds."""
    _record_execution("slow")
    time.sleep(ms / 1000)


@app.task(name="ctl.limited", queue="limited", group_rate_limit="20/s")
def limited(i: int) -> int:
    """A task the whole group runs at most 20 times a second."""
    return i


@app.task(name="ctl.other", queue="other")
def other(i: int) -> int:
    """A task of another queue (served while limited tasks wait)."""
    return i


@app.task(name="ctl.hold_async")
async def hold_async(path: str) -> None:
    """Write ``path``, then wait for ever on the event loop (until terminated)."""
    Path(path).write_text("started")
    while True:
        await asyncio.sleep(0.05)


@app.task(name="ctl.spin", pool="process", time_limit=2)
def spin() -> None:
    """Loop for ever in a child process (killed at its time limit)."""
    while True:
        pass


@app.task(name="ctl.tidy", pool="process", soft_time_limit=1, time_limit=30)
def tidy(path: str) -> str:
    """Wait; at the soft time limit write ``path`` and return."""
    try:
        while True:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        Path(path).write_text("cleaned up")
        return "cleaned up"
