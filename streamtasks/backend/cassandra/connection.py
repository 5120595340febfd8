"""The connection of the Cassandra backend: URL options, cluster, TLS, prepared statements.

URL: ``cassandra://h1:9042[,h2:9042]/keyspace?option=value&...`` with options

- ``username``, ``password``: plain-text authentication (never logged);
- ``ssl=true``, ``ssl_ca``, ``ssl_cert``, ``ssl_key``, ``ssl_check_hostname=false``: TLS;
- ``local_dc``: the data center whose nodes are queried first (and the one the keyspace
  ``migrate`` creates is replicated in, with NetworkTopologyStrategy);
- ``replication_factor``: replicas of the keyspace ``migrate`` creates (default ``auto``:
  ``min(3, nodes)`` of the nodes the driver sees, in ``local_dc`` when given; so 3 on a
  production cluster, 1 on a single node);
- ``consistency``: overrides ``Settings.consistency`` (default ``LOCAL_QUORUM``);
- ``serial_consistency``: of the chord claims' Paxos phase, ``SERIAL`` or ``LOCAL_SERIAL``
  (default ``LOCAL_SERIAL`` when ``consistency`` is a ``LOCAL_`` level, else ``SERIAL``);
- ``connect_timeout``, ``request_timeout``: seconds (default 5 and 10);
- ``protocol_version``: native protocol version (default 4, which every supported
  Cassandra speaks; 5 adds checksummed frames, which the Python driver computes in
  Python: about 20% more client CPU per write, measured in ``docs/decisions.md``);
- ``writer``: what writes task rows and listing entries: ``acsylla`` (the DataStax C/C++
  driver, :mod:`.fastwrite`; the default wherever acsylla is installed, which the package
  does on Linux x86_64 and macOS) or ``cassandra-driver`` (the default where acsylla is
  missing, and the choice to make to keep one driver for everything).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from streamtasks.backend.cassandra.consistency import (
    check_read_write_consistency,
    check_serial_consistency,
    consistency_level,
    default_serial_consistency,
)
from streamtasks.backend.cassandra.errors import backend_error
from streamtasks.errors import BackendError, ConfigError
from streamtasks.replicas import AUTO, auto_replicas
from streamtasks.settings import Settings, parse_url

log = logging.getLogger(__name__)

_KEYSPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_KNOWN_OPTIONS = frozenset({
    "username", "password", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "ssl_check_hostname",
    "local_dc", "replication_factor", "consistency", "serial_consistency",
    "connect_timeout", "request_timeout", "protocol_version", "writer",
})
#: Values of the ``writer`` option.
WRITERS = ("acsylla", "cassandra-driver")


@dataclass(frozen=True, slots=True)
class CassandraOptions:
    """A parsed ``cassandra://`` URL (see the module docstring for the options)."""

    hosts: tuple[tuple[str, int], ...]
    keyspace: str
    consistency: str = "LOCAL_QUORUM"
    serial_consistency: str = "LOCAL_SERIAL"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_ca: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ssl_check_hostname: bool = True
    local_dc: str | None = None
    #: 0: automatic (:meth:`replication`).
    replication_factor: int = AUTO
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 10.0
    protocol_version: int = 4
    #: ``acsylla`` or ``cassandra-driver`` (the URL's, else :func:`default_writer`).
    writer: str = "cassandra-driver"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> CassandraOptions:
        """Parse ``url``; ``settings.consistency`` applies unless the URL names one.

        Raises:
            ConfigError: a malformed URL, keyspace or option (the password is never
                shown), or a consistency that reads and writes or claims cannot use.

        """
        parsed = parse_url(url, "backend")
        if parsed.scheme != "cassandra":
            raise ConfigError(f"not a cassandra:// backend URL (scheme {parsed.scheme!r})")
        opts = dict(parsed.options)
        keyspace = parsed.path
        if not _KEYSPACE_RE.match(keyspace):
            raise ConfigError(
                f"backend URL: keyspace {keyspace!r} must be 1-48 letters, digits or _ "
                "starting with a letter (cassandra://host:9042/keyspace)"
            )
        unknown = sorted(set(opts) - _KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(
                f"backend URL: unknown option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(_KNOWN_OPTIONS))}"
            )
        consistency = opts.get("consistency", settings.consistency).upper()
        consistency_level(consistency)  # validates
        check_read_write_consistency(consistency)
        serial = opts.get("serial_consistency", default_serial_consistency(consistency)).upper()
        consistency_level(serial)  # validates
        check_serial_consistency(serial)
        writer = _writer(opts)
        return cls(
            hosts=parsed.hosts,
            keyspace=keyspace,
            consistency=consistency,
            serial_consistency=serial,
            username=opts.get("username"),
            password=opts.get("password") or (
                settings.backend_password.get_secret_value()
                if settings.backend_password is not None else None
            ),
            ssl=_flag(opts, "ssl", False),
            ssl_ca=opts.get("ssl_ca"),
            ssl_cert=opts.get("ssl_cert"),
            ssl_key=opts.get("ssl_key"),
            ssl_check_hostname=_flag(opts, "ssl_check_hostname", True),
            local_dc=opts.get("local_dc"),
            replication_factor=_replication_factor(opts),
            connect_timeout_s=_number(opts, "connect_timeout", 5.0, float),
            request_timeout_s=_number(opts, "request_timeout", 10.0, float),
            protocol_version=_number(opts, "protocol_version", 4, int),
            writer=writer,
        )

    @property
    def hosts_text(self) -> str:
        """Return the hosts as ``h1:9042,h2:9042``."""
        return ",".join(f"{host}:{port}" for host, port in self.hosts)

    def replication(self, nodes: int) -> str:
        """Return the CQL replication map of the keyspace ``migrate`` creates.

        Args:
            nodes: the nodes the driver sees (in ``local_dc`` when given); an automatic
                ``replication_factor`` is ``min(3, nodes)`` of them.
        """
        count = self.replication_factor or auto_replicas(nodes)
        if self.local_dc:
            return f"{{'class': 'NetworkTopologyStrategy', '{self.local_dc}': {count}}}"
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {count}}}"


