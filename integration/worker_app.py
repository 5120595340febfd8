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


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


@app.task(name="it.stamp")
def stamp(i: int) -> int:
    """Record when task ``i`` started (ms since the epoch) and return that time."""
    started = _now_ms()
    _record_execution(f"{i}:{started}")
    return started


@app.task(name="it.flaky", max_retries=3, backoff="fibonacci", backoff_s=1.0)
def flaky(key: str, failures: int) -> int:
    """Fail the first ``failures`` attempts of ``key``, then succeed; return the attempt."""
    _record_execution(f"{key}:{_now_ms()}")
    attempts = 0
    if _LOG:
        with open(_LOG) as log:
            attempts = sum(1 for line in log if line.startswith(f"{key}:"))
    if attempts <= failures:
        raise RuntimeError(f"{key}: failing attempt {attempts} on purpose")
    return attempts


@app.task(name="it.always_fails", max_retries=2, backoff="fixed", backoff_s=0.5)
def always_fails() -> None:
    """Fail every attempt."""
    raise RuntimeError("this task always fails")


@app.task(name="it.mul")
def mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@app.task(name="it.sum")
def total(numbers: list[int]) -> int:
    """Sum a list of integers (a chord body)."""
    return sum(numbers)


@app.task(name="it.collect")
def collect(results: list[int]) -> list[int]:
    """Record one execution with how many results came, and return them (a chord body)."""
    _record_execution(f"collect:{len(results)}")
    return results


@app.task(name="it.on_error")
def on_error(task_id: str, error: str) -> str:
    """Record one execution of an error callback."""
    _record_execution(f"on_error:{task_id}")
    return error


@app.task(name="it.member")
def member(i: int, ms: int) -> int:
    """Hold a slot ``ms`` milliseconds, record ``i:pid`` and return ``i`` doubled."""
    import time

    time.sleep(ms / 1000)
    _record_execution(f"{i}:{os.getpid()}")
    return i * 2
