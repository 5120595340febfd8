"""Calling a task's hooks and the app's error handlers after a run, off the worker's loop.

Hooks run once a run's outcome is decided, with the run's request current
(``current_task()`` works), one at a time in the order the outcomes were decided, in a
thread of their own: a slow hook (paging someone over HTTP) delays the hooks after it,
never the worker's polling, results and commits. A hook that raises is logged with its
traceback; the task's outcome stands and the worker goes on. At shutdown the worker waits
for the hooks still due up to its grace period.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog

from streamtasks.context import Running, activated
from streamtasks.task import ErrorHook
from streamtasks.worker.outcomes import error_text

log = structlog.get_logger("streamtasks.worker")


def _call(what: str, run: Running, hook: Callable[..., object], *args: Any) -> None:
    try:
        with activated(run):
            hook(*args)
    except BaseException as err:  # a hook never changes the outcome nor stops the worker
        log.error("a task hook raised; the task's outcome stands", hook=what,
                  task=run.msg.name, id=run.msg.id,
                  error=f"{type(err).__name__}: {error_text(err)}", exc_info=True)


def _failure_hooks(
    run: Running, error: BaseException, traceback: str, handlers: Sequence[ErrorHook]
) -> None:
    hook = run.task.options.hooks.on_failure
    if hook is not None:
        _call("on_failure", run, hook, run.request, error, traceback)
    for handler in handlers:
        _call("app.on_failure", run, handler, run.request, error, traceback)


class HookRunner:
    """Runs the hooks of finished runs in one thread of their own, in order.

    A worker without hooks never starts the thread.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None  # one thread: the last done, all done

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamtasks-hooks")
        self._last = self._pool.submit(fn, *args)

    def succeeded(self, run: Running | None, result: Any) -> None:
        """Call the task's ``on_success`` hook."""
        if run is None or run.task.options.hooks.on_success is None:
            return
        self._submit(_call, "on_success", run, run.task.options.hooks.on_success,
                     run.request, result)

    def retrying(self, run: Running | None, error: BaseException, traceback: str | None) -> None:
        """Call the task's ``on_retry`` hook."""
        if run is None or run.task.options.hooks.on_retry is None:
            return
        self._submit(_call, "on_retry", run, run.task.options.hooks.on_retry, run.request,
                     error, traceback or "")

    def failed(
        self, run: Running | None, error: BaseException, traceback: str | None,
        handlers: Sequence[ErrorHook],
    ) -> None:
        """Call the task's ``on_failure`` hook, then the app's error handlers."""
        if run is None or (run.task.options.hooks.on_failure is None and not handlers):
            return
        self._submit(_failure_hooks, run, error, traceback or "", list(handlers))

    def idle(self) -> bool:
        """Whether every hook handed over so far has returned."""
        return self._last is None or self._last.done()

    def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the hooks still due, then let the thread go."""
        if self._pool is None:
            return
        if self._last is not None:
            concurrent.futures.wait([self._last], timeout=timeout_s)
            if not self._last.done():
                log.warning("hooks still running at shutdown are abandoned",
                            waited_s=timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
