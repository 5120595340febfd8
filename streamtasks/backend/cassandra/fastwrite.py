"""The row writer on acsylla (the DataStax C/C++ driver), the default where installed.

Only the hot writes of :meth:`TaskRows.store_many` go through it — the task rows as
concurrent single-row INSERTs and the listing entries as single-partition UNLOGGED
BATCHes, the same statements, TTL, timestamps and consistency as the cassandra-driver
path; every other statement (reads, chord claims, migrations) stays on cassandra-driver.
acsylla is asyncio only: :class:`AcsyllaWriter` owns one event loop in a daemon thread
and is handed a whole batch at a time (one ``call_soon_threadsafe`` per batch); the
batch's ``concurrent.futures.Future`` resolves when every write of it was acknowledged.
A worker instead runs that loop on its own thread (:meth:`AcsyllaWriter.own`, then
:meth:`AcsyllaWriter.pump` every turn): no second Python thread then takes the GIL for
each acknowledgement (docs/decisions.md, "The worker runs the row writer's loop").

Errors become the cassandra-driver exception of the same meaning (a write timeout,
unavailable replicas, an invalid request, no host) and then the project's
:class:`~streamtasks.errors.BackendError` through :func:`.errors.backend_error`, with that
exception as its cause: the messages and :func:`streamtasks.worker.effects.is_transient`
treat both writers alike. A write that timed out on the server is sent once more, as
:class:`.retry.UpsertRetryPolicy` does (every write here is an idempotent upsert).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamtasks.backend.cassandra.errors import backend_error
from streamtasks.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from streamtasks.backend.cassandra.connection import CassandraOptions

log = logging.getLogger("streamtasks.backend.acsylla")

#: The C/C++ driver's levels (as acsylla names them) and the level its lines are logged at.
_LEVELS = {"CRITICAL": logging.ERROR, "ERROR": logging.ERROR, "WARN": logging.WARNING}
#: Lines the C/C++ driver logs as errors that are not: it looks for ScyllaDB's shards on
#: every connection and says so, once per connection, when the node is Cassandra.
_BENIGN = ("Could not retrieve sharding info",)

#: Positions of timestamp columns in a task row's parameters and a listing entry's.
_TASK_TIMES = (11, 12, 13, 14)
_INDEX_TIMES = (2, 4)
#: acsylla's error types (by name) and the cassandra-driver exception of the same meaning.
_SERVER_TIMEOUT = "CassErrorServerWriteTimeout"


def acsylla_installed() -> bool:
    """Return True when acsylla can be imported (the default writer then, see the URL)."""
    try:
        import acsylla  # noqa: F401
    except ImportError:
        return False
    return True


def driver_log(message: Any) -> None:
    """Log one line of the C/C++ driver (an ``acsylla.LogMessage``) through ``logging``.

    Its errors and warnings keep their level, except the benign lines of ``_BENIGN``
    (debug); anything quieter is debug.
    """
    text = str(getattr(message, "message", message)).strip()
    level = _LEVELS.get(str(getattr(message, "log_level", "")).upper(), logging.DEBUG)
    if text.startswith(_BENIGN):
        level = logging.DEBUG
    log.log(level, "cassandra C/C++ driver: %s", text)


def require_acsylla() -> None:
    """Raise ConfigError when ``writer=acsylla`` is asked for but acsylla is missing."""
    try:
        import acsylla  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "backend URL option writer=acsylla needs the acsylla package, which is not "
            "installed: pip install 'streamtasks[fast]' (or 'acsylla>=1.2,<2'), or drop the "
            "option to write with cassandra-driver"
        ) from err


def _seconds(params: Sequence[Any], positions: tuple[int, ...]) -> list[Any]:
    """Return ``params`` with the epoch-ms values at ``positions`` as epoch seconds.

    acsylla binds a number given for a timestamp column as seconds (with a fraction) and
    truncates ``seconds * 1000`` to an integer: ``ms / 1000 * 1000`` falls just short of
    ``ms`` for some values (before 2004-11, from 2038-01-19 on), stored 1 ms early. Half a
    millisecond away from zero keeps the truncation on ``ms``.
    """
    values = list(params)
    for i in positions:
        ms = values[i]
        if ms is not None:
            values[i] = (ms + (0.5 if ms >= 0 else -0.5)) / 1000
    return values


def driver_error(err: BaseException) -> Any:
    """Return the cassandra-driver exception meaning what acsylla's ``err`` means."""
    import cassandra
    from cassandra.cluster import NoHostAvailable

    kind = type(err).__name__
    text = str(err) or kind
    if kind == _SERVER_TIMEOUT or kind == "CassErrorServerWriteFailure":
        from cassandra.policies import WriteType

        return cassandra.WriteTimeout(text, write_type=WriteType.SIMPLE)
    if kind == "CassErrorServerReadTimeout":
        return cassandra.ReadTimeout(text)
    if kind in ("CassErrorServerUnavailable", "CassErrorServerOverloaded",
                "CassErrorServerIsBootstrapping"):
        return cassandra.Unavailable(text)
    if kind == "CassErrorLibRequestTimedOut":
        return cassandra.OperationTimedOut(text)
    if kind in ("CassErrorLibNoHostsAvailable", "CassErrorLibUnableToConnect",
                "CassErrorLibHostResolution", "CassExceptionConnectionError"):
        return NoHostAvailable(text, {})
    if kind in ("CassErrorServerBadCredentials",):
        return NoHostAvailable(text, {"auth": cassandra.AuthenticationFailed(text)})
    if kind in ("CassErrorServerInvalidQuery", "CassExceptionInvalidQuery",
                "CassErrorServerSyntaxError", "CassExceptionSyntaxError",
                "CassErrorServerConfigError", "CassErrorLibUnableToSetKeyspace"):
        return cassandra.InvalidRequest(text)
    if kind == "CassErrorServerUnauthorized":
        return cassandra.Unauthorized(text)
    return err


