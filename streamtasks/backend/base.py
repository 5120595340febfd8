"""The result backend seam: task rows by id, listed by queue and state."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from streamtasks import states
from streamtasks.errors import ResultTimeout
from streamtasks.fanin import FanIn

#: Group members per shard of a group's join rows: a member reads only its shard to learn
#: whether the shard is complete, so no partition or counter is shared by a whole group.
GROUP_SHARD_SIZE = 64

#: Outcomes recorded by :meth:`ResultBackend.claim_group`.
GROUP_FIRED = "fired"
GROUP_FAILED = "failed"


@dataclass(frozen=True, slots=True)
class GroupClaim:
    """A chord's trigger row: who decided the group's outcome, which, and whether it is done.

    Attributes:
        claimer: the claimer that won (see :meth:`ResultBackend.claim_group`).
        outcome: :data:`GROUP_FIRED` or :data:`GROUP_FAILED`.
        claimed_ms: when the claim was written (None when unknown).
        settled: the decided outcome's messages (the chord body, or the failure's rows and
            error callbacks) are confirmed sent (:meth:`ResultBackend.settle_group`).
        reason: for a ``failed`` claim, the failed member's error text; else None.

    """

    claimer: str
    outcome: str
    claimed_ms: int | None = None
    settled: bool = False
    reason: str | None = None

    def held_by(self, claimer: str, outcome: str) -> bool:
        """Whether ``claimer`` holds this decision for ``outcome``.

        A claimer holds a group's decision only for the outcome it won: a claimer whose
        earlier claim fired does not hold a later ``failed`` claim of the same group.
        """
        return self.claimer == claimer and self.outcome == outcome


@dataclass(frozen=True, slots=True)
class FireClaim:
    """The claim of one due time of a schedule (see :mod:`streamtasks.schedules`).

    Attributes:
        claimer: the scheduler that holds the due time.
        claimed_ms: when it claimed it (epoch ms).
        sent: the due time's task is confirmed sent.
    """

    claimer: str
    claimed_ms: int
    sent: bool = False


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


#: Prefix of the ``extra`` keys that hold a task's progress (PENDING, RECEIVED, STARTED).
PROGRESS_PREFIX = "progress."
#: Progress states, lowest first: within one attempt a later one wins.
PROGRESS_STATES = (states.PENDING, states.RECEIVED, states.STARTED)


def progress_entry(attempt: int, at_ms: int, worker: str | None) -> str:
    """Return how a progress state is kept in a row's ``extra``: ``attempt ms worker``."""
    return f"{attempt} {at_ms} {worker or ''}".rstrip()


def progress_key(state: str) -> str:
    """Return the ``extra`` key of a progress state.

    Raises:
        ValueError: ``state`` is not PENDING, RECEIVED or STARTED.
    """
    if state not in PROGRESS_STATES:
        raise ValueError(
            f"progress state must be one of {', '.join(PROGRESS_STATES)}, got {state!r}"
        )
    return PROGRESS_PREFIX + state


def with_progress(meta: TaskMeta) -> TaskMeta:
    """Return ``meta`` with its state taken from its progress entries when they are newer.

    Progress (PENDING on send, RECEIVED, STARTED) is written apart from the ``state``
    column, into ``extra`` (:meth:`ResultBackend.mark_progress`), so a progress write
    can never overwrite a final row, however late it lands (a timer firing as the task
    ends, a redelivered run on another worker). It is read here: a final row is final;
    otherwise the latest progress entry (by attempt, then PENDING < RECEIVED < STARTED)
    wins over a row of an earlier attempt (a RETRY row) or over no state at all.
    """
    if meta.ready or not meta.extra:
        return meta
    best: tuple[int, int, int, str | None, str] | None = None
    for rank, state in enumerate(PROGRESS_STATES):
        raw = meta.extra.get(PROGRESS_PREFIX + state)
        if not raw:
            continue
        parts = raw.split(" ", 2)
        try:
            attempt, at_ms = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            continue
        entry = (attempt, rank, at_ms, parts[2] if len(parts) > 2 else None, state)
        if best is None or entry[:2] > best[:2]:
            best = entry
    if best is None:
        return meta
    attempt, _, at_ms, worker, state = best
    if meta.state and meta.state != states.PENDING and attempt <= meta.attempts:
        return meta  # the row is of this attempt or a later one (a RETRY row)
    meta.state = state
    meta.attempts = attempt
    if state == states.STARTED:
        meta.started_ms = at_ms
    if worker:
        meta.worker = worker
    return meta


