"""Child processes for sync tasks declared with ``pool="process"``: killable, time-limited.

A task runs in a child process when it asks for it (``@app.task(pool="process")``): its
CPU work runs beside the worker's loop, and the child can be stopped, which a thread
cannot. The worker's task thread hands the run to an idle child over a pipe and waits:

- ``soft_time_limit``: the child raises :class:`SoftTimeLimitExceeded` inside the task
  (a ``SIGALRM`` timer), which the task may catch to clean up;
- ``time_limit``: the parent kills the child (``SIGKILL``) when the run is not back in
  time, counted from the moment the child has the task's function in hand (a child's
  start and the first import of the task's module are not the task's time: on a loaded
  machine they took over a second); the run ends FAILURE with
  :class:`TimeLimitExceeded` (or is retried by its policy), and a new child replaces the
  killed one for the next run;
- :meth:`ProcessPool.terminate` (a revoke with ``terminate=True``) kills the child
  running that task; the run ends REVOKED.

Children are started with ``spawn`` (a fork of a process holding Kafka and Cassandra
client threads is not safe): a child imports the task's module and finds the task by
its function's qualified name, so such tasks must be defined at the top level of an
importable module (not ``__main__``). Arguments and results cross the pipe by pickle,
between the worker and its own children only; nothing read from Kafka is unpickled.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import structlog

from streamtasks.errors import ConfigError, TaskError

log = structlog.get_logger("streamtasks.worker")

POOLS = ("thread", "process")
#: The longest a child may take to start, or to import a task's module, before it counts
#: as dead (these are not part of a task's time limit).
START_TIMEOUT_S = 120.0
_READY, _STARTED = b"r", b"s"


class TimeLimitExceeded(TaskError):
    """The task ran longer than its ``time_limit`` (async: cancelled; process: killed)."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task running longer than its ``soft_time_limit``; it may clean up."""


class ChildProcessDied(TaskError):
    """The child process running the task died (killed from outside, out of memory)."""


@dataclass(slots=True)
class ChildResult:
    """What came back from a child: a result, or an error with its traceback."""

    ok: bool
    value: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    terminated: bool = False


def _resolve(module: str, qualname: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "fn", target)  # a Task object wraps the function


def _soft_limit(_signum: int, _frame: object) -> None:
    raise SoftTimeLimitExceeded("the task ran past its soft_time_limit")


