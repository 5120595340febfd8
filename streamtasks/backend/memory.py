"""An in-process result backend for unit tests and ``memory://`` tries.

It keeps the same semantics as the Cassandra backend (upsert by task id, listing of the
tasks currently in a state whose last update lies in a time window) without any I/O.
It is never proof that the Cassandra path works.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from concurrent.futures import Future

from streamtasks.backend.base import ResultBackend, TaskMeta
from streamtasks.codec.base import Codec
from streamtasks.errors import BackendError
from streamtasks.message import now_ms


def state_time_ms(meta: TaskMeta, default_ms: int | None = None) -> int:
    """Return when ``meta`` entered its state: the latest of its timestamps.

    The latest of ``finished_ms``, ``started_ms`` and ``created_ms``; when none is set,
    ``default_ms`` (the time of writing, now when None). Backends list tasks by this time.
    """
    times = [t for t in (meta.finished_ms, meta.started_ms, meta.created_ms) if t is not None]
    if times:
        return max(times)
    return now_ms() if default_ms is None else default_ms


class MemoryBackend(ResultBackend):
    """A dict of task rows guarded by a lock.

    Args:
        codec: when given, every stored result is round-tripped through
            ``codec.encode_value`` / ``decode_value`` (so unencodable results fail here as
            they would on Cassandra); otherwise results are deep-copied.

    """

    def __init__(self, codec: Codec | None = None) -> None:
        self._codec = codec
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[TaskMeta, int]] = {}
        self._fail_next = 0
        self._fail_error: BackendError | None = None
        self._stores = 0

    def store(self, meta: TaskMeta) -> Future[None]:
        """Upsert the row of ``meta.task_id``; the returned future is already done.

        Raises:
            EncodeError: the result cannot be encoded by the codec (nothing is stored).

        """
        future: Future[None] = Future()
        with self._lock:
            self._stores += 1
            if self._fail_next > 0:
                self._fail_next -= 1
                error = self._fail_error or BackendError(
                    f"memory backend: injected write failure for task {meta.task_id}"
                )
                future.set_exception(error)
                return future
        row = self._copy(meta, from_caller=True)
        updated = state_time_ms(row)
        with self._lock:
            self._rows[row.task_id] = (row, updated)
        future.set_result(None)
        return future

    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return a copy of the row of ``task_id``, or None."""
        with self._lock:
            item = self._rows.get(task_id)
        return None if item is None else self._copy(item[0])

    def list_tasks(
        self,
        queue: str,
        state: str,
        since_ms: int,
        until_ms: int,
        limit: int = 100,
    ) -> list[TaskMeta]:
        """List tasks of ``queue`` now in ``state`` whose last update is in the window.

        Newest first (ties by task id), at most ``limit``.
        """
        with self._lock:
            found = [
                (updated, meta)
                for meta, updated in self._rows.values()
                if meta.queue == queue and meta.state == state and since_ms <= updated < until_ms
            ]
        found.sort(key=lambda item: (-item[0], item[1].task_id))
        return [self._copy(meta) for _, meta in found[: max(limit, 0)]]

    def fail_writes(self, n: int, error: BackendError | None = None) -> None:
        """Test hook: make the next ``n`` stores fail with ``error`` (a BackendError).

        Args:
            n: how many of the following :meth:`store` calls fail (0 stops failing).
            error: the error their futures fail with; a generic BackendError by default.

        """
        with self._lock:
            self._fail_next = max(n, 0)
            self._fail_error = error

    @property
    def store_calls(self) -> int:
        """How many times :meth:`store` was called (failed ones included)."""
        with self._lock:
            return self._stores

    def clear(self) -> None:
        """Forget every row."""
        with self._lock:
            self._rows.clear()

    def _copy(self, meta: TaskMeta, from_caller: bool = False) -> TaskMeta:
        if from_caller and self._codec is not None:
            result = self._codec.decode_value(self._codec.encode_value(meta.result))
        else:
            result = copy.deepcopy(meta.result)
        return dataclasses.replace(meta, result=result, extra=dict(meta.extra))
