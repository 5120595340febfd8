"""Task rows of the Cassandra backend: one row per task, listed by queue, state and time.

Writes are asynchronous (``execute_async`` of prepared statements) and bounded by
``Settings.backend_max_in_flight``; reads are synchronous (:meth:`TaskRows.fetch_many`
reads concurrently, a window at a time). A listing entry per task (table
``tasks_by_state``) is spread over :data:`LISTING_SHARDS` partitions per queue, state and
hour, by the time of the entry (:func:`listing_shard`); a listing reads the shards of each
hour and merges them newest first.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from streamtasks.backend.base import TaskMeta, progress_entry, progress_key, with_progress
from streamtasks.backend.cassandra.connection import Connection
from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter
from streamtasks.backend.cassandra.futures import Gather
from streamtasks.backend.memory import state_time_ms
from streamtasks.codec.base import Codec
from streamtasks.errors import BackendError, StreamTasksError
from streamtasks.fanin import FanIn
from streamtasks.message import now_ms

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
#: Partitions per (queue, state, hour) of the listing table (part of its format: 003).
LISTING_SHARDS = 16
#: Entries updated within one slice of this many ms share a listing shard.
LISTING_SLICE_MS = 100
#: Listing entries per UNLOGGED BATCH at most (about 4 KB: under Cassandra's 5 KB warning).
LISTING_BATCH = 50
_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1)  # the driver returns naive UTC datetimes
_MAX_BUCKETS = 24 * 400  # a listing never scans more hours than this

_TASK_COLUMNS = (
    "task_id", "name", "queue", "state", "result", "result_value", "error_type",
    "error_message", "traceback", "attempts", "worker", "created_at", "started_at",
    "finished_at", "updated_at", "parent_id", "root_id", "group_id", "group_index", "extra",
)


def listing_shard(updated_ms: int) -> int:
    """Return the listing shard of an entry updated at ``updated_ms`` (epoch ms).

    Successive :data:`LISTING_SLICE_MS` slices rotate over the :data:`LISTING_SHARDS`
    partitions of an hour, so results written together (one worker turn) share one
    partition and go as one batch, while the hour is still spread over every shard.
    A function of the entry itself: writing the same entry again lands on the same key.
    """
    return updated_ms // LISTING_SLICE_MS % LISTING_SHARDS


def to_ms(value: datetime | None) -> int | None:
    """Return a driver timestamp (naive UTC) as epoch milliseconds."""
    if value is None:
        return None
    return round((value - _EPOCH) / timedelta(milliseconds=1))


def _chunks(groups: Iterable[list[_T]], size: int) -> Iterator[list[_T]]:
    """Yield each group, cut into lists of at most ``size``."""
    for group in groups:
        for start in range(0, len(group), size):
            yield group[start:start + size]


@dataclass(slots=True)
class _RowStatements:
    insert_task: Any
    insert_index: Any
    select_task: Any
    select_index: Any
    mark_progress: Any
    delete_task: Any


def _insert_cql(ks: str) -> tuple[str, str]:
    """Return the CQL of a task row's upsert and of a listing entry's (both writers')."""
    columns = ", ".join(_TASK_COLUMNS)
    marks = ", ".join("?" for _ in _TASK_COLUMNS)
    return (f"INSERT INTO {ks}.tasks ({columns}) VALUES ({marks}) USING TTL ?",
            f"INSERT INTO {ks}.tasks_by_state (queue, state, bucket, shard, "
            "updated_at, task_id, name) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?")


def _prepare_rows(conn: Connection) -> _RowStatements:
    ks = conn.ks
    columns = ", ".join(_TASK_COLUMNS)
    insert_task, insert_index = _insert_cql(ks)
    return _RowStatements(**conn.prepare_all({
        "insert_task": insert_task,
        "insert_index": insert_index,
        "select_task": f"SELECT {columns} FROM {ks}.tasks WHERE task_id = ?",
        "select_index": f"SELECT task_id, updated_at FROM {ks}.tasks_by_state WHERE queue = ? "
        "AND state = ? AND bucket = ? AND shard = ? AND updated_at >= ? AND updated_at < ?",
        # one map entry, never the state column: a late progress write changes no final row
        "mark_progress": f"UPDATE {ks}.tasks USING TTL ? SET name = ?, queue = ?, "
        "extra[?] = ? WHERE task_id = ?",
        "delete_task": f"DELETE FROM {ks}.tasks WHERE task_id = ?",
    }))


_S = TypeVar("_S")


def write_one(
    conn: Connection, ready: Callable[[], tuple[Any, _S]], statement: Callable[[_S], Any],
    params: tuple[Any, ...], what: str,
) -> Future[None]:
    """Run one prepared write asynchronously; the future fails with BackendError (``what``)."""
    future: Future[None] = Future()
    started = conn.begin(future, ready)
    if started is None:
        return future
    session, statements = started
    try:
        response = session.execute_async(statement(statements), params)
    except Exception as err:  # e.g. the session was shut down
        future.set_exception(conn.error(err, what))
        return future
    response.add_callbacks(lambda _rows: future.set_result(None),
                           lambda err: future.set_exception(conn.error(err, what)))
    return future


@dataclass(slots=True)
class _GroupStatements:
    save: Any
    select: Any
    delete: Any


def _prepare_groups(conn: Connection) -> _GroupStatements:
    ks = conn.ks
    return _GroupStatements(**conn.prepare_all({
        "save": f"INSERT INTO {ks}.group_results (group_id, task_ids, saved_at) "
        "VALUES (?, ?, ?) USING TTL ?",
        "select": f"SELECT task_ids FROM {ks}.group_results WHERE group_id = ?",
        "delete": f"DELETE FROM {ks}.group_results WHERE group_id = ?",
    }))


class SavedGroups:
    """Saved group results (``GroupResult.save``): a row of member ids per group (005).

    Args:
        connection: the session and its prepared statements.
        ttl_s: TTL of the rows (the task rows' TTL; 0: none).
    """

    def __init__(self, connection: Connection, ttl_s: int) -> None:
        self._conn = connection
        self._ttl_s = ttl_s

    def _ready(self) -> tuple[Any, _GroupStatements]:
        return self._conn.prepared("saved_groups", _prepare_groups)

    def save(self, group_id: str, task_ids: Sequence[str]) -> Future[None]:
        """Write the group's member ids, asynchronously."""
        params = (group_id, list(task_ids), now_ms(), self._ttl_s)
        return write_one(self._conn, self._ready, lambda st: st.save, params,
                         f"saving group {group_id}")

    def fetch(self, group_id: str) -> list[str] | None:
        """Return the saved member ids, or None.

        Raises:
            BackendError: Cassandra failed the read.
        """
        session, statements = self._ready()
        row = self._conn.read_one(session, statements.select, (group_id,),
                                  f"fetching group {group_id}")
        return None if row is None else list(row["task_ids"] or [])

    def forget(self, group_id: str) -> Future[None]:
        """Delete the saved row, asynchronously."""
        return write_one(self._conn, self._ready, lambda st: st.delete, (group_id,),
                         f"forgetting group {group_id}")


class InFlightSlots:
    """``limit`` slots for writes in flight, taken and given back several at a time.

    A batch of the acsylla writer takes one slot per row (at most all of them) in one
    call and gives them back in one call when it ends: a slot a call cost ~1 µs a row
    (``threading.BoundedSemaphore``), half of it on the writer's loop thread. Takers queue
    one behind the other: a batch waiting for its slots is never overtaken by a smaller
    one, and no two batches each hold part of what they wait for.

    Args:
        limit: the slots (``backend_max_in_flight``, >= 1).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._changed = threading.Condition(threading.Lock())
        #: Held by the taker at the head of the queue while it waits for enough slots.
        self._taking = threading.Lock()

    @property
    def free(self) -> int:
        """The slots not taken now."""
        return self._free

    def take(self, count: int) -> int:
        """Take ``count`` slots (at most :attr:`limit`), waiting for them; return how many."""
        count = min(count, self.limit)
        with self._taking, self._changed:
            while self._free < count:
                self._changed.wait()
            self._free -= count
        return count

    def give(self, count: int) -> None:
        """Give back ``count`` slots taken before.

        Raises:
            ValueError: more slots given back than are taken (a bug of the caller's).
        """
        with self._changed:
            if self._free + count > self.limit:
                raise ValueError(f"{count} in-flight slots given back, only "
                                 f"{self.limit - self._free} are taken")
            self._free += count
            self._changed.notify()


class TaskRows:
    """Stores, reads and lists task rows (the task half of :class:`CassandraBackend`).

    Args:
        connection: the session and its prepared statements.
        codec: encodes results with their exact types (``result_value`` column).
        json_text: renders a result as JSON text (``result`` column, for cqlsh).
        ttl_s: TTL of rows and listing entries (0: none).
        max_in_flight: concurrent stores; :meth:`store` blocks beyond.

    """

    def __init__(
        self,
        connection: Connection,
        codec: Codec,
        json_text: Callable[[Any], str],
        ttl_s: int,
        max_in_flight: int,
    ) -> None:
        self._conn = connection
        self._codec = codec
        self._json_text = json_text
        self._ttl_s = ttl_s
        self._slots = InFlightSlots(max_in_flight)
        self._fast: AcsyllaWriter | None = None
        if connection.options.writer == "acsylla":
            self._fast = AcsyllaWriter(connection.options, *_insert_cql(connection.ks))

    def close(self) -> None:
        """Stop the acsylla writer's loop thread, if any (after the pending writes)."""
        if self._fast is not None:
            self._fast.close(self._conn.options.request_timeout_s)

    def own_writes(self) -> bool:
        """Make the calling thread run the acsylla writer's loop (:meth:`AcsyllaWriter.own`)."""
        return self._fast is not None and self._fast.own()

    def release_writes(self) -> None:
        """Give the acsylla writer's loop its own thread again (:meth:`AcsyllaWriter.release`)."""
        if self._fast is not None:
            self._fast.release()

    def pump_writes(self, timeout_s: float = 0.0) -> None:
        """Run the owned acsylla writer's loop once (:meth:`AcsyllaWriter.pump`)."""
        if self._fast is not None:
            self._fast.pump(timeout_s)

    def _ready(self) -> tuple[Any, _RowStatements]:
        """Return the session and the prepared task statements, preparing them once."""
        return self._conn.prepared("rows", _prepare_rows)

    def store(self, meta: TaskMeta) -> Future[None]:
        """Upsert the row of ``meta.task_id`` and its listing entry, asynchronously.

        Blocks only while ``backend_max_in_flight`` stores are already in flight (and, once,
        to connect). The future completes on the driver's I/O thread, so callbacks added
        to it must be short and must not call :meth:`store` themselves.

        Returns:
            A future done when both writes are acknowledged at the configured
            consistency, or failed with BackendError.

        Raises:
            EncodeError: the result cannot be encoded (nothing is written).

        """
        return self.store_many([meta])

    def store_many(self, metas: Sequence[TaskMeta]) -> Future[None]:
        """Upsert several task rows and their listing entries, asynchronously.

        Each task row is its own write (a batch over many partitions is a Cassandra
        anti-pattern); the listing entries go as UNLOGGED BATCHes of at most
        :data:`LISTING_BATCH`, one listing partition ``(queue, state, hour, shard)`` each.
        Entries written within one :data:`LISTING_SLICE_MS` share a partition, so a batch of
        results finished together costs one more write, not one per shard.
        Blocks while ``backend_max_in_flight`` row writes are in flight.

        Raises:
            EncodeError: a result cannot be encoded (nothing is written).

        """
        future: Future[None] = Future()
        if not metas:
            future.set_result(None)
            return future
        ready = self._conn.begin(future, self._ready)
        if ready is None:
            return future
        params = [self._write_params(meta) for meta in metas]  # may raise EncodeError
        groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for _, index_params in params:
            groups.setdefault(index_params[:4], []).append(index_params)
        what = f"storing task {metas[0].task_id}" if len(metas) == 1 else (
            f"storing {len(metas)} tasks")
        batches = list(_chunks(groups.values(), LISTING_BATCH))
        if self._fast is not None:
            self._store_fast(future, what, params, batches)
        else:
            self._store_driver(future, what, ready, params, batches)
        return future

    def _store_driver(
        self, future: Future[None], what: str, ready: tuple[Any, _RowStatements],
        params: list[tuple[tuple[Any, ...], tuple[Any, ...]]], batches: list[list[Any]],
    ) -> None:
        """Write rows and listing entries with cassandra-driver (``execute_async`` each)."""
        from cassandra.query import BatchStatement, BatchType

        session, statements = ready
        write = FanIn(len(params) + len(batches), partial(self._batch_done, future, what))

        def row_done(_rows: object) -> None:
            self._slots.give(1)
            write.one(None)

        def row_failed(err: BaseException) -> None:
            self._slots.give(1)
            write.one(err)

        for task_params, _ in params:
            self._slots.take(1)
            try:
                response = session.execute_async(statements.insert_task, task_params)
            except Exception as err:  # e.g. the session was shut down
                row_failed(err)
                continue
            response.add_callbacks(row_done, row_failed)
        for entries in batches:
            if len(entries) == 1:
                statement, values = statements.insert_index, entries[0]
            else:
                statement, values = BatchStatement(batch_type=BatchType.UNLOGGED), None
                for entry in entries:
                    statement.add(statements.insert_index, entry)
            try:
                response = session.execute_async(statement, values)
            except Exception as err:
                write.failed(err)
                continue
            response.add_callbacks(write.succeeded, write.failed)

    def _store_fast(
        self, future: Future[None], what: str,
        params: list[tuple[tuple[Any, ...], tuple[Any, ...]]], batches: list[list[Any]],
    ) -> None:
        """Hand the whole batch to the acsylla writer (one hop to its loop thread).

        The batch holds one in-flight slot per row until it is done, at most all of them;
        it takes them all at once (one batch at a time), so batches stored from several
        threads never deadlock each holding part of the slots.
        """
        assert self._fast is not None
        # The thread owning the writer's loop never waits for slots: they come back only
        # when it runs that loop. Its batches are bounded by their caller (a worker holds
        # at most max_in_flight records).
        count = 0 if self._fast.owned_here() else self._slots.take(len(params))

        def done(error: BaseException | None) -> None:
            try:
                self._slots.give(count)
            finally:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

        try:
            self._fast.write([task for task, _ in params], batches, what, done)
        except Exception as err:  # not handed over: the writer will not call done
            error = self._conn.error(err, what)
            error.__cause__ = err
            done(error)

    def mark_progress(
        self, task_id: str, state: str, attempt: int, name: str, queue: str,
        worker: str | None,
    ) -> Future[None]:
        """Write one progress entry of the row, asynchronously (never its state).

        Raises:
            ValueError: not a progress state.
        """
        key = progress_key(state)
        params = (self._ttl_s, name, queue, key, progress_entry(attempt, now_ms(), worker),
                  task_id)
        return write_one(self._conn, self._ready, lambda st: st.mark_progress, params,
                         f"progress of task {task_id}")

    def forget(self, task_id: str) -> Future[None]:
        """Delete the row of ``task_id``, asynchronously.

        Its listing entries stay; a listing skips them, as those of any row that moved on.
        """
        return write_one(self._conn, self._ready, lambda st: st.delete_task, (task_id,),
                         f"forgetting task {task_id}")

    def _batch_done(self, future: Future[None], what: str, error: BaseException | None) -> None:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(self._conn.error(error, what))

    def _write_params(self, meta: TaskMeta) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if meta.result is None:
            text: str | None = None
            value: bytes | None = None
        else:
            text = self._json_text(meta.result)
            value = self._codec.encode_value(meta.result)
        updated = state_time_ms(meta)
        ttl = self._ttl_s
        task_params = (
            meta.task_id, meta.name, meta.queue, meta.state, text, value, meta.error_type,
            meta.error_message, meta.traceback, meta.attempts, meta.worker, meta.created_ms,
            meta.started_ms, meta.finished_ms, updated, meta.parent_id, meta.root_id,
            meta.group_id, meta.group_index, dict(meta.extra) or None, ttl,
        )
        index_params = (
            meta.queue, meta.state, updated - updated % HOUR_MS, listing_shard(updated),
            updated, meta.task_id,
            meta.name, ttl,
        )
        return task_params, index_params

    # ---------------------------------------------------------------- reads

    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return the row of ``task_id``, or None when there is none (or it expired).

        Raises:
            BackendError: Cassandra failed the read.

        """
        session, statements = self._ready()
        row = self._conn.read_one(session, statements.select_task, (task_id,),
                                  f"fetching task {task_id}")
        return None if row is None else with_progress(self.to_meta(row))

    def fetch_many(self, task_ids: Sequence[str]) -> list[TaskMeta | None]:
        """Return the rows of ``task_ids`` in the same order (None where there is none).

        Reads concurrently, at most 256 rows in flight.

        Raises:
            BackendError: Cassandra failed a read.

        """
        if not task_ids:
            return []
        session, statements = self._ready()

        def wrap(err: BaseException, position: int) -> BackendError:
            return self._conn.error(err, f"fetching task {task_ids[position]}")

        requests = [(statements.select_task, (task_id,)) for task_id in task_ids]
        pages = Gather(session, requests, wrap, list).start().result()
        return [with_progress(self.to_meta(rows[0])) if rows else None for rows in pages]

    def list_tasks(
        self,
        queue: str,
        state: str,
        since_ms: int,
        until_ms: int,
        limit: int = 100,
    ) -> list[TaskMeta]:
        """List tasks of ``queue`` now in ``state`` whose last update is in the window.

        Reads the hour buckets from ``until_ms`` back to ``since_ms``, newest first, until
        ``limit`` tasks are found. Listing entries of tasks that moved on to another state
        (or were updated again) are skipped. Buckets older than the row TTL
        (``result_expires_s``) hold nothing and are not read; at most 400 days are read.

        Raises:
            BackendError: Cassandra failed a read.

        """
        session, statements = self._ready()
        now = now_ms()
        if self._ttl_s:
            since_ms = max(since_ms, now - self._ttl_s * 1000 - HOUR_MS)
        until_ms = min(until_ms, now + _MAX_BUCKETS * HOUR_MS)
        since_ms = max(since_ms, until_ms - _MAX_BUCKETS * HOUR_MS)
        found: list[TaskMeta] = []
        if limit <= 0 or since_ms >= until_ms:
            return found
        bucket = (until_ms - 1) - (until_ms - 1) % HOUR_MS
        while bucket >= since_ms - since_ms % HOUR_MS and len(found) < limit:
            shards = [
                self._index_entries(session, statements.select_index,
                                    (queue, state, bucket, shard, since_ms, until_ms), limit)
                for shard in range(LISTING_SHARDS)
            ]
            # each shard is newest first (ties by task id): so is their merge
            merged = heapq.merge(*shards, key=lambda entry: (-entry[1], entry[0]))
            while len(found) < limit:
                batch = list(itertools.islice(merged, max(limit - len(found), 50)))
                if not batch:
                    break
                found.extend(self._current_rows(session, statements, batch, state))
            bucket -= HOUR_MS
        return found[:limit]

    def _index_entries(
        self, session: Any, statement: Any, params: tuple[Any, ...], limit: int
    ) -> Iterator[tuple[str, int]]:
        """Yield one listing partition's (task id, updated ms), page by page, lazily."""
        bound = statement.bind(params)
        bound.fetch_size = min(max(limit, 50), 1000)
        try:
            rows = session.execute(bound)
            while True:
                for row in rows.current_rows:
                    yield row["task_id"], to_ms(row["updated_at"]) or 0
                if not rows.has_more_pages:
                    return
                rows.fetch_next_page()
        except StreamTasksError:
            raise
        except Exception as err:
            raise self._conn.error(err, f"listing queue {params[0]} state {params[1]}") from err

    def _current_rows(
        self, session: Any, statements: _RowStatements, entries: list[tuple[str, int]], state: str
    ) -> list[TaskMeta]:
        """Fetch the task rows of listing entries; keep those still as listed."""
        responses = [
            (task_id, updated, session.execute_async(statements.select_task, (task_id,)))
            for task_id, updated in entries
        ]
        kept = []
        for task_id, updated, response in responses:
            try:
                row = response.result().one()
            except Exception as err:
                raise self._conn.error(err, f"fetching task {task_id}") from err
            if row is None or row["state"] != state or to_ms(row["updated_at"]) != updated:
                continue
            kept.append(self.to_meta(row))
        return kept

    def to_meta(self, row: dict[str, Any]) -> TaskMeta:
        """Return the TaskMeta of a ``tasks`` row (a result that cannot be decoded: None)."""
        result: Any = None
        blob = row["result_value"]
        if blob is not None:
            try:
                result = self._codec.decode_value(bytes(blob))
            except Exception as err:
                log.warning(
                    "task %s: stored result cannot be decoded (%s); returning None",
                    row["task_id"], err,
                )
        return TaskMeta(
            task_id=row["task_id"],
            state=row["state"] or "",
            name=row["name"] or "",
            queue=row["queue"] or "",
            result=result,
            error_type=row["error_type"],
            error_message=row["error_message"],
            traceback=row["traceback"],
            attempts=row["attempts"] or 0,
            worker=row["worker"],
            created_ms=to_ms(row["created_at"]),
            started_ms=to_ms(row["started_at"]),
            finished_ms=to_ms(row["finished_at"]),
            parent_id=row["parent_id"],
            root_id=row["root_id"],
            group_id=row["group_id"],
            group_index=row["group_index"],
            extra=dict(row["extra"] or {}),
        )