def _child_main(conn: Connection) -> None:
    """A child's loop: run what the parent sends until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children end
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, _soft_limit)
    conn.send_bytes(_READY)  # started, streamtasks imported: tasks may come
    while True:
        try:
            module, qualname, args, kwargs, soft_s = conn.recv()
        except (EOFError, OSError):
            return
        try:
            fn, found = _resolve(module, qualname), None
        except BaseException as err:
            fn, found = None, err
        conn.send_bytes(_STARTED)  # the time limit counts from here
        if soft_s:
            signal.setitimer(signal.ITIMER_REAL, soft_s)
        try:
            if found is not None:
                raise found
            value = fn(*args, **kwargs)
            answer = ChildResult(True, value)
        except BaseException as err:
            answer = ChildResult(False, None, err, "".join(traceback.format_exception(err)))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send_bytes(_sendable(answer))


def _sendable(answer: ChildResult) -> bytes:
    """Return ``answer`` pickled as the parent can read it back.

    A result or error that cannot be pickled, or an error the parent could not unpickle
    (an exception whose ``__init__`` takes other arguments than its ``args``), is
    replaced by a :class:`TaskError` naming it: never an unrelated ``TypeError``.
    """
    try:
        data = bytes(ForkingPickler.dumps(answer))
        if answer.error is not None:
            ForkingPickler.loads(data)
        return data
    except Exception as err:
        what = "result" if answer.ok else f"error ({type(answer.error).__name__}: {answer.error})"
        return bytes(ForkingPickler.dumps(ChildResult(False, None, TaskError(
            f"the task's {what} cannot be sent back from its process: "
            f"{type(err).__name__}: {err}"), answer.traceback)))


class _Child:
    def __init__(self, context: Any) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_child_main, args=(child_conn,), daemon=True,
                                       name="streamtasks-child")
        self.process.start()
        child_conn.close()
        self.ready = False

    def expect(self, marker: bytes, what: str) -> None:
        """Wait (up to :data:`START_TIMEOUT_S`) for ``marker`` from the child.

        Raises:
            EOFError: the child died, or did not ``what`` in time (it is killed).
        """
        if not self.conn.poll(START_TIMEOUT_S):
            self.signal_kill()
            raise EOFError(f"did not {what} within {START_TIMEOUT_S:.0f}s")
        if self.conn.recv_bytes() != marker:
            raise EOFError(f"sent something else than expected ({what})")

    def signal_kill(self) -> None:
        if self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        self.signal_kill()
        self.process.join(5)
        self.conn.close()


def check_pool(pool: str, is_async: bool, time_limit_s: float | None,
               soft_time_limit_s: float | None, where: str, bind: bool = False) -> None:
    """Refuse a pool and time limits a task cannot have.

    Raises:
        ConfigError: naming what is wrong.
    """
    if pool not in POOLS:
        raise ConfigError(f"{where}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
    for option, value in (("time_limit", time_limit_s), ("soft_time_limit", soft_time_limit_s)):
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: {option} must be above 0, got {value}")
    if is_async and pool == "process":
        raise ConfigError(f"{where}: an async def task runs on the event loop; "
                          "pool='process' is for sync tasks")
    if bind and pool == "process":
        raise ConfigError(f"{where}: bind=True is not available with pool='process' (the "
                          "task object and its request stay in the worker)")
    if is_async and soft_time_limit_s is not None:
        raise ConfigError(f"{where}: soft_time_limit is for sync tasks in pool='process'; "
                          "an async def task is cancelled at its time_limit")
    if not is_async and pool != "process" and (time_limit_s or soft_time_limit_s):
        raise ConfigError(f"{where}: a sync task in a thread cannot be stopped; time_limit "
                          "and soft_time_limit need pool='process'")
    if time_limit_s and soft_time_limit_s and soft_time_limit_s >= time_limit_s:
        raise ConfigError(f"{where}: soft_time_limit ({soft_time_limit_s}s) must be below "
                          f"time_limit ({time_limit_s}s)")


class ProcessPool:
    """Up to ``size`` child processes, started when first needed and reused.

    Args:
        size: the most children (the worker's concurrency).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[_Child] = []
        #: Runs under way: their child, or None while one is being taken or started.
        self._busy: dict[str, _Child | None] = {}
        self._terminated: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Any, args: list[Any], kwargs: dict[str, Any], run_id: str,
            time_limit_s: float | None = None,
            soft_time_limit_s: float | None = None) -> ChildResult:
        """Run ``fn(*args, **kwargs)`` in a child; block until it is back, killed or dies.

        Raises:
            ConfigError: the function cannot be found by a child (not at the top level of
                an importable module).
        """
        module, qualname = fn.__module__, fn.__qualname__
        if module == "__main__" or "<locals>" in qualname:
            raise ConfigError(f"{module}.{qualname}: a pool='process' task must be defined at "
                              "the top level of an importable module")
        child = self._take(run_id)
        began = time.monotonic()
        with self._lock:
            terminated = run_id in self._terminated
        if terminated:  # while its child was being started: never sent to it
            self._give_back(run_id, child)
            return ChildResult(False, None, None, terminated=True)
        try:
            if not child.ready:
                child.expect(_READY, "start")
                child.ready = True
            child.conn.send((module, qualname, args, kwargs, soft_time_limit_s))
            child.expect(_STARTED, f"import {module}")
            if not child.conn.poll(time_limit_s):
                child.kill()
                return ChildResult(False, None, TimeLimitExceeded(
                    f"{qualname} ran longer than its time_limit of {time_limit_s}s: its "
                    "process was killed"))
            answer: ChildResult = child.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as err:
            child.kill()
            with self._lock:
                terminated = run_id in self._terminated
            if terminated:
                return ChildResult(False, None, None, terminated=True)
            return ChildResult(False, None, ChildProcessDied(
                f"the process running {qualname} died after {time.monotonic() - began:.1f}s "
                f"(exit code {child.process.exitcode}){f': it {err}' if str(err) else ''}"))
        finally:
            self._give_back(run_id, child)
        return answer

    def terminate(self, run_id: str) -> bool:
        """Kill the child running ``run_id``; True when the run was under way.

        A run whose child is still being started is stopped before it is sent.
        """
        with self._lock:
            if run_id not in self._busy:
                return False
            self._terminated.add(run_id)
            child = self._busy[run_id]
            if child is not None:
                # under the lock: once the run ends, its child may serve the next task
                child.signal_kill()
        if child is None:
            log.info("terminating a task whose process is being started", id=run_id)
        else:
            log.info("terminating a running task: its process was killed", id=run_id,
                     pid=child.process.pid)
        return True

    def _take(self, run_id: str) -> _Child:
        with self._lock:
            self._busy[run_id] = None
            child = self._idle.pop() if self._idle else None
        while child is not None and not child.process.is_alive():
            child.conn.close()
            with self._lock:
                child = self._idle.pop() if self._idle else None
        if child is None:
            child = _Child(self._context)
        with self._lock:
            self._busy[run_id] = child
        return child

    def _give_back(self, run_id: str, child: _Child) -> None:
        with self._lock:
            self._busy.pop(run_id, None)
            self._terminated.discard(run_id)
            keep = (not self._closed and child.process.is_alive()
                    and len(self._idle) < self.size)
            if keep:
                self._idle.append(child)
        if not keep:
            child.kill()

    def shutdown(self) -> None:
        """Kill every child (idle ones at once; running ones too: their records repeat).

        A running child is only signalled: the thread running it sees it die and closes
        its pipe (two threads closing one pipe could close a descriptor reused meanwhile).
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for child in self._busy.values():
                if child is not None:
                    child.signal_kill()
        for child in idle:
            child.kill()