def as_backend_error(err: BaseException, action: str, opts: CassandraOptions) -> BackendError:
    """Return the BackendError the cassandra-driver path gives for the same failure."""
    if isinstance(err, BackendError):
        return err
    cause = driver_error(err)
    error = backend_error(cause, action, opts)
    error.__cause__ = cause
    if cause is not err:
        cause.__cause__ = err
    return error


class _PumpSelector(selectors.DefaultSelector):
    """The selector of a loop run by its owner's pumps: one pump may wait for I/O.

    A pump runs one turn of the loop at a time, with ``loop.stop`` already scheduled,
    so the loop asks the selector not to wait; :attr:`wait_s`, set for one turn, makes
    that turn wait up to so long for an acknowledgement (or a batch handed over).
    """

    wait_s = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        wait, self.wait_s = self.wait_s, 0.0
        if wait > 0 and timeout is not None and timeout < wait:
            timeout = wait
        return super().select(timeout)


@dataclass(slots=True, eq=False)
class _Job:
    """One batch handed to the loop thread: rows, listing batches, what, the callback."""

    rows: Sequence[Sequence[Any]]
    batches: Sequence[Sequence[Sequence[Any]]]
    what: str
    done: Callable[[BaseException | None], None]


class AcsyllaWriter:
    """Writes task rows and listing entries with acsylla on a loop thread of its own.

    Every batch handed to :meth:`write` ends exactly once (its ``done`` is called):
    acknowledged, failed, or failed because the writer closed or its thread stopped.
    One acsylla cluster per writer, one session once connected; a connect that fails
    fails every batch waiting for it, and the next batch tries again.

    Args:
        options: the backend URL's hosts, keyspace, consistency, timeouts, TLS and auth.
        insert_task: CQL of a task row's INSERT (the cassandra-driver path's text).
        insert_index: CQL of a listing entry's INSERT.
    """

    def __init__(self, options: CassandraOptions, insert_task: str, insert_index: str) -> None:
        require_acsylla()
        self.options = options
        self._cql = (insert_task, insert_index)
        #: Guards the loop's start and stop, the hand-over of batches and their ending.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._unended: set[_Job] = set()
        # loop side
        self._cluster: Any = None
        self._session: Any = None
        self._ready: tuple[Any, Any, Any] | None = None  # session, task, index statements
        #: The connect under way, shared by every batch that arrives meanwhile.
        self._opening: asyncio.Future[tuple[Any, Any, Any]] | None = None
        #: Connects under way with the batches waiting on them.
        self._tasks: set[asyncio.Future[None]] = set()
        #: Batches on the loop not ended yet; ``_drained`` is set when none is left.
        self._flights: set[_Flight] = set()
        self._drained: asyncio.Future[None] | None = None
        #: The thread that runs the loop by pumping it (:meth:`own`), else None.
        self._owner: int | None = None
        self._selector: _PumpSelector | None = None

    # ------------------------------------------------------------------ owned loop

    def own(self) -> bool:
        """Run the loop on the calling thread from now on, by :meth:`pump`; True if so.

        False when the loop already runs on its own thread (a batch was written) or the
        writer is closed: nothing changes then. The owner must pump often (a worker
        does every turn): acknowledgements, and batches other threads hand over, wait
        for its next pump. It also closes the writer, or it is closed where no pump runs.
        """
        with self._lock:
            if self._closed or self._loop is not None:
                return False
            selector = _PumpSelector()
            self._loop = asyncio.SelectorEventLoop(selector)
            self._selector, self._owner = selector, threading.get_ident()
        return True

    def release(self) -> None:
        """The owner stops pumping: the loop runs on a thread of its own again.

        Does nothing on a thread that does not own the loop.
        """
        with self._lock:
            if not self.owned_here():
                return
            self._owner = None
            loop = self._loop
            if self._closed or loop is None or loop.is_closed():
                return
            thread = threading.Thread(target=self._run, args=(loop,), daemon=True,
                                      name="streamtasks-acsylla")
            self._thread = thread
            thread.start()

    def owned_here(self) -> bool:
        """Return True on the thread that owns the loop (:meth:`own`)."""
        return self._owner is not None and self._owner == threading.get_ident()

    def pump(self, timeout_s: float = 0.0) -> None:
        """Start the batches handed over and end those acknowledged (the owner only).

        Waits up to ``timeout_s`` for an acknowledgement first when ``timeout_s`` > 0.
        Does nothing on another thread, inside a pump, or once the writer is closed.
        """
        loop, selector = self._loop, self._selector
        if (loop is None or selector is None or self._closed or not self.owned_here()
                or loop.is_running()):
            return
        _turn(loop)  # batches handed over since the last pump start; acks already in
        if timeout_s > 0:
            selector.wait_s = timeout_s
            _turn(loop)
        _turn(loop)  # what the acknowledgements resolved: their writes settle

    def _close_owned(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        """Close an owned loop: here when no pump runs it, else by the owner's pumps."""
        if loop.is_running():  # closed from another thread while the owner pumps
            shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(timeout_s), loop)
            try:
                shutdown.result(2 * timeout_s + 1)
            except Exception as err:  # its batches end below all the same
                log.warning("the acsylla row writer did not close in time (%s: %s)",
                            type(err).__name__, err)
            return
        try:
            loop.run_until_complete(self._shutdown(timeout_s))
        except Exception as err:  # closing is best effort; its batches end below
            log.warning("closing the acsylla row writer failed (%s: %s)",
                        type(err).__name__, err)
        finally:
            loop.close()

    # ------------------------------------------------------------------ thread side

    def write(
        self,
        rows: Sequence[Sequence[Any]],
        batches: Sequence[Sequence[Sequence[Any]]],
        what: str,
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Start writing ``rows`` (task params) and ``batches`` (listing entries).

        ``done`` is called once, on the writer's loop thread (or the thread closing the
        writer), with None when every write was acknowledged, else with the first error
        (a BackendError naming ``what``).

        Raises:
            BackendError: the writer is closed (``done`` is not called).
        """
        job = _Job(rows, batches, what, done)
        with self._lock:
            # Handed over under the lock that close() takes to mark the writer closed:
            # every batch handed over is on the loop's queue before close's shutdown.
            if self._closed:
                raise BackendError("the acsylla row writer is closed")
            loop = self._running_loop()
            self._unended.add(job)
            if self.owned_here():
                loop.call_soon(self._start, job)  # started by this thread's next pump
            else:
                loop.call_soon_threadsafe(self._start, job)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """Return the loop, starting its thread first if need be (called under the lock)."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=self._run, args=(loop,), daemon=True,
                                      name="streamtasks-acsylla")
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the loop; should it die (a callback raised SystemExit), end its batches.

        They end failed (transient); the next batch starts a fresh loop and session.
        """
        try:
            loop.run_forever()
        except BaseException as err:  # the thread ends here: said and handled below
            with self._lock:
                self._loop = self._thread = None
                self._cluster = self._session = self._ready = self._opening = None
                self._tasks, self._flights, self._drained = set(), set(), None
                jobs = list(self._unended)  # all were on this loop
            loop.close()
            log.error("the acsylla row writer's loop stopped (%s: %s); %d batches fail, the "
                      "next one restarts it", type(err).__name__, err, len(jobs))
            for job in jobs:
                self._end(job, self._unacknowledged(job.what, "its loop stopped"))

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the writer: pending writes are waited for up to ``timeout_s``.

        Batches still not acknowledged then end with a (transient) BackendError; the
        session is closed, the cluster freed and the loop thread stopped. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is not None and self._owner is not None:
            self._close_owned(loop, timeout_s)
        elif loop is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop died meanwhile (see _run)
                self._stop(loop, thread, timeout_s)
        self._end_all("the acsylla row writer closed")

    def _stop(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
              timeout_s: float) -> None:
        shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(timeout_s), loop)
        try:
            shutdown.result(2 * timeout_s + 1)
        except Exception as err:  # the loop is stuck: stop it all the same
            log.warning("the acsylla row writer did not close in time (%s: %s)",
                        type(err).__name__, err)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()

    def _end_all(self, why: str) -> None:
        """End every batch not ended yet with a BackendError saying ``why``."""
        with self._lock:
            jobs = list(self._unended)
        for job in jobs:
            self._end(job, self._unacknowledged(job.what, why))

    def _end(self, job: _Job, failed: BaseException | None) -> None:
        """Call the batch's ``done`` (once: later calls do nothing)."""
        with self._lock:
            if job not in self._unended:
                return
            self._unended.discard(job)
        error = None if failed is None else self._error(failed, job.what)
        try:
            job.done(error)
        except Exception:
            log.exception("the callback of a written batch failed (%s)", job.what)

    def _error(self, failed: BaseException, what: str) -> BackendError:
        """Return the BackendError of ``failed``; one naming its type if that fails."""
        try:
            return as_backend_error(failed, what, self.options)
        except Exception:  # its text cannot be read: the batch still ends
            opts = self.options
            error = BackendError(f"Cassandra at {opts.hosts_text} (keyspace {opts.keyspace}): "
                                 f"{what} failed: {type(failed).__name__}")
            error.__cause__ = failed
            return error

    def _unacknowledged(self, what: str, why: str) -> BackendError:
        opts = self.options
        return BackendError(
            f"Cassandra at {opts.hosts_text} (keyspace {opts.keyspace}): {what} was not "
            f"acknowledged: {why} (the rows may or may not be written; not done yet)")

    # ------------------------------------------------------------------ loop side

    def _start(self, job: _Job) -> None:
        flight = _Flight(self, job)
        self._flights.add(flight)
        if self._ready is not None:
            self._begin(flight, self._ready)
            return
        task = asyncio.ensure_future(self._connect_and_send(flight))
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _connect_and_send(self, flight: _Flight) -> None:
        try:
            ready = await self._connect()
        except asyncio.CancelledError:  # the writer closed (its batch ended there)
            return
        except Exception as err:  # connecting or preparing failed
            flight.left = 1
            flight.one(err)
            return
        self._begin(flight, ready)

    def _begin(self, flight: _Flight, ready: tuple[Any, Any, Any]) -> None:
        """Start ``flight``'s writes; should that fail midway, its batch still ends."""
        try:
            self._send(flight, *ready)
        except Exception as err:  # a fault of this module (the writes' own errors are caught)
            log.exception("starting the writes of a batch failed (%s)", flight.job.what)
            flight.abandon()
            flight.failed = flight.failed or err
            self._finish(flight)

    def _send(self, flight: _Flight, session: Any, task: Any, index: Any) -> None:
        """Start every write of ``flight``: rows one INSERT each, listing entries batched.

        A single listing entry goes as a plain INSERT, several of one partition as an
        UNLOGGED BATCH (as the cassandra-driver path does).
        """
        job = flight.job
        flight.left = len(job.rows) + len(job.batches)
        if flight.left == 0:
            self._finish(flight)
            return
        execute, execute_batch = session.execute, session.execute_batch
        for params in job.rows:
            try:
                statement = task.bind(_seconds(params, _TASK_TIMES))
                statement.set_is_idempotent(True)
            except Exception as err:  # a value the statement cannot take
                flight.one(err)
                continue
            _Write(flight, execute, statement).step()
        for entries in job.batches:
            try:
                statement, send = self._listing(index, entries, execute, execute_batch)
            except Exception as err:
                flight.one(err)
                continue
            _Write(flight, send, statement).step()

    @staticmethod
    def _listing(index: Any, entries: Sequence[Sequence[Any]], execute: Any,
                 execute_batch: Any) -> tuple[Any, Any]:
        """Return the statement writing ``entries`` (one partition's) and how to send it."""
        if len(entries) == 1:
            statement = index.bind(_seconds(entries[0], _INDEX_TIMES))
            send = execute
        else:
            import acsylla

            statement, send = acsylla.create_batch_unlogged(), execute_batch
            for entry in entries:
                statement.add_statement(index.bind(_seconds(entry, _INDEX_TIMES)))
        statement.set_is_idempotent(True)
        return statement, send

    def _finish(self, flight: _Flight) -> None:
        """End ``flight``'s batch (every write settled, or the writer closing)."""
        flight.writes.clear()  # each refers to its flight: freed now, not by the cyclic GC
        self._flights.discard(flight)
        if not self._flights and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._end(flight.job, flight.failed)

    async def _shutdown(self, timeout_s: float) -> None:
        """Wait for the pending batches, end the rest, close the session, free the cluster."""
        if self._flights:
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained, timeout_s)
        self._end_all("the acsylla row writer closed first")
        for flight in list(self._flights):
            flight.abandon()
        quiet = self._opening is None  # no connect under way that could still call back
        if self._session is not None:
            try:
                await asyncio.wait_for(self._session.close(), timeout_s)
            except Exception as err:  # closing is best effort
                quiet = False
                log.warning("closing the acsylla session failed (%s: %s)",
                            type(err).__name__, err)
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # their batches ended above: let them see the cancel
            await asyncio.wait(list(self._tasks), timeout=1.0)
        if self._cluster is not None and quiet:
            self._cluster.destroy()  # its socket pairs: else one pair per cluster leaks

    async def _connect(self) -> tuple[Any, Any, Any]:
        """Return the session and prepared statements, connecting once for all batches."""
        if self._ready is not None:
            return self._ready
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, attempt: asyncio.Future[tuple[Any, Any, Any]]) -> None:
        if self._opening is attempt:
            self._opening = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._ready = attempt.result()

    async def _open(self) -> tuple[Any, Any, Any]:
        """Connect (one cluster for every attempt, kept) and prepare the two INSERTs.

        A session that connected is kept when preparing fails (a missing table): the
        next attempt prepares again on it.
        """
        if self._cluster is None:
            import acsylla

            self._cluster = acsylla.create_cluster([host for host, _ in self.options.hosts],
                                                   **_cluster_options(self.options))
        if self._session is None:
            self._session = await self._cluster.create_session(keyspace=self.options.keyspace)
        task = await self._session.create_prepared(self._cql[0])
        index = await self._session.create_prepared(self._cql[1])
        return self._session, task, index


