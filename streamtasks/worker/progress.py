"""RECEIVED and STARTED rows for tasks that run long, at no cost for short ones.

A run still going ``track_started_after_ms`` after it started gets one STARTED write; a
record waiting that long behind its key (an ``ordered`` task, after a long one) gets one
RECEIVED write. A task registered with ``track_started=True`` (or every task, with the
``track_started`` setting) gets STARTED as soon as it starts. A short task ends before
its threshold and costs no write: one deque entry. Records that merely wait for a free
thread (a backlog) get no RECEIVED: under load that would double the writes exactly when
the store is busiest.

Progress goes apart from the row's state (:meth:`ResultBackend.mark_progress`), so a
write that lands late, after the final row (the threshold passing just as the task ends,
a redelivered run), never changes the final state. A failed progress write is logged and
forgotten: it is information, never part of the delivery promise.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from streamtasks import states
from streamtasks.backend.base import ResultBackend
from streamtasks.logs import get_logger
from streamtasks.message import TaskMessage

log = get_logger("streamtasks.worker")


class RunProgress:
    """What the tracker knows of one run: started, finished, what was written."""

    __slots__ = ("alive", "at_once", "due", "finished", "msg", "started", "written")

    def __init__(self, msg: TaskMessage, at_once: bool, alive: Callable[[], bool]) -> None:
        self.msg = msg
        self.at_once = at_once
        self.alive = alive
        #: When its threshold passes (monotonic s), once it is in the tracker's deque.
        self.due = 0.0
        self.started = False
        self.finished = False
        self.written: str | None = None


class ProgressWriter:
    """Writes RECEIVED / STARTED for runs that last (see the module docstring).

    Args:
        backend: where progress is written.
        worker: this worker's name (kept with the entry).
        after_s: the threshold (0: no threshold writes).
        track_started: every task writes STARTED as soon as it starts.
    """

    def __init__(
        self, backend: ResultBackend, worker: str, after_s: float, track_started: bool
    ) -> None:
        self.backend = backend
        self.worker = worker
        self.after_s = after_s
        self.track_started = track_started
        self._due: deque[RunProgress] = deque()

    def track(
        self, msg: TaskMessage, task_tracks_started: bool,
        alive: Callable[[], bool] = lambda: True,
    ) -> RunProgress | None:
        """A record was taken to run: return its progress, or None when nothing is written.

        ``alive``: False once the record is no longer this worker's (its partition left):
        nothing more is written for it.
        """
        at_once = task_tracks_started or self.track_started
        if not at_once and self.after_s <= 0:
            return None
        return RunProgress(msg, at_once, alive)

    def waiting(self, run: RunProgress | None) -> None:
        """The record waits behind its key: RECEIVED if it still waits after the threshold."""
        if run is not None and not run.at_once:
            run.due = time.monotonic() + self.after_s
            self._due.append(run)

    def started(self, run: RunProgress | None) -> None:
        """The run starts (in the thread that runs it): STARTED now or after the threshold."""
        if run is None:
            return
        run.started = True
        if run.at_once:
            self._write(run, states.STARTED)
        else:
            # appended from the running threads; deadlines rise with the order of appends
            # (to within a thread switch), so the deque stays sorted for write_due
            run.due = time.monotonic() + self.after_s
            self._due.append(run)

    def write_due(self) -> None:
        """Write progress of the runs whose threshold passed (the worker's loop thread)."""
        due = self._due
        if not due:
            return
        now = time.monotonic()
        while due and due[0].due <= now:
            run = due.popleft()
            if run.finished or not run.alive() or run.written == states.STARTED:
                continue
            if run.started:
                self._write(run, states.STARTED)
            elif run.written is None:
                self._write(run, states.RECEIVED)

    def _write(self, run: RunProgress, state: str) -> None:
        run.written = state
        msg = run.msg
        try:
            future = self.backend.mark_progress(msg.id, state, msg.attempt, msg.name,
                                                msg.queue, self.worker)
        except Exception as err:
            _failed(msg.id, state, err)
            return
        future.add_done_callback(lambda f: _logged(f, msg.id, state))


def _logged(future: Future[None], task_id: str, state: str) -> None:
    error = future.exception()
    if error is not None:
        _failed(task_id, state, error)


def _failed(task_id: str, state: str, error: BaseException) -> None:
    log.warning("progress row not written", id=task_id, state=state,
                error=f"{type(error).__name__}: {error}")
