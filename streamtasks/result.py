"""Handles on task results, read from the result backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from streamtasks import states
from streamtasks.backend.base import TaskMeta
from streamtasks.errors import ResultTimeout, TaskFailed, TaskRevoked

if TYPE_CHECKING:
    from streamtasks.app import App

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The result of one task, by id; reads the backend when asked.

    Generic in the task's result type: ``add.delay(1, 2).get()`` is typed ``int`` for a
    task returning ``int``. Once the task's row is final it is kept, so reading
    :attr:`result`, :attr:`traceback`, :attr:`date_done` after :meth:`get` costs no read.

    Attributes:
        id: the task id.
        parent: for a chord's result, the result of its group; else None.
    """

    def __init__(self, task_id: str, app: App, parent: ResultHandle | None = None) -> None:
        self.id = task_id
        self.app = app
        self.parent = parent
        self._final: TaskMeta | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def meta(self) -> TaskMeta | None:
        """Return the task's stored row, or None when there is none yet."""
        if self._final is not None:
            return self._final
        meta = self.app.backend.fetch(self.id)
        if meta is not None and meta.ready:
            self._final = meta
        return meta

    @property
    def result(self) -> R | BaseException | None:
        """The return value on SUCCESS, the error on FAILURE / REVOKED, else None.

        The error is a :class:`TaskFailed` (or :class:`TaskRevoked`) carrying the remote
        type, message and traceback (Celery's ``.result`` / ``.info``).
        """
        meta = self.meta()
        if meta is None or not meta.ready:
            return None
        if meta.state == states.SUCCESS:
            return meta.result  # type: ignore[no-any-return]
        try:
            unwrap(meta)
        except (TaskFailed, TaskRevoked) as err:
            return err
        return None

    @property
    def traceback(self) -> str | None:
        """The failed task's traceback text, or None."""
        meta = self.meta()
        return None if meta is None else meta.traceback

    @property
    def date_done(self) -> datetime | None:
        """When the task reached its final state (aware, UTC), or None."""
        meta = self.meta()
        if meta is None or not meta.ready or meta.finished_ms is None:
            return None
        return datetime.fromtimestamp(meta.finished_ms / 1000, UTC)

    @property
    def name(self) -> str | None:
        """The task's registered name, once a row exists."""
        meta = self.meta()
        return meta.name or None if meta is not None else None

    def forget(self) -> None:
        """Delete the task's stored row (Celery's ``forget``); reading again gives PENDING.

        Raises:
            BackendError: the backend failed the delete.
        """
        self.app.backend.forget(self.id).result()
        self._final = None

    @property
    def state(self) -> str:
        """The task's state; PENDING while no worker has written one."""
        meta = self.meta()
        return meta.state if meta else states.PENDING

    def ready(self) -> bool:
        """Whether the task reached a final state."""
        meta = self.meta()
        return meta is not None and meta.ready

    def successful(self) -> bool:
        """Whether the task ended in SUCCESS."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """Whether the task ended in FAILURE."""
        return self.state == states.FAILURE

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the task (and, for a workflow's id, its parts); see :meth:`App.revoke`."""
        self.app.revoke(self.id, terminate=terminate)

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the task to finish and return its result.

        Args:
            timeout: seconds to wait at most (None: for ever).
            propagate: raise the task's error on FAILURE / REVOKED (else return None).

        Raises:
            ResultTimeout: not finished within ``timeout``.
            TaskFailed: the task ended in FAILURE (carries its error and traceback).
            TaskRevoked: the task was revoked or expired.
        """
        meta = self._final or self.app.backend.wait(self.id, timeout)
        self._final = meta
        return unwrap(meta, propagate)  # type: ignore[no-any-return]


def unwrap(meta: TaskMeta, propagate: bool = True) -> Any:
    """Return a final row's result, or raise its error.

    Raises:
        TaskFailed: the row is FAILURE and ``propagate`` is set.
        TaskRevoked: the row is REVOKED and ``propagate`` is set.
    """
    if meta.state == states.SUCCESS or not propagate:
        return meta.result if meta.state == states.SUCCESS else None
    if meta.state == states.REVOKED:
        raise TaskRevoked(f"task {meta.task_id} was revoked: {meta.error_message or ''}")
    raise TaskFailed(
        meta.task_id, meta.error_type or "Error", meta.error_message or "", meta.traceback or ""
    )


class ChainResult:
    """The result of a chain: the last step's, with every step's result reachable.

    Attributes:
        steps: one result per step, in order (a group step's :class:`GroupResult`; a
            chord step gives its group's result, then its body's steps).
        last: the last step's result.
        id: the last step's id.
        parent: for a chord whose body is this chain, the result of its group.
    """

    def __init__(self, steps: Sequence[ResultHandle]) -> None:
        self.steps = list(steps)
        self.last: ResultHandle = self.steps[-1]
        self.id: str = self.last.id
        self.parent: ResultHandle | None = None

    def __repr__(self) -> str:
        return f"<ChainResult {[step.id for step in self.steps]}>"

    @property
    def state(self) -> str:
        """The last step's state."""
        return self.last.state

    def ready(self) -> bool:
        """Whether the last step reached a final state."""
        return self.last.ready()

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the chain: its steps not yet run end REVOKED (the chain stops)."""
        self.last.revoke(terminate=terminate)

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the last step and return its result (see :meth:`AsyncResult.get`).

        A failed step fails the steps after it, so this raises the first failure.
        """
        return self.last.get(timeout=timeout, propagate=propagate)


