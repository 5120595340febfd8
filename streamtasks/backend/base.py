"""The result backend seam: task rows by id, listed by queue and state."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from streamtasks import states
from streamtasks.errors import ResultTimeout


@dataclass(slots=True)
class TaskMeta:
    """The stored state of one task (one row, keyed by ``task_id``)."""

    task_id: str
    state: str
    name: str = ""
    queue: str = ""
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    attempts: int = 0
    worker: str | None = None
    created_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    group_index: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether the state is final (SUCCESS, FAILURE or REVOKED)."""
        return self.state in states.READY_STATES


class ResultBackend(ABC):
    """Stores task rows and reads them back.

    Subclasses implement :meth:`store`, :meth:`fetch` and :meth:`list_tasks`; waiting
    for a result (polling with backoff, timeouts) is done here once for all.
    """

    @abstractmethod
    def store(self, meta: TaskMeta) -> Future[None]:
        """Write (upsert) a task row asynchronously; idempotent by task id.

        The future completes when the write is durable, or fails with BackendError.
        """

    @abstractmethod
    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return the row of ``task_id``, or None when there is none."""

    @abstractmethod
    def list_tasks(
        self,
        queue: str,
        state: str,
        since_ms: int,
        until_ms: int,
        limit: int = 100,
    ) -> list[TaskMeta]:
        """List tasks of ``queue`` that entered ``state`` in ``[since_ms, until_ms)``."""

    def migrate(self) -> list[str]:
        """Create or upgrade the storage schema; return the migrations applied."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def wait(
        self,
        task_id: str,
        timeout_s: float | None,
        interval_s: float = 0.02,
        max_interval_s: float = 0.5,
    ) -> TaskMeta:
        """Poll until the task is in a final state and return its row.

        Raises:
            ResultTimeout: not final within ``timeout_s`` (None waits for ever).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = interval_s
        while True:
            meta = self.fetch(task_id)
            if meta is not None and meta.ready:
                return meta
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    state = meta.state if meta else "unknown"
                    raise ResultTimeout(
                        f"task {task_id} not finished within {timeout_s}s (state: {state})"
                    )
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * 1.5, max_interval_s)