def default_writer() -> str:
    """Return ``acsylla`` when it can be imported, else ``cassandra-driver``."""
    from streamtasks.backend.cassandra.fastwrite import acsylla_installed

    return "acsylla" if acsylla_installed() else "cassandra-driver"


def _writer(opts: dict[str, str]) -> str:
    """Return the ``writer`` option's value, or the default (see :func:`default_writer`).

    Raises:
        ConfigError: an unknown writer, or ``acsylla`` asked for but not installed.
    """
    if "writer" not in opts:
        return default_writer()
    writer = opts["writer"].strip().lower()
    if writer not in WRITERS:
        raise ConfigError(f"backend URL: writer {writer!r} is not one of {', '.join(WRITERS)}")
    if writer == "acsylla":
        from streamtasks.backend.cassandra.fastwrite import require_acsylla

        require_acsylla()
    return writer


def _flag(opts: dict[str, str], name: str, default: bool) -> bool:
    raw = opts.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"backend URL: option {name} must be true or false, got {raw!r}")


def _replication_factor(opts: dict[str, str]) -> int:
    raw = opts.get("replication_factor", "auto").strip().lower()
    if raw == "auto":
        return AUTO
    if not raw.isdigit() or int(raw) == 0:
        raise ConfigError(f"backend URL: option replication_factor must be a positive "
                          f"number or auto, got {opts['replication_factor']!r}")
    return int(raw)


_N = TypeVar("_N", int, float)
_S = TypeVar("_S")
_R = TypeVar("_R")


def _number(opts: dict[str, str], name: str, default: _N, kind: Callable[[str], _N]) -> _N:
    raw = opts.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"backend URL: option {name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"backend URL: option {name} must be positive, got {raw!r}")
    return value


