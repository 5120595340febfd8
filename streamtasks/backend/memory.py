"""An in-process result backend for unit tests and ``memory://`` tries.

It keeps the same semantics as the Cassandra backend (upsert by task id, listing of the
tasks currently in a state whose last update lies in a time window) without any I/O.
It is never proof that the Cassandra path works.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from streamtasks.backend.base import (
    FireClaim,
    GroupClaim,
    ResultBackend,
    TaskMeta,
    progress_entry,
    progress_key,
    with_progress,
)
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


def check_group_member(group_id: str, index: int, size: int) -> None:
    """Check that ``index`` can be a member of a group of ``size`` members.

    Raises:
        ValueError: ``size`` is below 1 or ``index`` is not in ``0 .. size-1``.

    """
    if size < 1 or not 0 <= index < size:
        raise ValueError(
            f"group {group_id}: member index {index} is not in 0 .. size-1 (size {size})"
        )


def missing_members_message(group_id: str, size: int, missing: Sequence[int]) -> str:
    """Return the error message for members of a group whose entry is missing."""
    shown = ", ".join(str(index) for index in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return (
        f"group {group_id}: no result stored for member(s) {shown}{more} of {size}; "
        "they have not joined yet, or their entries expired (group_expires_s)"
    )


def unclaimed_group_message(group_id: str) -> str:
    """Return the error message for settling a group that has no trigger row."""
    return (
        f"group {group_id}: cannot settle, it has no trigger row; claim_group first "
        "(or the row expired: group_expires_s)"
    )


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


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
        self._groups: dict[str, dict[int, Any]] = {}
        self._claims: dict[str, GroupClaim] = {}
        self._saved_groups: dict[str, list[str]] = {}
        self._fires: dict[tuple[str, int], FireClaim] = {}
        self._revoked: dict[str, bool] = {}
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
            error = self._injected_failure(f"task {meta.task_id}")
        if error is not None:
            future.set_exception(error)
            return future
        row = self._copy(meta, from_caller=True)
        updated = state_time_ms(row)
        with self._lock:
            self._rows[row.task_id] = (row, updated)
        future.set_result(None)
        return future

    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return a copy of the row of ``task_id`` (progress applied), or None."""
        with self._lock:
            item = self._rows.get(task_id)
        return None if item is None else with_progress(self._copy(item[0]))

    def mark_progress(
        self, task_id: str, state: str, attempt: int, name: str, queue: str,
        worker: str | None = None,
    ) -> Future[None]:
        """Add a progress entry to the row (made if missing); its state is left alone.

        Counted as a write by :meth:`fail_writes` and :attr:`store_calls`.
        """
        key = progress_key(state)
        entry = progress_entry(attempt, now_ms(), worker)
        future: Future[None] = Future()
        with self._lock:
            self._stores += 1
            error = self._injected_failure(f"progress of task {task_id}")
            if error is None:
                row, updated = self._rows.get(task_id) or (
                    TaskMeta(task_id, "", name=name, queue=queue), now_ms())
                row = dataclasses.replace(row, extra={**row.extra, key: entry})
                self._rows[task_id] = (row, updated)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
        return future

    def forget(self, task_id: str) -> Future[None]:
        """Delete the row of ``task_id`` (a done future)."""
        with self._lock:
            self._rows.pop(task_id, None)
        return _done()

    def save_group(self, group_id: str, task_ids: Sequence[str]) -> Future[None]:
        """Keep the group's member ids (a done future)."""
        with self._lock:
            self._saved_groups[group_id] = list(task_ids)
        return _done()

    def fetch_group(self, group_id: str) -> list[str] | None:
        """Return the member ids saved under ``group_id``, or None."""
        with self._lock:
            ids = self._saved_groups.get(group_id)
        return None if ids is None else list(ids)

    def forget_group(self, group_id: str) -> Future[None]:
        """Delete a saved group (a done future)."""
        with self._lock:
            self._saved_groups.pop(group_id, None)
        return _done()

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

    def fetch_many(self, task_ids: Sequence[str]) -> list[TaskMeta | None]:
        """Return copies of the rows of ``task_ids`` in order (None where there is none)."""
        with self._lock:
            items = [self._rows.get(task_id) for task_id in task_ids]
        return [None if item is None else with_progress(self._copy(item[0])) for item in items]

    # -- groups ----------------------------------------------------------------------

    def join_group(self, group_id: str, index: int, size: int, result: Any) -> Future[bool]:
        """Record member ``index`` of the group; the returned future is already done.

        Fails the future when :meth:`fail_writes` injects a failure.

        Raises:
            EncodeError: the result cannot be encoded by the codec (nothing is stored).
            ValueError: ``index`` is not in ``0 .. size-1``.

        """
        check_group_member(group_id, index, size)
        value = self._own(result)
        future: Future[bool] = Future()
        with self._lock:
            error = self._injected_failure(f"group {group_id} member {index}")
        if error is not None:
            future.set_exception(error)
            return future
        with self._lock:
            members = self._groups.setdefault(group_id, {})
            members[index] = value
            # indexes are checked against size, so a full dict holds exactly 0 .. size-1
            complete = len(members) >= size
        future.set_result(complete)
        return future

    def claim_group(
        self, group_id: str, claimer: str, outcome: str, reason: str | None = None
    ) -> Future[GroupClaim]:
        """Claim the group unless it is claimed; return its trigger row (a done future)."""
        future: Future[GroupClaim] = Future()
        with self._lock:
            held = self._claims.setdefault(
                group_id, GroupClaim(claimer, outcome, now_ms(), settled=False, reason=reason)
            )
        future.set_result(held)
        return future

    def settle_group(self, group_id: str) -> Future[None]:
        """Mark the group's decision settled (a done future; failed when not claimed)."""
        future: Future[None] = Future()
        with self._lock:
            claim = self._claims.get(group_id)
            if claim is not None:
                self._claims[group_id] = dataclasses.replace(claim, settled=True)
        if claim is None:
            future.set_exception(BackendError(unclaimed_group_message(group_id)))
        else:
            future.set_result(None)
        return future

    def group_results(self, group_id: str, size: int) -> Future[list[Any]]:
        """Return copies of the members' results in order; the future is already done."""
        future: Future[list[Any]] = Future()
        with self._lock:
            members = dict(self._groups.get(group_id, {}))
        missing = [index for index in range(size) if index not in members]
        if missing:
            future.set_exception(BackendError(missing_members_message(group_id, size, missing)))
        else:
            future.set_result([copy.deepcopy(members[index]) for index in range(size)])
        return future

    def group_claim(self, group_id: str) -> GroupClaim | None:
        """Return who claimed the group and its outcome, or None."""
        with self._lock:
            return self._claims.get(group_id)

    # -- schedules and revokes (no TTL here) ------------------------------------

    def claim_fire(self, schedule: str, due_ms: int, claimer: str, ttl_s: int) -> FireClaim:
        """Claim a due time unless claimed; return the claim that holds it."""
        with self._lock:
            return self._fires.setdefault((schedule, due_ms), FireClaim(claimer, now_ms()))

    def fire_claim(self, schedule: str, due_ms: int) -> FireClaim | None:
        """Return the claim of a due time, or None."""
        with self._lock:
            return self._fires.get((schedule, due_ms))

    def take_over_fire(
        self, schedule: str, due_ms: int, claimer: str, previous: str, ttl_s: int
    ) -> bool:
        """Take an unsent due time over from ``previous``; True when taken."""
        with self._lock:
            claim = self._fires.get((schedule, due_ms))
            if claim is None or claim.sent or claim.claimer != previous:
                return False
            self._fires[(schedule, due_ms)] = FireClaim(claimer, now_ms())
            return True

    def fire_sent(self, schedule: str, due_ms: int, ttl_s: int) -> None:
        """Mark a claimed due time sent."""
        with self._lock:
            claim = self._fires[(schedule, due_ms)]
            self._fires[(schedule, due_ms)] = dataclasses.replace(claim, sent=True)

    def last_fire(self, schedule: str) -> int | None:
        """Return the newest claimed due time of ``schedule``, or None."""
        with self._lock:
            return max((due for name, due in self._fires if name == schedule), default=None)

    def store_revoked(self, task_ids: Sequence[str], terminate: bool, ttl_s: int) -> None:
        """Record ``task_ids`` as revoked."""
        with self._lock:
            for task_id in task_ids:
                self._revoked[task_id] = terminate or self._revoked.get(task_id, False)

    def revoked(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Return which of ``task_ids`` are revoked, with their ``terminate`` flags."""
        with self._lock:
            return {t: self._revoked[t] for t in task_ids if t in self._revoked}

    # -- test hooks --------------------------------------------------------------

    def fail_writes(self, n: int, error: BackendError | None = None) -> None:
        """Test hook: make the next ``n`` writes fail with ``error`` (a BackendError).

        Writes are :meth:`store` and :meth:`join_group` calls, counted together in call
        order; :meth:`claim_group` and :meth:`settle_group` are never failed.

        Args:
            n: how many of the following writes fail (0 stops failing).
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
        """Forget every row, group member and group claim."""
        with self._lock:
            self._rows.clear()
            self._groups.clear()
            self._claims.clear()
            self._saved_groups.clear()
            self._fires.clear()
            self._revoked.clear()

    def _injected_failure(self, what: str) -> BackendError | None:
        """Consume one injected failure, if any (call with the lock held)."""
        if self._fail_next <= 0:
            return None
        self._fail_next -= 1
        return self._fail_error or BackendError(
            f"memory backend: injected write failure for {what}"
        )

    def _own(self, value: Any) -> Any:
        """Return a copy of a caller's value, as it would come back from Cassandra."""
        if self._codec is not None:
            return self._codec.decode_value(self._codec.encode_value(value))
        return copy.deepcopy(value)

    def _copy(self, meta: TaskMeta, from_caller: bool = False) -> TaskMeta:
        result = self._own(meta.result) if from_caller else copy.deepcopy(meta.result)
        return dataclasses.replace(meta, result=result, extra=dict(meta.extra))
