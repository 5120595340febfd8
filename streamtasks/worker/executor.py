"""Running task functions: sync ones in a thread pool, ``async def`` ones on an event loop."""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from streamtasks import states
from streamtasks.task import Task

log = structlog.get_logger("streamtasks.worker")


@dataclass(slots=True)
class Outcome:
    """What one run of a task came to."""

    state: str
    result: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    started_ms: int = 0
    finished_ms: int = 0


class TimeLimitExceeded(Exception):
    """The task ran longer than its ``time_limit_s``."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _failure(err: BaseException, started_ms: int) -> Outcome:
    trace = "".join(traceback.format_exception(err))
    return Outcome(states.FAILURE, None, err, trace, started_ms, _now_ms())


def _report(future: Future[Outcome | None], done: Callable[[Outcome | None], None]) -> None:
    """Hand a run's outcome on; an error here is logged, never lost in the pool."""
    try:
        done(None if future.cancelled() else future.result())
    except BaseException:  # the outcome is lost: say so loudly (the worker also guards)
        log.exception("a task outcome could not be handed to the worker")


class Executor:
    """Runs tasks with at most ``concurrency`` of each kind at once.

    Sync tasks run in a thread pool; async tasks on one event loop in its own
    thread, bounded by a semaphore. Every run completes its future with an
    :class:`Outcome`; a task's exception never escapes.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="streamtasks-task")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        done: Callable[[Outcome | None], None],
        start: Callable[[], bool] = lambda: True,
    ) -> None:
        """Queue one run; ``done`` is called with its outcome from a worker thread.

        ``start`` is asked when the run is about to begin (it may have waited in the
        queue): when it answers False the task is not run and ``done`` gets None.
        """
        if task.is_async:
            future: Future[Outcome | None] = asyncio.run_coroutine_threadsafe(
                self._run_async(task, args, kwargs, start), self._event_loop()
            )
        else:
            future = self._pool.submit(self._run_sync, task, args, kwargs, start)
        future.add_done_callback(lambda f: _report(f, done))

    @staticmethod
    def _run_sync(
        task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any], start: Callable[[], bool]
    ) -> Outcome | None:
        if not start():
            return None
        started = _now_ms()
        try:
            result = task.fn(*args, **kwargs)
        except BaseException as err:
            return _failure(err, started)
        return Outcome(states.SUCCESS, result, None, None, started, _now_ms())

    async def _run_async(
        self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
        start: Callable[[], bool],
    ) -> Outcome | None:
        assert self._semaphore is not None
        async with self._semaphore:
            if not start():
                return None
            started = _now_ms()
            limit = task.options.time_limit_s
            timer = asyncio.timeout(limit) if limit else None
            try:
                if timer is None:
                    result = await task.fn(*args, **kwargs)
                else:
                    async with timer:
                        result = await task.fn(*args, **kwargs)
            except TimeoutError as err:
                if timer is not None and timer.expired():
                    limited = TimeLimitExceeded(f"{task.name} ran longer than {limit}s")
                    return _failure(limited, started)
                return _failure(err, started)  # the task's own TimeoutError stays itself
            except BaseException as err:
                return _failure(err, started)
            return Outcome(states.SUCCESS, result, None, None, started, _now_ms())

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                self._semaphore = asyncio.Semaphore(self.concurrency)
                ready.set()
                loop.run_forever()

            self._loop_thread = threading.Thread(target=run, name="streamtasks-async", daemon=True)
            self._loop_thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking runs; with ``wait``, let running ones finish."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5 if wait else 0.5)
            if not loop.is_running():
                loop.close()