class _Flight:
    """One batch's writes on the loop thread: how many are unsettled, the first error."""

    __slots__ = ("abandoned", "failed", "job", "left", "writer", "writes")

    def __init__(self, writer: AcsyllaWriter, job: _Job) -> None:
        self.writer, self.job = writer, job
        self.left = 0  # set when its writes start
        self.failed: BaseException | None = None
        self.writes: list[_Write] = []
        self.abandoned = False

    def one(self, error: BaseException | None) -> None:
        """Count one write settled (``error`` None: acknowledged); the last ends the batch."""
        if self.abandoned:
            return
        if error is not None and self.failed is None:
            self.failed = error
        self.left -= 1
        if self.left == 0:
            self.writer._finish(self)

    def abandon(self) -> None:
        """Stop following the writes still unsettled (the writer closes; the batch ended)."""
        self.abandoned = True
        for write in self.writes:
            write.abandon()


class _Write:
    """One statement sent with acsylla, followed without an asyncio Task.

    acsylla's ``execute`` is a coroutine that sends the request at its first step and
    then waits on one asyncio future, resolved from the C/C++ driver's callback. Stepping
    the coroutine here (the first step at once, the next when that future is done) does
    what a Task would, without a Task, its scheduled steps and a gathering future per row:
    one callback per write. A write that timed out on the server is sent once more, the
    same statement (the C/C++ driver's statements can be executed again).
    """

    __slots__ = ("coro", "flight", "resent", "send", "statement")

    def __init__(self, flight: _Flight, send: Callable[[Any], Any], statement: Any) -> None:
        self.flight, self.send, self.statement = flight, send, statement
        self.coro: Any = None
        self.resent = False
        flight.writes.append(self)

    def step(self, _done: object = None) -> None:
        """Run the coroutine to its next wait (or its end, which settles the write)."""
        if self.flight.abandoned:
            return
        error: BaseException | None
        try:
            if self.coro is None:
                self.coro = self.send(self.statement)
            waits_on = self.coro.send(None)
            if waits_on is None:  # a bare yield: step again on the loop's next turn
                asyncio.get_running_loop().call_soon(self.step)
            else:
                waits_on.add_done_callback(self.step)
            return
        except StopIteration:
            error = None
        except (Exception, asyncio.CancelledError) as err:  # its future was cancelled: failed
            if type(err).__name__ == _SERVER_TIMEOUT and not self.resent:
                self.resent, self.coro = True, None
                self.step()
                return
            error = err
        self.flight.one(error)

    def abandon(self) -> None:
        """Close the coroutine if it still waits (its ``finally`` frees the request)."""
        coro, self.coro = self.coro, None
        if coro is not None:
            with contextlib.suppress(Exception):
                coro.close()