@dataclass(frozen=True, slots=True)
class Replication:
    """How a replicated result store keeps its rows (for the durability checks).

    Attributes:
        nodes: nodes of the store's cluster (up or down).
        keyspace: where the rows are.
        replication: its replication map (Cassandra's ``system_schema`` form).
        consistency: the level of reads and writes.
        serial_consistency: the level of lightweight transactions (chord claims).
    """

    nodes: int
    keyspace: str
    replication: dict[str, str]
    consistency: str
    serial_consistency: str


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

    def store_many(self, metas: Sequence[TaskMeta]) -> Future[None]:
        """Write (upsert) several task rows; the future completes when all are durable.

        It fails with the first error (some rows may be written: every write is an
        idempotent upsert, so the caller writes them all again). The default stores one
        by one; a backend overrides it to write the listing entries of a batch together.

        Raises:
            EncodeError: a result cannot be encoded (nothing of that row is written).
        """
        future: Future[None] = Future()

        def finished(error: BaseException | None) -> None:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        gather = FanIn(len(metas), finished)
        for meta in metas:
            self.store(meta).add_done_callback(lambda f: gather.one(f.exception()))
        return future

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

    def fetch_many(self, task_ids: Sequence[str]) -> list[TaskMeta | None]:
        """Return the rows of ``task_ids`` in the same order (None where there is none).

        The default reads one by one; backends override it with concurrent reads.
        """
        return [self.fetch(task_id) for task_id in task_ids]

    @abstractmethod
    def mark_progress(
        self, task_id: str, state: str, attempt: int, name: str, queue: str,
        worker: str | None = None,
    ) -> Future[None]:
        """Record that a task is PENDING, RECEIVED or STARTED, never over a final row.

        The entry goes apart from the row's state (see :func:`with_progress`), so it
        may land at any time, even after the final row, without changing it. Not listed
        by :meth:`list_tasks`. The future fails with BackendError.

        Raises:
            ValueError: ``state`` is not PENDING, RECEIVED or STARTED.
        """

    @abstractmethod
    def forget(self, task_id: str) -> Future[None]:
        """Delete the row of ``task_id`` (reading it again finds none).

        The future fails with BackendError.
        """

    @abstractmethod
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> Future[None]:
        """Store a group's member ids under its id (``GroupResult.save``), with the row TTL.

        The future fails with BackendError.
        """

    @abstractmethod
    def fetch_group(self, group_id: str) -> list[str] | None:
        """Return the member ids saved under ``group_id``, or None when none are.

        Raises:
            BackendError: the backend failed the read.
        """

    @abstractmethod
    def forget_group(self, group_id: str) -> Future[None]:
        """Delete a saved group's row (its members' rows are left as they are)."""

    # -- groups (chords) -----------------------------------------------------------

    @abstractmethod
    def join_group(self, group_id: str, index: int, size: int, result: Any) -> Future[bool]:
        """Record member ``index`` of group ``group_id`` (``size`` members) as succeeded.

        Idempotent per (group, index): a member that runs twice overwrites its entry.
        Members are stored in shards of :data:`GROUP_SHARD_SIZE`; a member reads only its
        own shard, and the member completing a shard reads only the group's shard marks.

        Returns:
            A future whose value is True when, after this write, all ``size`` members are
            recorded. Of members joining concurrently at least the last one sees True
            (several may: :meth:`claim_group` decides who fires). Fails with BackendError.

        Raises:
            EncodeError: the result cannot be encoded (nothing is written).
            ValueError: ``index`` is not in ``0 .. size-1`` (nothing is written).
            ConfigError: the backend's consistency cannot make joins correct
                (:meth:`check_groups`; nothing is written).
        """

    @abstractmethod
    def claim_group(
        self, group_id: str, claimer: str, outcome: str, reason: str | None = None
    ) -> Future[GroupClaim]:
        """Decide a group's outcome once (a lightweight transaction on its trigger row).

        The first claim of a group writes the trigger row; every later claim changes
        nothing and gets the row as it stands.

        Args:
            group_id: the group.
            claimer: who claims: a unique id of the member's record, so that the same
                record delivered again claims again (and re-sends), while a duplicate
                record of the same task does not.
            outcome: :data:`GROUP_FIRED` (the callback is sent) or :data:`GROUP_FAILED`.
            reason: stored with the claim when it wins: for :data:`GROUP_FAILED`, the
                failed member's error text.

        Returns:
            A future of the trigger row after the attempt: this claim when it won now,
            else the row that exists (this claimer's own earlier claim, or another's).
            The caller holds the decision only if ``claim.held_by(claimer, outcome)``.
            It fails with BackendError, also when the backend cannot tell whether the
            claim was applied; claiming again with the same arguments is safe.
        """

    @abstractmethod
    def settle_group(self, group_id: str) -> Future[None]:
        """Record that the decided outcome's messages are confirmed sent.

        The holder of a group's decision calls this once the chord body (``fired``), or
        the failure's rows and error callbacks (``failed``), are confirmed. Until then any
        completer may find the decision unsettled and send its messages again (their ids
        are fixed). Idempotent; linearizable with :meth:`claim_group`.

        Returns:
            A future done when the mark is durable. It fails with BackendError, also when
            the group has no trigger row (claim it first).
        """

    @abstractmethod
    def group_results(self, group_id: str, size: int) -> Future[list[Any]]:
        """Return the results of members ``0 .. size-1`` of a group, in member order.

        The future fails with BackendError when a member's entry is missing.
        """

    @abstractmethod
    def group_claim(self, group_id: str) -> GroupClaim | None:
        """Return the group's trigger row (claimer, outcome, settled, reason), or None.

        A read, not a decision: act on :meth:`claim_group`'s answer only.
        """

    def check_groups(self) -> None:  # noqa: B027 - optional hook
        """Refuse a configuration under which group joins and claims cannot be correct.

        Backends run it before their first group operation; a worker may call it at
        start to fail fast. The default accepts everything.

        Raises:
            ConfigError: naming the setting to change.
            BackendError: the backend cannot be reached to tell.

        """

    # -- schedules and revokes (streamtasks.schedules, streamtasks.control) ------------

    def claim_fire(self, schedule: str, due_ms: int, claimer: str, ttl_s: int) -> FireClaim:
        """Claim one due time of a schedule, once for all (a lightweight transaction).

        Returns the claim that holds the due time: ``claimer``'s when it won, else the
        earlier one. Rows expire after ``ttl_s``.

        Raises:
            BackendError: the claim could not be decided (try again).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot claim schedule due times")

    def fire_claim(self, schedule: str, due_ms: int) -> FireClaim | None:
        """Return the claim of a due time, or None (a plain read).

        Raises:
            BackendError: the read failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read schedule claims")

    def take_over_fire(
        self, schedule: str, due_ms: int, claimer: str, previous: str, ttl_s: int
    ) -> bool:
        """Take a due time over from ``previous`` if it is still unsent; True when taken.

        Raises:
            BackendError: the claim could not be decided (try again).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot claim schedule due times")

    def fire_sent(self, schedule: str, due_ms: int, ttl_s: int) -> None:
        """Mark a claimed due time's task confirmed sent.

        Raises:
            BackendError: the write failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot claim schedule due times")

    def last_fire(self, schedule: str) -> int | None:
        """Return the newest claimed due time of a schedule (epoch ms), or None.

        Raises:
            BackendError: the read failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read schedule claims")

    def store_revoked(self, task_ids: Sequence[str], terminate: bool, ttl_s: int) -> None:
        """Record task ids as revoked for ``ttl_s`` seconds.

        Raises:
            BackendError: the write failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot store revoked ids")

    def revoked(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Return which of ``task_ids`` are revoked, each with its ``terminate`` flag.

        Raises:
            BackendError: the read failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read revoked ids")

    def migrate(self) -> list[str]:
        """Create or upgrade the storage schema; return the migrations applied."""
        return []

    def pending_migrations(self) -> list[str]:
        """Return the schema migrations not yet applied (none for a schemaless backend).

        Raises:
            BackendError: the backend is not reachable.
        """
        return []

    def replication(self) -> Replication | None:
        """Return how a replicated store keeps its rows, else None.

        Used by the durability checks (:mod:`streamtasks.durability`).

        Raises:
            BackendError: the backend is not reachable.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def own_writes(self) -> bool:
        """Make the calling thread carry out this backend's write completions from now on.

        A backend whose writes complete on a thread of its own (the acsylla writer's
        loop) may instead have them completed by the thread that issues most of them,
        which then calls :meth:`pump_writes` often: no second Python thread takes the
        GIL for every acknowledgement. Return True when the calling thread now owns
        them; False (the default) when the backend has no such thread, or it has
        already started.
        """
        return False

    def release_writes(self) -> None:  # noqa: B027 - optional hook
        """The owner (:meth:`own_writes`) stops pumping: writes complete on their own again."""

    def pump_writes(self, timeout_s: float = 0.0) -> None:  # noqa: B027 - optional hook
        """Complete the writes acknowledged since the last call (the owner's thread only).

        Waits up to ``timeout_s`` for an acknowledgement when none is there yet. Does
        nothing unless :meth:`own_writes` returned True on this thread.
        """

    def wait(
        self,
        task_id: str,
        timeout_s: float | None,
        interval_s: float = 0.002,
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
