"""Running task functions: sync ones in threads (or inline when cheap), async ones on a loop."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from streamtasks import states
from streamtasks.context import Running
from streamtasks.errors import TaskRevoked
from streamtasks.logs import TaskScope, get_logger
from streamtasks.task import Task
from streamtasks.tracing import TraceContext
from streamtasks.worker.procpool import ProcessPool, TimeLimitExceeded

__all__ = ["Executor", "Outcome", "Run", "TimeLimitExceeded"]

log = get_logger("streamtasks.worker")


@dataclass(slots=True)
class Outcome:
    """What one run of a task came to."""

    state: str
    result: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    started_ms: int = 0
    finished_ms: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    #: The run's W3C trace context: what the task's follow-ups carry.
    traceparent: str | None = None


class Run(Protocol):
    """One run handed to :meth:`Executor.submit`: what to call, and whom to ask and tell.

    The worker's job of a record is one (no object or closure per run beside it).
    """

    @property
    def task(self) -> Task[Any, Any]:
        """The task to run."""

    @property
    def args(self) -> list[Any]:
        """Its positional arguments."""

    @property
    def kwargs(self) -> dict[str, Any]:
        """Its keyword arguments."""

    @property
    def inline(self) -> bool:
        """Whether it may run in the submitting thread when it is cheap."""

    @property
    def context(self) -> Mapping[str, object] | None:
        """Its log fields and its record's ``traceparent``, bound while it runs.

        See :class:`streamtasks.logs.TaskScope` (task_id, queue, attempt, partition,
        offset).
        """

    @property
    def running(self) -> Running | None:
        """Its request, current while it runs (``self.request``).

        Its task id is what :meth:`Executor.terminate` finds.
        """

    def start(self) -> bool:
        """Asked when it is about to begin (it may have waited): False, it is not run."""

    def done(self, outcome: Outcome | None) -> None:
        """Told its outcome (None when it was not run), in the thread that ran it."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _failure(err: BaseException, started_ms: int, trace: str | None = None) -> Outcome:
    trace = trace or "".join(traceback.format_exception(err))
    return Outcome(states.FAILURE, None, err, trace, started_ms, _now_ms())


def _run_id(running: Running | None) -> str:
    """The task id a run is found by (:meth:`Executor.terminate`)."""
    return "" if running is None else running.msg.id


def _terminated(started_ms: int) -> Outcome:
    err = TaskRevoked("revoked with terminate=True while running: stopped")
    return Outcome(states.REVOKED, None, err, None, started_ms, _now_ms())


async def _confirmed(outcome: Outcome, running: Running) -> Outcome:
    """Return ``outcome`` once the tasks the run sent are confirmed, else its failure."""
    if not running.sent:
        return outcome
    try:
        await asyncio.to_thread(running.confirm_sends)  # the loop runs other tasks meanwhile
    except Exception as err:
        return _failure(err, outcome.started_ms)
    return outcome


def _report(future: Future[Outcome | None], done: Callable[[Outcome | None], None]) -> None:
    """Hand a run's outcome on; an error here is logged, never lost in the pool."""
    try:
        done(None if future.cancelled() else future.result())
    except BaseException:  # the outcome is lost: say so loudly (the worker also guards)
        log.exception("a task outcome could not be handed to the worker")


#: The longest a turn of the worker's loop runs cheap tasks inline (wall time). At 5 ms
#: a turn under CPU contention (the GIL taken by another thread, the process preempted)
#: ran out of it after a few tasks and sent the rest through the threads, a hop each:
#: 15,000-27,000 of 83,000 no-op tasks in an open-loop run, against 8 at 20 ms, with
#: the 80%-load p99 1,283 ms against 202-424 ms (bench/README.md, eighth round).
INLINE_BUDGET_S = 0.02