def _turn(loop: asyncio.AbstractEventLoop) -> None:
    """Run one turn of ``loop``: its I/O, then the callbacks ready when the turn began."""
    loop.call_soon(loop.stop)
    loop.run_forever()


def _cluster_options(opts: CassandraOptions) -> dict[str, Any]:
    """Return ``acsylla.create_cluster``'s keyword arguments for the backend URL."""
    import acsylla

    kwargs: dict[str, Any] = {
        "port": opts.hosts[0][1],
        "protocol_version": opts.protocol_version,
        "consistency": getattr(acsylla.Consistency, opts.consistency),
        "connect_timeout": opts.connect_timeout_s,
        "request_timeout": opts.request_timeout_s,
        "log_level": "warn",
        "logging_callback": driver_log,
        "exponential_reconnect_base_delay_ms": 500,
        "exponential_reconnect_max_delay_ms": 10_000,
    }
    if opts.local_dc:
        kwargs["load_balance_dc_aware"] = opts.local_dc
    if opts.username is not None:
        kwargs["username"], kwargs["password"] = opts.username, opts.password or ""
    if opts.ssl or opts.ssl_ca or opts.ssl_cert:
        kwargs["ssl_enabled"] = True
        kwargs["ssl_trusted_cert"] = _read(opts.ssl_ca)
        kwargs["ssl_cert"] = _read(opts.ssl_cert)
        kwargs["ssl_private_key"] = _read(opts.ssl_key)
        kwargs["ssl_verify_flags"] = (acsylla.SSLVerifyFlags.PEER_IDENTITY
                                      if opts.ssl_check_hostname
                                      else acsylla.SSLVerifyFlags.PEER_CERT)
    return kwargs


def _read(path: str | None) -> str | None:
    """Return the PEM text at ``path`` (acsylla takes the text, not a path)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as pem:
        return pem.read()