class GroupResult:
    """The results of a group's members, in group order.

    Attributes:
        id: the group id.
        results: one result per member (a chain member's :class:`ChainResult`).
    """

    def __init__(self, group_id: str, results: Sequence[ResultHandle], app: App) -> None:
        self.id: str = group_id
        self.results = list(results)
        self.app = app
        self.parent: ResultHandle | None = None

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} ({len(self.results)} members)>"

    def save(self) -> None:
        """Store the group's member ids under its id, so any process can restore it.

        Celery's ``GroupResult.save()``; read back with :meth:`restore` or
        ``app.group_result(group_id)``. The row lives as long as task rows
        (``result_expires_s``).

        Raises:
            BackendError: the backend failed the write.
        """
        self.app.backend.save_group(self.id, self._leaf_ids()).result()

    @classmethod
    def restore(cls, group_id: str, app: App) -> GroupResult | None:
        """Return the group saved under ``group_id`` by :meth:`save`, or None.

        Each member is the result of the task whose result is the member's (a chain
        member is restored as its last step).

        Raises:
            BackendError: the backend failed the read.
        """
        ids = app.backend.fetch_group(group_id)
        if ids is None:
            return None
        return cls(group_id, [AsyncResult(task_id, app) for task_id in ids], app)

    def forget(self) -> None:
        """Delete the saved group row and every member's row.

        Raises:
            BackendError: the backend failed a delete.
        """
        backend = self.app.backend
        for task_id in self._leaf_ids():
            backend.forget(task_id).result()
        backend.forget_group(self.id).result()

    def __len__(self) -> int:
        return len(self.results)

    @property
    def state(self) -> str:
        """FAILURE if a member failed or was revoked, SUCCESS if all succeeded, else PENDING."""
        rows = self._rows()
        if any(row is not None and row.state in _FAILED for row in rows):
            return states.FAILURE
        if all(row is not None and row.state == states.SUCCESS for row in rows):
            return states.SUCCESS
        return states.PENDING

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for row in self._rows() if row is not None and row.state == states.SUCCESS)

    def ready(self) -> bool:
        """Whether every member reached a final state."""
        return all(row is not None and row.ready for row in self._rows())

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the group: its members (and their parts) not yet run end REVOKED."""
        self.app.revoke(self.id, terminate=terminate)

    def successful(self) -> bool:
        """Whether every member succeeded."""
        return self.completed_count() == len(self.results)

    def failed(self) -> bool:
        """Whether a member failed."""
        return self.state == states.FAILURE

    def get(
        self, timeout: float | None = None, propagate: bool = True,
        interval_s: float = 0.002, max_interval_s: float = 0.5,
    ) -> list[Any]:
        """Wait for every member and return their results in group order.

        Members are read in order, at most 256 not yet final at a time; while the first
        of them is not final, only it is read again. Waiting on a large group thus costs
        about one read per member plus one per poll.

        Args:
            timeout: seconds to wait at most (None: for ever).
            propagate: raise the first failed member's error (in group order); else a
                failed member's result is None.
            interval_s: the first pause between polls (it grows to ``max_interval_s``).
            max_interval_s: the longest pause between polls.

        Raises:
            ResultTimeout: not every member finished within ``timeout``.
            TaskFailed: a member failed (with ``propagate``).
        """
        ids = self._leaf_ids()
        rows: list[TaskMeta | None] = [None] * len(ids)
        waiting = list(range(len(ids)))
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = self.app.backend
        while True:
            window = waiting[:_POLL_WINDOW]
            for i, row in zip(window, backend.fetch_many([ids[i] for i in window]), strict=True):
                rows[i] = self._checked(row, propagate)
            waiting = [i for i in window if not _final(rows[i])] + waiting[_POLL_WINDOW:]
            if not waiting:
                return [unwrap(row, propagate) for row in rows if row is not None]
            # wait for the first member not final, reading only it, then read a window again
            head, delay = waiting[0], interval_s
            while not _final(rows[head]):
                if deadline is not None and time.monotonic() >= deadline:
                    raise ResultTimeout(
                        f"group {self.id}: {len(waiting)} of {len(ids)} members not "
                        f"finished within {timeout}s (first: {ids[head]})"
                    )
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                time.sleep(max(pause, 0.0))
                delay = min(delay * 1.5, max_interval_s)
                rows[head] = self._checked(backend.fetch(ids[head]), propagate)

    @staticmethod
    def _checked(row: TaskMeta | None, propagate: bool) -> TaskMeta | None:
        """Return the row; raise its error at once when it failed and ``propagate``."""
        if propagate and row is not None and row.state in (states.FAILURE, states.REVOKED):
            unwrap(row)
        return row

    def _leaf_ids(self) -> list[str]:
        """The id of the task whose result is each member's result."""
        return [_last_task(member).id for member in self.results]

    def _rows(self) -> list[TaskMeta | None]:
        return self.app.backend.fetch_many(self._leaf_ids())


_FAILED = (states.FAILURE, states.REVOKED)

#: How many members :meth:`GroupResult.get` reads per poll, at most.
_POLL_WINDOW = 256

#: Any handle on a result: a task's, a chain's or a group's.
ResultHandle: TypeAlias = AsyncResult[Any] | ChainResult | GroupResult


def _last_task(handle: ResultHandle) -> AsyncResult[Any] | GroupResult:
    while isinstance(handle, ChainResult):
        handle = handle.last
    return handle


def _final(row: TaskMeta | None) -> bool:
    return row is not None and row.ready
