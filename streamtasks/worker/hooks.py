"""Calling a task's hooks and the app's error handlers after a run, safely.

Hooks run in the worker's loop thread once a run's outcome is decided (keep them short:
send a task for slow work), with the run's request current (``current_task()`` works).
A hook that raises is logged with its traceback; the task's outcome stands and the
worker goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def succeeded(run: Running | None, result: Any) -> None:
    """Call the task's ``on_success`` hook."""
    if run is None or run.task.options.hooks.on_success is None:
        return
    _call("on_success", run, run.task.options.hooks.on_success, run.request, result)


def retrying(run: Running | None, error: BaseException, traceback: str | None) -> None:
    """Call the task's ``on_retry`` hook."""
    if run is None or run.task.options.hooks.on_retry is None:
        return
    _call("on_retry", run, run.task.options.hooks.on_retry, run.request, error,
          traceback or "")


def failed(
    run: Running | None, error: BaseException, traceback: str | None,
    handlers: Sequence[ErrorHook],
) -> None:
    """Call the task's ``on_failure`` hook, then the app's error handlers."""
    if run is None:
        return
    hook = run.task.options.hooks.on_failure
    if hook is not None:
        _call("on_failure", run, hook, run.request, error, traceback or "")
    for handler in handlers:
        _call("app.on_failure", run, handler, run.request, error, traceback or "")
