"""Tasks run by the integration tests' worker processes (settings from STREAMTASKS_*)."""

from __future__ import annotations

import os

from streamtasks import App

app = App.from_env("integration")
_LOG = os.environ.get("IT_EXEC_LOG")


def _record_execution(tag: str) -> None:
    # One unbuffered append per execution, so a SIGKILL loses none that happened.
    if _LOG:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{tag}\n".encode())
        finally:
            os.close(fd)


@app.task(name="it.count")
def count(i: int) -> int:
    """Record one execution of task ``i`` and return it doubled."""
    _record_execution(str(i))
    return i * 2


@app.task(name="it.noop")
def noop() -> None:
    """Do nothing (throughput measurements)."""


@app.task(name="it.sleep")
def sleep_ms(ms: int, i: int) -> int:
    """Hold a worker slot for ``ms`` milliseconds (keeps load on during outages)."""
    import time

    time.sleep(ms / 1000)
    return i


@app.task(name="it.add")
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b
