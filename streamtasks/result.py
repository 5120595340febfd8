"""Handles on task results, read from the result backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamtasks import states
from streamtasks.backend.base import TaskMeta
from streamtasks.errors import TaskFailed, TaskRevoked

if TYPE_CHECKING:
    from streamtasks.app import App


class AsyncResult:
    """The result of one task, by id; reads the backend when asked.

    Attributes:
        id: the task id.
    """

    def __init__(self, task_id: str, app: App) -> None:
        self.id = task_id
        self.app = app

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def meta(self) -> TaskMeta | None:
        """Return the task's stored row, or None when there is none yet."""
        return self.app.backend.fetch(self.id)

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

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the task to finish and return its result.

        Args:
            timeout: seconds to wait at most (None: for ever).
            propagate: raise the task's error on FAILURE / REVOKED (else return None).

        Raises:
            ResultTimeout: not finished within ``timeout``.
            TaskFailed: the task ended in FAILURE (carries its error and traceback).
            TaskRevoked: the task was revoked or expired.
        """
        meta = self.app.backend.wait(self.id, timeout)
        return unwrap(meta, propagate)


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
