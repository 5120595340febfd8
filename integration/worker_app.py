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


# -- delivery and chaos tests (integration/test_delivery_kafka.py, test_chaos_kafka.py) --


@app.task(name="it.tag")
def tag(label: str) -> str:
    """Record ``label:pid`` (one execution of the task labelled ``label``); return it."""
    _record_execution(f"{label}:{os.getpid()}")
    return label


@app.task(name="it.step")
def step(label: str, acc: int) -> int:
    """A chain step: record ``label:pid`` and return ``acc + 1``."""
    _record_execution(f"{label}:{os.getpid()}")
    return acc + 1


@app.task(name="it.poison", max_retries=0)
def poison(label: str) -> None:
    """Record ``label:pid``, then raise an error whose text holds a lone surrogate."""
    _record_execution(f"{label}:{os.getpid()}")
    raise ValueError(f"bad name \udcff in {label}")


@app.task(name="it.body")
def body(label: str, results: list[int]) -> int:
    """A chord body: record ``body:label:start:pid`` and ``...:end:pid``; return the sum."""
    import time

    pid = os.getpid()
    _record_execution(f"body:{label}:start:{pid}")
    time.sleep(0.05)
    _record_execution(f"body:{label}:end:{pid}")
    return sum(results)


@app.task(name="it.nap")
def nap(label: str, ms: int) -> str:
    """Hold a slot ``ms`` milliseconds, then record ``label:pid``; return ``label``."""
    import time

    time.sleep(ms / 1000)
    _record_execution(f"{label}:{os.getpid()}")
    return label


@app.task(name="it.parent", bind=True)
def parent(self: object, label: str, children: int, hold_ms: int) -> list[str]:
    """Send ``children`` it.add tasks, record the run with its request, then hold.

    The hold is a window in which a test kills the worker: the run is repeated on
    redelivery, and must send the same children (ids derived from its own).
    """
    import time

    request = parent.request
    # confirmed, so that the children of a run killed later are on Kafka
    ids = [add.apply_async((i, i), confirm=True).id for i in range(children)]
    _record_execution(f"parent:{label}:{request.id}:{request.attempt}:{request.partition}:"
                      f"{request.offset}")
    time.sleep(hold_ms / 1000)
    return ids