class Connection:
    """One lazily opened driver session, its prepared statements and its pending futures.

    Rows are returned as dicts; every statement runs at the configured consistency.
    Closing waits for the pending futures, then shuts the cluster down; a closed
    connection refuses every later use with BackendError.
    """

    def __init__(self, options: CassandraOptions) -> None:
        self.options = options
        #: The keyspace, quoted for CQL text.
        self.ks = f'"{options.keyspace}"'
        self.consistency = consistency_level(options.consistency)
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._session: Any = None
        self._prepared: dict[str, Any] = {}
        self._pending: set[Future[Any]] = set()
        self._pending_lock = threading.Lock()
        self._closed = False

    def error(self, err: BaseException, action: str) -> BackendError:
        """Return a BackendError naming the hosts and what to check (see :mod:`.errors`)."""
        return backend_error(err, action, self.options)

    def session(self) -> Any:
        """Return the driver session, connecting once.

        Raises:
            BackendError: Cassandra is not reachable, or the connection is closed.

        """
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._closed:
                raise BackendError(f"{self._name()} is closed")
            if self._session is None:
                cluster = self._make_cluster()
                try:
                    with _held_driver_records() as held:
                        self._session = cluster.connect()
                except Exception as err:
                    cluster.shutdown()
                    raise self.error(err, "connecting") from err
                held.release()
                self._cluster = cluster
                log.info(
                    "connected to Cassandra at %s (keyspace %s, consistency %s)",
                    self.options.hosts_text, self.options.keyspace, self.options.consistency,
                )
            return self._session

    def nodes(self, data_center: str | None = None) -> int:
        """Return the nodes of the cluster the driver sees, up or down (in ``data_center``).

        Raises:
            BackendError: Cassandra is not reachable.
        """
        hosts = self.session().cluster.metadata.all_hosts()
        return sum(1 for h in hosts if data_center is None or h.datacenter == data_center)

    def _name(self) -> str:
        opts = self.options
        return (
            f"CassandraBackend(hosts={opts.hosts_text!r}, keyspace={opts.keyspace!r}, "
            f"consistency={opts.consistency!r})"
        )

    def _make_cluster(self) -> Any:
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import (
            DCAwareRoundRobinPolicy,
            ExponentialReconnectionPolicy,
            TokenAwarePolicy,
        )
        from cassandra.query import dict_factory

        from streamtasks.backend.cassandra.retry import UpsertRetryPolicy

        opts = self.options
        profile = ExecutionProfile(
            # replicas of a row's token first: a node down is routed around
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=opts.local_dc)),
            retry_policy=UpsertRetryPolicy(),
            consistency_level=self.consistency,
            request_timeout=opts.request_timeout_s,
            row_factory=dict_factory,
        )
        kwargs: dict[str, Any] = {
            "contact_points": list(opts.hosts),
            "port": opts.hosts[0][1],
            "execution_profiles": {EXEC_PROFILE_DEFAULT: profile},
            "connect_timeout": opts.connect_timeout_s,
            "control_connection_timeout": opts.connect_timeout_s,
            "protocol_version": opts.protocol_version,
            # the driver's default backs off to 10 minutes; a worker should see a node
            # that came back within seconds
            "reconnection_policy": ExponentialReconnectionPolicy(0.5, 10.0),
        }
        if opts.username is not None:
            kwargs["auth_provider"] = PlainTextAuthProvider(
                username=opts.username, password=opts.password or ""
            )
        if opts.ssl or opts.ssl_ca or opts.ssl_cert:
            kwargs["ssl_context"] = self._ssl_context()
        try:
            return Cluster(**kwargs)
        except Exception as err:  # e.g. UnresolvableContactPoints
            raise self.error(err, "connecting") from err

    def _ssl_context(self) -> ssl.SSLContext:
        opts = self.options
        context = ssl.create_default_context(cafile=opts.ssl_ca)
        context.check_hostname = opts.ssl_check_hostname
        if not opts.ssl_check_hostname:
            context.verify_mode = ssl.CERT_NONE if not opts.ssl_ca else ssl.CERT_REQUIRED
        if opts.ssl_cert:
            context.load_cert_chain(opts.ssl_cert, opts.ssl_key)
        return context

    # ---------------------------------------------------------------- statements

    def prepared(self, name: str, prepare: Callable[[Connection], _S]) -> tuple[Any, _S]:
        """Return the session and the statements ``prepare`` makes, prepared once per name.

        ``prepare`` runs at most once until :meth:`forget_prepared` (under a lock, after
        the session is connected).
        """
        statements = self._prepared.get(name)
        if statements is not None:
            return self._session, cast(_S, statements)
        session = self.session()
        with self._lock:
            statements = self._prepared.get(name)
            if statements is None:
                statements = prepare(self)
                self._prepared[name] = statements
            return session, cast(_S, statements)

    def forget_prepared(self) -> None:
        """Drop every prepared statement (the tables changed): the next use prepares again."""
        with self._lock:
            self._prepared.clear()

    def prepare_all(self, texts: dict[str, str]) -> dict[str, Any]:
        """Prepare every statement of ``texts`` (by name) at the configured consistency.

        Every statement but a lightweight transaction (``IF ...``) is marked idempotent:
        the backend writes only upserts of fixed values, which may be sent again after a
        timeout (:class:`~.retry.UpsertRetryPolicy`).

        Raises:
            BackendError: Cassandra refused one (e.g. a table is missing).

        """
        session = self.session()
        prepared = {}
        for name, text in texts.items():
            try:
                statement = session.prepare(text)
            except Exception as err:
                raise self.error(err, "preparing statements") from err
            statement.consistency_level = self.consistency
            statement.is_idempotent = " IF " not in text
            prepared[name] = statement
        return prepared

    def run(self, cql: str, action: str, params: tuple[Any, ...] = ()) -> Any:
        """Run unprepared CQL (``%s`` placeholders) at the configured consistency.

        Raises:
            BackendError: naming ``action``.

        """
        from cassandra.query import SimpleStatement

        session = self.session()
        try:
            return session.execute(
                SimpleStatement(cql, consistency_level=self.consistency), params or None
            )
        except Exception as err:
            raise self.error(err, action) from err

    def read_one(
        self, session: Any, statement: Any, params: tuple[Any, ...], action: str
    ) -> dict[str, Any] | None:
        """Run a single-row read; BackendError naming ``action`` when it fails."""
        try:
            row: dict[str, Any] | None = session.execute(statement, params).one()
        except Exception as err:
            raise self.error(err, action) from err
        return row

    # ---------------------------------------------------------------- pending, close

    def begin(self, future: Future[Any], ready: Callable[[], _R]) -> _R | None:
        """Start an asynchronous call answered on ``future``: its session and statements.

        Returns None, with ``future`` failed, when Cassandra cannot be reached (``ready``
        raised BackendError); else ``ready()``'s value, and ``future`` is tracked (see
        :meth:`track`).
        """
        try:
            value = ready()
        except BackendError as err:
            future.set_exception(err)
            return None
        self.track(future)
        return value

    def track(self, future: Future[Any]) -> None:
        """Keep ``future`` until it is done, so that :meth:`close` waits for it."""
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: Future[Any]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for pending futures (up to ``timeout_s``, default the request timeout).

        Then shut the cluster connection down. Later uses raise BackendError.
        """
        with self._pending_lock:
            pending = list(self._pending)
        if pending:
            wait_s = self.options.request_timeout_s if timeout_s is None else timeout_s
            concurrent.futures.wait(pending, timeout=wait_s)
        with self._lock:
            self._closed = True
            cluster, self._cluster, self._session = self._cluster, None, None
            self._prepared.clear()
        if cluster is not None:
            cluster.shutdown()


class _HeldRecords(logging.Filter):
    """Holds the driver's records logged by one thread while it connects.

    A failed first connect is reported by the BackendError raised, naming the hosts
    and the cause in one line; the driver logs the same failure twice more, each time
    with a traceback. Held records are dropped when the connect fails and passed on
    (:meth:`release`) when it succeeds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(self._local, "held", None)
        if held is None:
            return True
        held.append(record)
        return False

    def hold(self) -> list[logging.LogRecord]:
        held: list[logging.LogRecord] = []
        self._local.held = held
        return held

    def stop(self) -> None:
        self._local.held = None


class _Held:
    def __init__(self, records: list[logging.LogRecord]) -> None:
        self.records = records

    def release(self) -> None:
        """Log the held records after all (the connect succeeded).

        They passed the logger's other filters already (the hold is the last one):
        only the handlers are left.
        """
        driver = logging.getLogger(_DRIVER_LOGGER)
        for record in self.records:
            driver.callHandlers(record)


_DRIVER_LOGGER = "cassandra.cluster"
_HOLD = _HeldRecords()


@contextlib.contextmanager
def _held_driver_records() -> Iterator[_Held]:
    driver = logging.getLogger(_DRIVER_LOGGER)
    if driver.filters[-1:] != [_HOLD]:  # last: what the others drop is not held
        driver.removeFilter(_HOLD)
        driver.addFilter(_HOLD)
    held = _Held(_HOLD.hold())
    try:
        yield held
    finally:
        _HOLD.stop()