class Executor:
    """Runs tasks with at most ``concurrency`` of each kind at once.

    Sync tasks run in ``concurrency`` threads fed by one queue (no future per run); a sync
    task whose runs have been cheap (average below ``inline_max_s``) runs at once in the
    caller's thread instead, within a budget per turn of the caller's loop
    (:meth:`new_turn`): a hop to a thread and back costs more than such a task. Async
    tasks run on one event loop in its own thread, bounded by a semaphore. Every run
    reports an :class:`Outcome`; a task's exception never escapes.

    Args:
        concurrency: sync tasks (and async tasks) running at once.
        inline_max_s: a sync task whose average run is below this runs inline (0: never).
        inline_budget_s: the longest inline running per turn.
    """

    #: Runs of a task measured before it may run inline.
    INLINE_AFTER_RUNS = 8

    def __init__(
        self, concurrency: int, inline_max_s: float = 0.0, inline_budget_s: float = INLINE_BUDGET_S
    ) -> None:
        self.concurrency = concurrency
        self.inline_max_s = inline_max_s
        self.inline_budget_s = inline_budget_s
        self._queue: queue.SimpleQueue[Run | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._cost: dict[str, tuple[int, float]] = {}  # task name -> (runs, average s)
        self._budget_s = inline_budget_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._processes: ProcessPool | None = None
        self._running_async: dict[str, asyncio.Task[Any]] = {}
        self._terminating: set[str] = set()

    def new_turn(self) -> None:
        """The caller's loop turned: inline runs get a new budget."""
        self._budget_s = self.inline_budget_s

    def submit(self, run: Run) -> None:
        """Queue one run (or run it now, inline); ``run.done`` is called with its outcome.

        ``run.start()`` is asked when the run is about to begin (it may have waited in
        the queue): when it answers False the task is not run and ``done`` gets None.
        The outcome carries the run's trace (a child of ``run.context``'s traceparent).
        """
        task = run.task
        if task.is_async:
            future: Future[Outcome | None] = asyncio.run_coroutine_threadsafe(
                self._run_async(run), self._event_loop(),
            )
            future.add_done_callback(lambda f: _report(f, run.done))
            return
        in_process = task.options.pool == "process"
        if run.inline and not in_process and self._budget_s > 0 and self._cheap(task.name):
            began = time.perf_counter()
            self._execute(run)
            self._budget_s -= time.perf_counter() - began
            return
        if len(self._threads) < self.concurrency:
            self._spawn()
        self._queue.put(run)

    def _cheap(self, name: str) -> bool:
        runs, average = self._cost.get(name, (0, 0.0))
        return runs >= self.INLINE_AFTER_RUNS and average < self.inline_max_s

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._serve, name="streamtasks-task", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            run = self._queue.get()
            if run is None:
                return
            self._execute(run)

    def terminate(self, run_id: str) -> bool:
        """Stop the run of task ``run_id`` if it runs now and can be stopped.

        An ``async def`` task is cancelled; a task in a child process has its process
        killed; either ends REVOKED. A sync task in a thread cannot be stopped (False).
        """
        if self._processes is not None and self._processes.terminate(run_id):
            return True
        running = self._running_async.get(run_id)
        if running is None or self._loop is None:
            return False
        self._terminating.add(run_id)
        self._loop.call_soon_threadsafe(running.cancel)
        return True

    def _execute(self, run: Run) -> None:
        try:
            outcome = self._run_sync(run)
            if outcome is not None and self.inline_max_s:
                self._measure(run.task.name, outcome)
            run.done(outcome)
        except BaseException:  # the outcome is lost: say so loudly (the worker also guards)
            log.exception("a task outcome could not be handed to the worker")

    def _measure(self, name: str, outcome: Outcome) -> None:
        runs, average = self._cost.get(name, (0, 0.0))
        took = max(0.0, (outcome.finished_ns - outcome.started_ns) / 1e9)
        weight = 1 / (runs + 1) if runs < self.INLINE_AFTER_RUNS else 0.1
        self._cost[name] = (runs + 1, average + (took - average) * weight)

    def _run_sync(self, run: Run) -> Outcome | None:
        task = run.task
        with TaskScope(task.name, run.context, run.running) as trace:
            if not run.start():
                return None
            started_ns = time.perf_counter_ns()
            started = _now_ms()
            if task.options.pool == "process":
                outcome = self._run_in_process(run, started)
            else:
                try:
                    result = task.fn(*run.args, **run.kwargs)
                    if run.running is not None:
                        run.running.confirm_sends()  # before the offset may advance
                except BaseException as err:
                    outcome = _failure(err, started)
                else:
                    outcome = Outcome(states.SUCCESS, result, None, None, started, _now_ms())
        outcome.started_ns, outcome.finished_ns = started_ns, time.perf_counter_ns()
        outcome.traceparent = trace.traceparent if trace is not None else None
        return outcome

    def _run_in_process(self, run: Run, started: int) -> Outcome:
        if self._processes is None:
            self._processes = ProcessPool(self.concurrency)
        options = run.task.options
        try:
            answer = self._processes.run(run.task.fn, run.args, run.kwargs, _run_id(run.running),
                                         options.time_limit_s, options.soft_time_limit_s)
        except Exception as err:
            return _failure(err, started)
        if answer.terminated:
            return _terminated(started)
        if answer.ok:
            return Outcome(states.SUCCESS, answer.value, None, None, started, _now_ms())
        assert answer.error is not None
        return _failure(answer.error, started, answer.traceback)

    async def _run_async(self, run: Run) -> Outcome | None:
        task, running = run.task, run.running
        assert self._semaphore is not None
        async with self._semaphore:
            # a coroutine run by run_coroutine_threadsafe is its own asyncio task: what
            # the scope binds stays within this run
            current = asyncio.current_task()
            run_id = _run_id(running)
            trace: TraceContext | None = None
            if run_id and current is not None:
                self._running_async[run_id] = current
            try:
                with TaskScope(task.name, run.context, running) as trace:
                    outcome = await self._run_coroutine(task, run.args, run.kwargs, run.start)
                    if outcome is not None and outcome.error is None and running is not None:
                        outcome = await _confirmed(outcome, running)
            except asyncio.CancelledError as err:
                terminated = run_id in self._terminating
                outcome = _terminated(_now_ms()) if terminated else _failure(err, _now_ms())
            finally:
                self._running_async.pop(run_id, None)
                self._terminating.discard(run_id)
            if outcome is not None:
                outcome.traceparent = trace.traceparent if trace is not None else None
            return outcome

    @staticmethod
    async def _run_coroutine(
        task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
        start: Callable[[], bool],
    ) -> Outcome | None:
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
        except asyncio.CancelledError:
            raise  # a terminate (or the task's own): decided by _run_async
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
        """Stop taking runs; with ``wait``, let running ones finish.

        Runs still queued are not run (their ``done`` is not called).
        """
        if not self._closed:
            self._closed = True
            while True:  # drop what is queued: the worker is leaving its partitions
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            for _ in self._threads:
                self._queue.put(None)
            if wait:
                for thread in self._threads:
                    thread.join()
        if self._processes is not None:
            self._processes.shutdown()
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5 if wait else 0.5)
            if not loop.is_running():
                loop.close()
