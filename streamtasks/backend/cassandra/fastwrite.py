"""The row writer on acsylla (the DataStax C/C++ driver), the default where installed.

Only the hot writes of :meth:`TaskRows.store_many` go through it — the task rows as
concurrent single-row INSERTs and the listing entries as single-partition UNLOGGED
BATCHes, the same statements, TTL, timestamps and consistency as the cassandra-driver
path; every other statement (reads, chord claims, migrations) stays on cassandra-driver.
acsylla is asyncio only: :class:`AcsyllaWriter` owns one event loop in a daemon thread
and is handed a whole batch at a time (one ``call_soon_threadsafe`` per batch); the
batch's ``concurrent.futures.Future`` resolves when every write of it was acknowledged.

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
import threading
from collections.abc import Awaitable, Callable, Sequence
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

    acsylla binds a number given for a timestamp column as seconds (with a fraction).
    """
    values = list(params)
    for i in positions:
        if values[i] is not None:
            values[i] = values[i] / 1000
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


@dataclass(frozen=True, slots=True)
class _Job:
    """One batch handed to the loop thread: rows, listing batches, what, the callback."""

    rows: Sequence[Sequence[Any]]
    batches: Sequence[Sequence[Sequence[Any]]]
    what: str
    done: Callable[[BaseException | None], None]


class AcsyllaWriter:
    """Writes task rows and listing entries with acsylla on a loop thread of its own.

    Args:
        options: the backend URL's hosts, keyspace, consistency, timeouts, TLS and auth.
        insert_task: CQL of a task row's INSERT (the cassandra-driver path's text).
        insert_index: CQL of a listing entry's INSERT.
    """

    def __init__(self, options: CassandraOptions, insert_task: str, insert_index: str) -> None:
        require_acsylla()
        self.options = options
        self._cql = (insert_task, insert_index)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: tuple[Any, Any, Any] | None = None  # session, task, index statements
        #: Held while connecting, so batches arriving meanwhile share one session.
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._tasks: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ thread side

    def write(
        self,
        rows: Sequence[Sequence[Any]],
        batches: Sequence[Sequence[Sequence[Any]]],
        what: str,
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Start writing ``rows`` (task params) and ``batches`` (listing entries).

        ``done`` is called once, on the writer's loop thread, with None when every write
        was acknowledged, else with the first error (a BackendError naming ``what``).

        Raises:
            BackendError: the writer is closed.
        """
        loop = self._running_loop()
        loop.call_soon_threadsafe(self._start, _Job(rows, batches, what, done))

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._closed:
                raise BackendError("the acsylla row writer is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, daemon=True,
                                          name="streamtasks-acsylla")
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the session and stop the loop thread (pending writes were waited for)."""
        with self._lock:
            self._closed = True
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        if self._ready is not None:
            closing = asyncio.run_coroutine_threadsafe(self._ready[0].close(), loop)
            with contextlib.suppress(Exception):  # closing is best effort
                closing.result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()

    # ------------------------------------------------------------------ loop side

    def _start(self, job: _Job) -> None:
        task = asyncio.ensure_future(self._write_all(job))
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> tuple[Any, Any, Any]:
        """Return the session and prepared statements, connecting once for all batches."""
        if self._ready is not None:
            return self._ready
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._ready is None:
                self._ready = await self._open()
            return self._ready

    async def _open(self) -> tuple[Any, Any, Any]:
        import acsylla

        opts = self.options
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
        cluster = acsylla.create_cluster([host for host, _ in opts.hosts], **kwargs)
        session = await cluster.create_session(keyspace=opts.keyspace)
        try:
            task = await session.create_prepared(self._cql[0])
            index = await session.create_prepared(self._cql[1])
        except BaseException:
            await session.close()
            raise
        return session, task, index

    async def _write_all(self, job: _Job) -> None:
        try:
            session, task, index = await self._connect()
            writes = [self._row(session, task, row) for row in job.rows]
            writes += [self._batch(session, index, entries) for entries in job.batches]
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
            failed = next((e for e in outcomes if isinstance(e, BaseException)), None)
        except Exception as err:  # connecting or preparing failed
            failed = err
        job.done(None if failed is None else as_backend_error(failed, job.what, self.options))

    async def _row(self, session: Any, prepared: Any, params: Sequence[Any]) -> None:
        values = _seconds(params, _TASK_TIMES)

        def statement() -> Any:
            bound = prepared.bind()
            bound.set_is_idempotent(True)
            bound.bind_list(values)
            return bound

        await _retried(lambda: session.execute(statement()))

    async def _batch(self, session: Any, prepared: Any, entries: Sequence[Sequence[Any]]) -> None:
        import acsylla

        values = [_seconds(entry, _INDEX_TIMES) for entry in entries]

        def batch() -> Any:
            unlogged = acsylla.create_batch_unlogged()
            unlogged.set_is_idempotent(True)
            for entry in values:
                bound = prepared.bind()
                bound.bind_list(entry)
                unlogged.add_statement(bound)
            return unlogged

        await _retried(lambda: session.execute_batch(batch()))


async def _retried(send: Callable[[], Awaitable[Any]]) -> None:
    """Send an idempotent upsert; once more if it timed out on the server (see the module)."""
    try:
        await send()
    except Exception as err:
        if type(err).__name__ != _SERVER_TIMEOUT:
            raise
        await send()


def _read(path: str | None) -> str | None:
    """Return the PEM text at ``path`` (acsylla takes the text, not a path)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as pem:
        return pem.read()
