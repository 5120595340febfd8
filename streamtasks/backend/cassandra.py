"""The Cassandra result backend: a row per task, a time-bucketed listing, CQL migrations.

URL: ``cassandra://h1:9042[,h2:9042]/keyspace?option=value&...`` with options

- ``username``, ``password``: plain-text authentication (never logged);
- ``ssl=true``, ``ssl_ca``, ``ssl_cert``, ``ssl_key``, ``ssl_check_hostname=false``: TLS;
- ``local_dc``: the data center whose nodes are queried first (and, with
  ``replication_factor``, the keyspace is replicated in by ``migrate``);
- ``replication_factor``: replicas of the keyspace ``migrate`` creates (default 1);
- ``consistency``: overrides ``Settings.consistency`` (default ``LOCAL_QUORUM``);
- ``serial_consistency``: of the chord claims' Paxos phase, ``SERIAL`` or ``LOCAL_SERIAL``
  (default ``LOCAL_SERIAL`` when ``consistency`` is a ``LOCAL_`` level, else ``SERIAL``);
- ``connect_timeout``, ``request_timeout``: seconds (default 5 and 10);
- ``protocol_version``: native protocol version (default 5, Cassandra 4.0+; use 4 for 3.x).

Task writes are asynchronous (``execute_async`` of prepared statements) and bounded by
``Settings.backend_max_in_flight``; task reads are synchronous (:meth:`fetch_many` reads
concurrently, a window at a time). Group (chord) operations return futures completed by
chains of statements, each sent from the driver's callback of the one before.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import importlib.resources
import itertools
import logging
import re
import ssl
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Generic, TypeVar

from streamtasks.backend.base import GROUP_SHARD_SIZE, GroupClaim, ResultBackend, TaskMeta
from streamtasks.backend.memory import (
    check_group_member,
    missing_members_message,
    state_time_ms,
    unclaimed_group_message,
)
from streamtasks.codec.base import Codec
from streamtasks.errors import BackendError, ConfigError, DecodeError, StreamTasksError
from streamtasks.fanin import FanIn
from streamtasks.message import now_ms
from streamtasks.settings import Settings, parse_url

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
#: Partitions per (queue, state, hour) of the listing table (part of its format: 003).
LISTING_SHARDS = 16
_EPOCH = datetime(1970, 1, 1)  # the driver returns naive UTC datetimes
_KEYSPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_MIGRATION_RE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.cql$")
_ADD_COLUMN_RE = re.compile(
    r'^ALTER\s+TABLE\s+(?:"?\w+"?\.)?"?(\w+)"?\s+ADD\s+"?(\w+)"?\s+\w+(?:\s*<.*>)?$',
    re.IGNORECASE,
)
_MAX_BUCKETS = 24 * 400  # a listing never scans more hours than this
_DDL_TIMEOUT_S = 60.0
_READ_WINDOW = 256  # concurrent reads of one fetch_many / group_results

_TASK_COLUMNS = (
    "task_id", "name", "queue", "state", "result", "result_value", "error_type",
    "error_message", "traceback", "attempts", "worker", "created_at", "started_at",
    "finished_at", "updated_at", "parent_id", "root_id", "group_id", "group_index", "extra",
)


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned CQL file, ``NNN_name.cql``.

    Attributes:
        version: the number ``NNN``.
        name: the file name without ``.cql`` (e.g. ``001_initial``).
        text: the CQL, with ``{keyspace}`` and ``{replication}`` placeholders.

    """

    version: int
    name: str
    text: str

    def statements(self, keyspace: str, replication: str) -> list[str]:
        """Return the statements with the placeholders filled in."""
        text = self.text.replace("{keyspace}", keyspace).replace("{replication}", replication)
        return split_statements(text)


def schema_dir() -> Traversable:
    """Return the directory of the CQL migrations.

    The packaged copy (``streamtasks/_schemas/cql``) when installed from a wheel, else
    ``schemas/cql`` of the source tree.
    """
    packaged = importlib.resources.files("streamtasks").joinpath("_schemas", "cql")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas" / "cql"


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    """Read every ``NNN_name.cql`` file of ``directory`` (default :func:`schema_dir`).

    Returns:
        The migrations ordered by version.

    Raises:
        ConfigError: the directory is missing, or two files share a version.

    """
    directory = schema_dir() if directory is None else directory
    if not directory.is_dir():
        raise ConfigError(f"CQL migrations directory {directory} not found")
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if not match or not entry.is_file():
            continue
        version = int(match.group(1))
        if version in found:
            raise ConfigError(
                f"two CQL migrations with version {version}: {found[version].name}.cql and "
                f"{entry.name}"
            )
        found[version] = Migration(version, entry.name[: -len(".cql")], entry.read_text())
    return [found[v] for v in sorted(found)]


def added_column(statement: str) -> tuple[str, str] | None:
    """Return ``(table, column)`` of an ``ALTER TABLE [ks.]table ADD column type``, else None.

    The migrator skips such a statement when the column exists (CQL before Cassandra 4.1
    has no ``ADD IF NOT EXISTS``), so that an interrupted migration can be re-run. A
    statement adding several columns at once is not recognised (one column per statement).
    """
    match = _ADD_COLUMN_RE.match(" ".join(statement.split()))
    if match is None:
        return None
    return match.group(1), match.group(2)


def split_statements(text: str) -> list[str]:
    """Split CQL text into statements: whole-line ``--`` / ``//`` comments dropped, split on ``;``.

    A ``;`` inside a string literal is not supported.
    """
    lines = [
        line for line in text.splitlines() if not line.lstrip().startswith(("--", "//"))
    ]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


# --------------------------------------------------------------------------- options


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
    replication_factor: int = 1
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 10.0
    protocol_version: int = 5

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> CassandraOptions:
        """Parse ``url``; ``settings.consistency`` applies unless the URL names one.

        Raises:
            ConfigError: a malformed URL, keyspace or option (the password is never shown).

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
        known = {
            "username", "password", "ssl", "ssl_ca", "ssl_cert", "ssl_key",
            "ssl_check_hostname", "local_dc", "replication_factor", "consistency",
            "serial_consistency",
            "connect_timeout", "request_timeout", "protocol_version",
        }
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ConfigError(
                f"backend URL: unknown option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}"
            )
        consistency = opts.get("consistency", settings.consistency).upper()
        _consistency_level(consistency)  # validates
        if consistency in SERIAL_LEVELS:
            raise ConfigError(
                f"Cassandra consistency {consistency} (setting consistency, or the backend "
                "URL option consistency) is a serial level, which plain reads and writes "
                "cannot use; use LOCAL_QUORUM, and serial_consistency for the claims"
            )
        default_serial = "LOCAL_SERIAL" if consistency.startswith("LOCAL_") else "SERIAL"
        serial = opts.get("serial_consistency", default_serial).upper()
        _consistency_level(serial)  # validates
        check_serial_consistency(serial)
        return cls(
            hosts=parsed.hosts,
            keyspace=keyspace,
            consistency=consistency,
            serial_consistency=serial,
            username=opts.get("username"),
            password=opts.get("password"),
            ssl=_flag(opts, "ssl", False),
            ssl_ca=opts.get("ssl_ca"),
            ssl_cert=opts.get("ssl_cert"),
            ssl_key=opts.get("ssl_key"),
            ssl_check_hostname=_flag(opts, "ssl_check_hostname", True),
            local_dc=opts.get("local_dc"),
            replication_factor=_number(opts, "replication_factor", 1, int),
            connect_timeout_s=_number(opts, "connect_timeout", 5.0, float),
            request_timeout_s=_number(opts, "request_timeout", 10.0, float),
            protocol_version=_number(opts, "protocol_version", 5, int),
        )

    @property
    def hosts_text(self) -> str:
        """Return the hosts as ``h1:9042,h2:9042``."""
        return ",".join(f"{host}:{port}" for host, port in self.hosts)

    def replication(self) -> str:
        """Return the CQL replication map of the keyspace ``migrate`` creates."""
        if self.local_dc:
            return (
                f"{{'class': 'NetworkTopologyStrategy', '{self.local_dc}': "
                f"{self.replication_factor}}}"
            )
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {self.replication_factor}}}"


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


_N = TypeVar("_N", int, float)
_S = TypeVar("_S")


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


#: The consistency levels of a lightweight transaction's Paxos phase.
SERIAL_LEVELS = ("SERIAL", "LOCAL_SERIAL")
#: Levels that count replicas instead of a majority: a read after a write at such a level
#: need not see the write once the keyspace keeps more than one replica.
_COUNTED_LEVELS = ("ONE", "LOCAL_ONE", "ANY", "TWO", "THREE")


def check_serial_consistency(serial: str) -> None:
    """Refuse a serial consistency other than SERIAL or LOCAL_SERIAL.

    Raises:
        ConfigError: naming the backend URL option serial_consistency.

    """
    if serial.upper() not in SERIAL_LEVELS:
        raise ConfigError(
            f"backend URL option serial_consistency={serial}: chord claims need SERIAL or "
            "LOCAL_SERIAL"
        )


def replicas(replication: dict[str, str]) -> dict[str, int]:
    """Return the replicas a keyspace keeps per data center (``system_schema`` form).

    ``replication`` is the keyspace's replication map, e.g. ``{'class':
    '...SimpleStrategy', 'replication_factor': '3'}`` (returned as ``{'*': 3}``) or
    ``{'class': '...NetworkTopologyStrategy', 'dc1': '3', 'dc2': '3'}``. A transient
    factor ``'3/1'`` counts its full replicas (3); data centers without replicas are left out.
    """
    counts: dict[str, int] = {}
    for key, value in replication.items():
        if key == "class":
            continue
        try:
            count = int(str(value).split("/", 1)[0])
        except ValueError:
            continue
        if count > 0:
            counts["*" if key == "replication_factor" else key] = count
    return counts


def check_group_consistency(
    consistency: str, serial_consistency: str, replication: dict[str, str], keyspace: str
) -> list[str]:
    """Refuse consistency levels under which group joins and claims cannot be correct.

    A join writes a member's row and then counts its shard: of members joining at once,
    the last must see every row, which needs reads and writes whose replica sets overlap
    (a QUORUM-class level) once the keyspace keeps more than one replica. A claim is a
    lightweight transaction: its Paxos phase must be SERIAL or LOCAL_SERIAL, and
    LOCAL_SERIAL only decides within one data center.

    Args:
        consistency: the level of reads and writes (``Settings.consistency`` or the URL
            option ``consistency``).
        serial_consistency: the level of the claims' Paxos phase.
        replication: the keyspace's replication map, as in ``system_schema.keyspaces``.
        keyspace: named in the messages.

    Returns:
        Warnings: a configuration that is safe but may leave a chord waiting.

    Raises:
        ConfigError: naming the setting to change.

    """
    level, serial = consistency.upper(), serial_consistency.upper()
    check_serial_consistency(serial)
    counts = replicas(replication)
    total = sum(counts.values())
    if level in _COUNTED_LEVELS and total > 1:
        raise ConfigError(
            f"Cassandra consistency {level} (setting consistency, or the backend URL option "
            f"consistency) cannot make chord joins correct: keyspace {keyspace} keeps "
            f"{total} replicas, so a member's read may miss another's write and the chord "
            "never fires; use LOCAL_QUORUM (or QUORUM)"
        )
    data_centers = len(counts) if "*" not in counts else 1
    warnings: list[str] = []
    if data_centers > 1:
        if serial == "LOCAL_SERIAL":
            raise ConfigError(
                f"backend URL option serial_consistency=LOCAL_SERIAL (the default with a "
                f"LOCAL_ consistency) cannot make chord claims correct: keyspace {keyspace} "
                f"is replicated to {data_centers} data centers ({', '.join(sorted(counts))}) "
                "and workers in two of them could both win a claim; set "
                "serial_consistency=SERIAL"
            )
        if level.startswith("LOCAL_"):
            warnings.append(
                f"Cassandra consistency {level} on keyspace {keyspace} replicated to "
                f"{data_centers} data centers: chord joins are counted within one data "
                "center, so members of one chord must run in one data center (else use "
                "QUORUM)"
            )
    return warnings


def _consistency_level(name: str) -> int:
    from cassandra import ConsistencyLevel

    try:
        return int(ConsistencyLevel.name_to_value[name.upper()])
    except KeyError:
        names = ", ".join(sorted(ConsistencyLevel.name_to_value))
        raise ConfigError(f"unknown Cassandra consistency {name!r}; use one of {names}") from None


# --------------------------------------------------------------------------- backend


@dataclass(slots=True)
class _Statements:
    insert_task: Any
    insert_index: Any
    select_task: Any
    select_index: Any


@dataclass(slots=True)
class _GroupStatements:
    """The statements of migration 002 (prepared on first use of a group operation)."""

    insert_member: Any
    count_members: Any
    insert_shard: Any
    count_shards: Any
    select_members: Any
    claim: Any
    settle: Any
    select_claim: Any


class CassandraBackend(ResultBackend):
    """Task rows in Cassandra.

    Connects lazily on first use. Call :meth:`migrate` once (``streamtasks migrate``)
    to create the keyspace and tables. Group operations raise ConfigError when the
    consistency cannot make them correct on the keyspace (:meth:`check_groups`).

    Args:
        url: ``cassandra://host:9042[,host2]/keyspace[?options]`` (see the module docs).
        settings: ``result_expires_s`` (task row TTL), ``group_expires_s`` (group row
            TTL, at least ``result_expires_s``), ``consistency`` and
            ``backend_max_in_flight`` (concurrent stores) apply.
        codec: encodes results with their exact types (``result_value`` column).
        json_text: renders a result as JSON text (``result`` column, for cqlsh).

    Raises:
        ConfigError: a malformed URL.

    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        codec: Codec,
        json_text: Callable[[Any], str],
    ) -> None:
        self.options = CassandraOptions.from_url(url, settings)
        self._ttl_s = max(int(settings.result_expires_s), 0)
        self._group_ttl_s = group_ttl_s(self._ttl_s, int(settings.group_expires_s))
        self._codec = codec
        self._json_text = json_text
        self._consistency = _consistency_level(self.options.consistency)
        self._slots = threading.BoundedSemaphore(settings.backend_max_in_flight)
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._session: Any = None
        self._statements: _Statements | None = None
        self._group_statements: _GroupStatements | None = None
        self._group_refusal: ConfigError | None = None
        self._pending: set[Future[Any]] = set()
        self._pending_lock = threading.Lock()
        self._closed = False
        self._ks = f'"{self.options.keyspace}"'

    def __repr__(self) -> str:
        return (
            f"CassandraBackend(hosts={self.options.hosts_text!r}, "
            f"keyspace={self.options.keyspace!r}, consistency={self.options.consistency!r})"
        )

    # ---------------------------------------------------------------- connection

    @property
    def keyspace(self) -> str:
        """The keyspace of the task tables."""
        return self.options.keyspace

    @property
    def session(self) -> Any:
        """The driver session (connecting if needed), for operators' and tests' own CQL.

        Queries must name the keyspace; rows come back as dicts.

        Raises:
            BackendError: Cassandra is not reachable.

        """
        return self._connect()

    def _connect(self) -> Any:
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._closed:
                raise BackendError(f"{self!r} is closed")
            if self._session is None:
                cluster = self._make_cluster()
                try:
                    self._session = cluster.connect()
                except Exception as err:
                    cluster.shutdown()
                    raise self._error(err, "connecting") from err
                self._cluster = cluster
                log.info(
                    "connected to Cassandra at %s (keyspace %s, consistency %s)",
                    self.options.hosts_text, self.options.keyspace, self.options.consistency,
                )
            return self._session

    def _make_cluster(self) -> Any:
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import (
            DCAwareRoundRobinPolicy,
            ExponentialReconnectionPolicy,
            TokenAwarePolicy,
        )
        from cassandra.query import dict_factory

        opts = self.options
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=opts.local_dc)),
            consistency_level=self._consistency,
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
            raise self._error(err, "connecting") from err

    def _ssl_context(self) -> ssl.SSLContext:
        opts = self.options
        context = ssl.create_default_context(cafile=opts.ssl_ca)
        context.check_hostname = opts.ssl_check_hostname
        if not opts.ssl_check_hostname:
            context.verify_mode = ssl.CERT_NONE if not opts.ssl_ca else ssl.CERT_REQUIRED
        if opts.ssl_cert:
            context.load_cert_chain(opts.ssl_cert, opts.ssl_key)
        return context

    def _ready(self) -> tuple[Any, _Statements]:
        """Return the session and the prepared task statements, preparing them once."""
        return self._prepared_once("_statements", self._prepare)

    def _prepared_once(self, attr: str, prepare: Callable[[Any], _S]) -> tuple[Any, _S]:
        """Return the session and the statements held in ``attr``, preparing them once."""
        statements: _S | None = getattr(self, attr)
        if statements is not None:
            return self._session, statements
        session = self._connect()
        with self._lock:
            statements = getattr(self, attr)
            if statements is None:
                statements = prepare(session)
                setattr(self, attr, statements)
            return session, statements

    def _prepare(self, session: Any) -> _Statements:
        ks = self._ks
        columns = ", ".join(_TASK_COLUMNS)
        marks = ", ".join("?" for _ in _TASK_COLUMNS)
        return _Statements(**self._prepare_all(session, {
            "insert_task": f"INSERT INTO {ks}.tasks ({columns}) VALUES ({marks}) USING TTL ?",
            "insert_index": f"INSERT INTO {ks}.tasks_by_state (queue, state, bucket, shard, "
            "updated_at, task_id, name) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            "select_task": f"SELECT {columns} FROM {ks}.tasks WHERE task_id = ?",
            "select_index": f"SELECT task_id, updated_at FROM {ks}.tasks_by_state WHERE queue = ? "
            "AND state = ? AND bucket = ? AND shard = ? AND updated_at >= ? AND updated_at < ?",
        }))

    def _ready_groups(self) -> tuple[Any, _GroupStatements]:
        """Return the session and the group statements, preparing them once.

        Kept apart from :meth:`_ready`, so that task rows keep working on a keyspace
        not yet migrated to 002. The first call checks the consistency (:meth:`check_groups`).

        Raises:
            ConfigError: the consistency cannot make group joins and claims correct.
            BackendError: Cassandra is not reachable, or the tables are missing.

        """
        if self._group_statements is None:
            self.check_groups()
        return self._prepared_once("_group_statements", self._prepare_groups)

    def check_groups(self) -> None:
        """Refuse a consistency under which group joins and claims cannot be correct.

        Reads the keyspace's replication (connecting if needed) and applies
        :func:`check_group_consistency`; a refusal is remembered. Called on the first
        group operation; a worker may call it at start to fail fast.

        Raises:
            ConfigError: naming the setting to change.
            BackendError: Cassandra is not reachable.

        """
        if self._group_refusal is not None:
            raise self._group_refusal
        session = self._connect()
        rows = self._run(
            session,
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            "reading the keyspace's replication",
            (self.keyspace,),
        )
        row = rows.one()
        if row is None:
            return  # not migrated: the group statements' preparation says so
        opts = self.options
        try:
            warnings = check_group_consistency(
                opts.consistency, opts.serial_consistency, dict(row["replication"]),
                opts.keyspace,
            )
        except ConfigError as err:
            self._group_refusal = err
            raise
        for warning in warnings:
            log.warning("%s", warning)

    def _prepare_groups(self, session: Any) -> _GroupStatements:
        from cassandra import ConsistencyLevel

        ks = self._ks
        statements = _GroupStatements(**self._prepare_all(session, {
            "insert_member": f"INSERT INTO {ks}.group_members (group_id, shard, member, "
            "result_value, joined_at) VALUES (?, ?, ?, ?, ?) USING TTL ?",
            "count_members": f"SELECT COUNT(*) AS n FROM {ks}.group_members "
            "WHERE group_id = ? AND shard = ?",
            "insert_shard": f"INSERT INTO {ks}.group_shards (group_id, shard) VALUES (?, ?) "
            "USING TTL ?",
            "count_shards": f"SELECT COUNT(*) AS n FROM {ks}.group_shards WHERE group_id = ?",
            "select_members": f"SELECT member, result_value FROM {ks}.group_members "
            "WHERE group_id = ? AND shard = ?",
            # CQL wants IF NOT EXISTS before USING TTL
            "claim": f"INSERT INTO {ks}.group_triggers (group_id, claimer, outcome, claimed_at, "
            "reason) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?",
            "settle": f"UPDATE {ks}.group_triggers USING TTL ? SET settled = true "
            "WHERE group_id = ? IF EXISTS",
            "select_claim": f"SELECT claimer, outcome, claimed_at, settled, reason "
            f"FROM {ks}.group_triggers WHERE group_id = ?",
        }))
        # the Paxos phase of claims and settles (checked by check_groups)
        serial = ConsistencyLevel.name_to_value[self.options.serial_consistency]
        statements.claim.serial_consistency_level = serial
        statements.settle.serial_consistency_level = serial
        return statements

    def _prepare_all(self, session: Any, texts: dict[str, str]) -> dict[str, Any]:
        """Prepare every statement of ``texts`` (by name) at the configured consistency."""
        prepared = {}
        for name, text in texts.items():
            try:
                statement = session.prepare(text)
            except Exception as err:
                raise self._error(err, "preparing statements") from err
            statement.consistency_level = self._consistency
            prepared[name] = statement
        return prepared

    # ---------------------------------------------------------------- migrations

    def migrate(self) -> list[str]:
        """Apply the pending CQL migrations in version order and record them.

        Idempotent: versions already in ``schema_migrations`` are skipped.

        Returns:
            The names of the migrations applied (e.g. ``["001_initial"]``), empty when
            the schema was up to date.

        Raises:
            BackendError: Cassandra failed a statement (the message names the migration).

        """
        from cassandra.query import SimpleStatement

        session = self._connect()
        applied = self._applied_versions(session)
        done: list[str] = []
        for migration in load_migrations():
            if migration.version in applied:
                continue
            log.info("applying CQL migration %s to keyspace %s", migration.name, self.keyspace)
            for text in migration.statements(self._ks, self.options.replication()):
                if self._column_exists(session, added_column(text)):
                    continue
                try:
                    session.execute(SimpleStatement(text), timeout=_DDL_TIMEOUT_S)
                except Exception as err:
                    raise self._error(err, f"migration {migration.name}") from err
            insert = SimpleStatement(
                f"INSERT INTO {self._ks}.schema_migrations (version, name, applied_at) "
                "VALUES (%s, %s, %s)",
                consistency_level=self._consistency,
            )
            try:
                session.execute(insert, (migration.version, migration.name, now_ms()))
            except Exception as err:
                raise self._error(err, f"recording migration {migration.name}") from err
            done.append(migration.name)
        if done:
            with self._lock:
                # tables may have changed: prepare again
                self._statements = None
                self._group_statements = None
        return done

    def applied_migrations(self) -> list[str]:
        """Return the names of the migrations recorded in ``schema_migrations``, in order.

        Raises:
            BackendError: Cassandra is not reachable.

        """
        session = self._connect()
        if not self._has_migrations_table(session):
            return []
        rows = self._run(
            session, f"SELECT version, name FROM {self._ks}.schema_migrations", "reading migrations"
        )
        return [row["name"] for row in sorted(rows, key=lambda r: int(r["version"]))]

    def _applied_versions(self, session: Any) -> set[int]:
        if not self._has_migrations_table(session):
            return set()
        rows = self._run(
            session, f"SELECT version FROM {self._ks}.schema_migrations", "reading migrations"
        )
        return {int(row["version"]) for row in rows}

    def _column_exists(self, session: Any, column: tuple[str, str] | None) -> bool:
        """Whether ``(table, column)`` exists in the keyspace (False for None)."""
        if column is None:
            return False
        rows = self._run(
            session,
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s "
            "AND table_name = %s AND column_name = %s",
            "reading the schema",
            (self.keyspace, column[0].lower(), column[1].lower()),
        )
        return bool(list(rows))

    def _has_migrations_table(self, session: Any) -> bool:
        rows = self._run(
            session,
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s "
            "AND table_name = 'schema_migrations'",
            "reading the schema",
            (self.keyspace,),
        )
        return bool(list(rows))

    def _run(self, session: Any, cql: str, action: str, params: tuple[Any, ...] = ()) -> Any:
        from cassandra.query import SimpleStatement

        try:
            return session.execute(
                SimpleStatement(cql, consistency_level=self._consistency), params or None
            )
        except Exception as err:
            raise self._error(err, action) from err

    # ---------------------------------------------------------------- writes

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
        future: Future[None] = Future()
        try:
            session, statements = self._ready()
        except BackendError as err:
            future.set_exception(err)
            return future
        task_params, index_params = self._write_params(meta)
        self._slots.acquire()
        with self._pending_lock:
            self._pending.add(future)
        write = FanIn(2, partial(self._write_done, future, meta.task_id))
        for statement, params in (
            (statements.insert_task, task_params),
            (statements.insert_index, index_params),
        ):
            try:
                response = session.execute_async(statement, params)
            except Exception as err:  # e.g. the session was shut down
                write.failed(err)
                continue
            response.add_callbacks(write.succeeded, write.failed)
        return future

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
            meta.queue, meta.state, updated - updated % HOUR_MS, listing_shard(meta.task_id),
            updated, meta.task_id,
            meta.name, ttl,
        )
        return task_params, index_params

    def _write_done(self, future: Future[None], task_id: str, error: BaseException | None) -> None:
        """Both statements of a store answered: free its slot, complete its future."""
        with self._pending_lock:
            self._pending.discard(future)
        self._slots.release()
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(self._error(error, f"storing task {task_id}"))

    # ---------------------------------------------------------------- reads

    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return the row of ``task_id``, or None when there is none (or it expired).

        Raises:
            BackendError: Cassandra failed the read.

        """
        session, statements = self._ready()
        row = self._read_one(session, statements.select_task, (task_id,),
                             f"fetching task {task_id}")
        return None if row is None else self._to_meta(row)

    def _read_one(
        self, session: Any, statement: Any, params: tuple[Any, ...], action: str
    ) -> dict[str, Any] | None:
        """Run a single-row read; BackendError naming ``action`` when it fails."""
        try:
            row: dict[str, Any] | None = session.execute(statement, params).one()
        except Exception as err:
            raise self._error(err, action) from err
        return row

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
            return self._error(err, f"fetching task {task_ids[position]}")

        requests = [(statements.select_task, (task_id,)) for task_id in task_ids]
        pages = _Gather(session, requests, wrap, list).start().result()
        return [self._to_meta(rows[0]) if rows else None for rows in pages]

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
                    yield row["task_id"], _to_ms(row["updated_at"]) or 0
                if not rows.has_more_pages:
                    return
                rows.fetch_next_page()
        except StreamTasksError:
            raise
        except Exception as err:
            raise self._error(err, f"listing queue {params[0]} state {params[1]}") from err

    def _current_rows(
        self, session: Any, statements: _Statements, entries: list[tuple[str, int]], state: str
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
                raise self._error(err, f"fetching task {task_id}") from err
            if row is None or row["state"] != state or _to_ms(row["updated_at"]) != updated:
                continue
            kept.append(self._to_meta(row))
        return kept

    def _to_meta(self, row: dict[str, Any]) -> TaskMeta:
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
            created_ms=_to_ms(row["created_at"]),
            started_ms=_to_ms(row["started_at"]),
            finished_ms=_to_ms(row["finished_at"]),
            parent_id=row["parent_id"],
            root_id=row["root_id"],
            group_id=row["group_id"],
            group_index=row["group_index"],
            extra=dict(row["extra"] or {}),
        )

    # ---------------------------------------------------------------- groups

    def join_group(self, group_id: str, index: int, size: int, result: Any) -> Future[bool]:
        """Record member ``index`` of the group and tell whether the group is complete.

        Four statements, each sent from the driver's callback of the one before: write the
        member's row; count the rows of its shard; when the shard is complete, write the
        shard's mark; count the marks. Each read follows its write at the configured
        consistency, so of members joining concurrently the last to write sees True (with
        replication above 1 this needs a QUORUM-class consistency, as the default
        LOCAL_QUORUM; others are refused, see :meth:`check_groups`). No counter; only
        the shard marks share a partition per group.

        Returns:
            A future whose value is True when all ``size`` members are recorded, or
            failed with BackendError.

        Raises:
            EncodeError: the result cannot be encoded (nothing is written).
            ValueError: ``index`` is not in ``0 .. size-1`` (nothing is written).

        """
        check_group_member(group_id, index, size)
        value = None if result is None else self._codec.encode_value(result)
        future: Future[bool] = Future()
        try:
            session, statements = self._ready_groups()
        except BackendError as err:
            future.set_exception(err)
            return future
        self._track(future)

        def wrap(err: BaseException) -> BackendError:
            return self._error(err, f"joining group {group_id} (member {index} of {size})")

        join = _GroupJoin(session, statements, future, wrap, group_id, index, size)
        join.start(value, self._group_ttl_s)
        return future

    def claim_group(
        self, group_id: str, claimer: str, outcome: str, reason: str | None = None
    ) -> Future[GroupClaim]:
        """Claim the group by a lightweight transaction (INSERT ... IF NOT EXISTS).

        The trigger row is written with the group TTL. When the row exists already, the
        transaction returns its columns: they are the answer, no further read is made.

        Returns:
            A future of the trigger row after the attempt (this claim when it won, else
            the existing row). It fails with BackendError, also when Cassandra cannot
            tell whether the claim was applied (a CAS write timeout, e.g. under
            contention): claiming again with the same arguments is safe and then tells.

        """
        future: Future[GroupClaim] = Future()
        try:
            session, statements = self._ready_groups()
        except BackendError as err:
            future.set_exception(err)
            return future
        self._track(future)
        claimed_ms = now_ms()

        def wrap(err: BaseException) -> BackendError:
            return self._error(err, f"claiming group {group_id}")

        def claimed(rows: list[dict[str, Any]]) -> None:
            row = rows[0]
            if row["[applied]"]:
                future.set_result(GroupClaim(claimer, outcome, claimed_ms, False, reason))
            else:
                # not applied: the row returned is the one that exists
                future.set_result(_claim_from_row(row))

        params = (group_id, claimer, outcome, claimed_ms, reason, self._group_ttl_s)
        _send_then(session, statements.claim, params, future, wrap, claimed)
        return future

    def settle_group(self, group_id: str) -> Future[None]:
        """Set ``settled`` on the trigger row by a lightweight transaction (UPDATE ... IF EXISTS).

        Returns:
            A future done when the mark is written; failed with BackendError when
            Cassandra fails (or cannot tell: settling again is safe) or when the group
            has no trigger row.

        """
        future: Future[None] = Future()
        try:
            session, statements = self._ready_groups()
        except BackendError as err:
            future.set_exception(err)
            return future
        self._track(future)

        def wrap(err: BaseException) -> BackendError:
            return self._error(err, f"settling group {group_id}")

        def settled(rows: list[dict[str, Any]]) -> None:
            if rows[0]["[applied]"]:
                future.set_result(None)
            else:
                future.set_exception(BackendError(unclaimed_group_message(group_id)))

        params = (self._group_ttl_s, group_id)
        _send_then(session, statements.settle, params, future, wrap, settled)
        return future

    def group_results(self, group_id: str, size: int) -> Future[list[Any]]:
        """Read the members' results, every shard concurrently, and return them in order.

        Returns:
            A future of the results of members ``0 .. size-1``; failed with BackendError
            when Cassandra fails a read or a member's entry is missing, with DecodeError
            when a stored result cannot be decoded.

        """
        try:
            session, statements = self._ready_groups()
        except BackendError as err:
            failed: Future[list[Any]] = Future()
            failed.set_exception(err)
            return failed
        shards = -(-size // GROUP_SHARD_SIZE) if size > 0 else 0
        requests = [(statements.select_members, (group_id, shard)) for shard in range(shards)]

        def wrap(err: BaseException, shard: int) -> BackendError:
            return self._error(err, f"reading group {group_id} (shard {shard})")

        def assemble(pages: list[list[dict[str, Any]]]) -> list[Any]:
            return self._member_results(group_id, size, pages)

        future = _Gather(session, requests, wrap, assemble).start()
        self._track(future)
        return future

    def _member_results(
        self, group_id: str, size: int, pages: list[list[dict[str, Any]]]
    ) -> list[Any]:
        blobs = {
            row["member"]: row["result_value"]
            for rows in pages
            for row in rows
            if row["member"] < size
        }
        missing = [index for index in range(size) if index not in blobs]
        if missing:
            raise BackendError(missing_members_message(group_id, size, missing))
        results = []
        for index in range(size):
            blob = blobs[index]
            try:
                results.append(None if blob is None else self._codec.decode_value(bytes(blob)))
            except Exception as err:
                raise DecodeError(
                    f"group {group_id}: the stored result of member {index} cannot be "
                    f"decoded ({err})"
                ) from err
        return results

    def group_claim(self, group_id: str) -> GroupClaim | None:
        """Return who claimed the group and the outcome, or None when nobody has.

        Raises:
            BackendError: Cassandra failed the read.

        """
        session, statements = self._ready_groups()
        row = self._read_one(session, statements.select_claim, (group_id,),
                             f"reading the claim of group {group_id}")
        return None if row is None else _claim_from_row(row)

    def _track(self, future: Future[Any]) -> None:
        """Keep ``future`` until it is done, so that :meth:`close` waits for it."""
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: Future[Any]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    # ---------------------------------------------------------------- errors, close

    def _error(self, err: BaseException, action: str) -> BackendError:
        """Return a BackendError naming the hosts and what to check."""
        if isinstance(err, BackendError):
            return err
        from cassandra import (
            AuthenticationFailed,
            OperationTimedOut,
            ReadTimeout,
            Unavailable,
            WriteTimeout,
        )
        from cassandra.cluster import NoHostAvailable
        from cassandra.protocol import SyntaxException

        opts = self.options
        where = f"Cassandra at {opts.hosts_text} (keyspace {opts.keyspace})"
        if isinstance(err, NoHostAvailable):
            errors = getattr(err, "errors", None) or {}
            detail = "; ".join(f"{host}: {why}" for host, why in errors.items()) or str(err)
            hint = "that Cassandra is running and listening there, and the host:port in the URL"
            if any(isinstance(why, AuthenticationFailed) for why in errors.values()):
                hint = "the username and password options of the backend URL"
            elif "protocol" in detail.lower():
                hint = "the protocol_version option of the backend URL (4 for Cassandra 3.x)"
            elif opts.ssl:
                hint += ", and the TLS options (ssl_ca, ssl_cert, ssl_check_hostname)"
            return BackendError(f"{where}: {action} failed, no host available ({detail}); "
                                f"check {hint}")
        if isinstance(err, OperationTimedOut):
            return BackendError(
                f"{where}: {action} timed out after {opts.request_timeout_s}s ({err}); check "
                "that the nodes are up and not overloaded, or raise request_timeout"
            )
        if isinstance(err, Unavailable):
            return BackendError(
                f"{where}: {action} failed, not enough live replicas for consistency "
                f"{opts.consistency} ({err}); check that the nodes are up and that the "
                "keyspace's replication (replication_factor, local_dc) fits the consistency"
            )
        if isinstance(err, ReadTimeout | WriteTimeout):
            return BackendError(
                f"{where}: {action} failed, replicas did not answer in time at consistency "
                f"{opts.consistency} ({err}); check node health and load"
            )
        message = str(err)
        if "unconfigured table" in message or "Undefined column name" in message or (
            "does not exist" in message and "eyspace" in message
        ):
            return BackendError(
                f"{where}: {action} failed, the tables do not exist ({message}); run "
                "`streamtasks migrate`"
            )
        if isinstance(err, SyntaxException):
            return BackendError(f"{where}: {action} failed, invalid CQL ({message})")
        return BackendError(f"{where}: {action} failed: {type(err).__name__}: {message}")

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for in-flight writes (up to ``timeout_s``, default the request timeout).

        Then shut the cluster connection down. Later calls raise BackendError.
        """
        with self._pending_lock:
            pending = list(self._pending)
        if pending:
            wait_s = self.options.request_timeout_s if timeout_s is None else timeout_s
            concurrent.futures.wait(pending, timeout=wait_s)
        with self._lock:
            self._closed = True
            cluster, self._cluster, self._session = self._cluster, None, None
            self._statements = None
            self._group_statements = None
        if cluster is not None:
            cluster.shutdown()


_T = TypeVar("_T")


class _Gather(Generic[_T]):
    """Runs reads with at most ``_READ_WINDOW`` in flight, each sent from a callback.

    Its future gets ``finish(pages)``, the rows of every statement in order (the first
    page: the reads here return at most a shard or a row), or the first error, as
    ``wrap(error, position of the statement)``. An error of ``finish`` fails it as is.
    """

    def __init__(
        self,
        session: Any,
        requests: Sequence[tuple[Any, tuple[Any, ...]]],
        wrap: Callable[[BaseException, int], BackendError],
        finish: Callable[[list[list[dict[str, Any]]]], _T],
    ) -> None:
        self.future: Future[_T] = Future()
        self._session = session
        self._requests = requests
        self._wrap = wrap
        self._finish = finish
        self._pages: list[list[dict[str, Any]]] = [[] for _ in requests]
        self._next = 0
        self._left = len(requests)
        self._over = False
        self._lock = threading.Lock()

    def start(self) -> Future[_T]:
        """Send the first window of reads; return the future."""
        if not self._requests:
            self._complete()
        for _ in range(min(_READ_WINDOW, len(self._requests))):
            self._send_next()
        return self.future

    def _send_next(self) -> None:
        with self._lock:
            if self._over or self._next >= len(self._requests):
                return
            position = self._next
            self._next += 1
        statement, params = self._requests[position]
        try:
            response = self._session.execute_async(statement, params)
        except Exception as err:  # e.g. the session was shut down
            self._failed(err, position)
            return
        response.add_callbacks(
            self._succeeded, self._failed, callback_args=(position,), errback_args=(position,)
        )

    def _succeeded(self, rows: list[dict[str, Any]] | None, position: int) -> None:
        with self._lock:
            self._pages[position] = rows or []
            self._left -= 1
            last = self._left == 0 and not self._over
            self._over = self._over or last
        if last:
            self._complete()
        else:
            self._send_next()

    def _failed(self, err: BaseException, position: int) -> None:
        with self._lock:
            if self._over:
                return
            self._over = True
        self.future.set_exception(self._wrap(err, position))

    def _complete(self) -> None:
        try:
            value = self._finish(self._pages)
        except Exception as err:
            self.future.set_exception(err)
            return
        self.future.set_result(value)


class _GroupJoin:
    """The steps of :meth:`CassandraBackend.join_group`, each sent from a driver callback.

    Member ``index`` of a group of ``size`` lies in shard ``index // GROUP_SHARD_SIZE``;
    every shard holds ``GROUP_SHARD_SIZE`` members but the last, which holds the rest.
    """

    def __init__(
        self,
        session: Any,
        statements: _GroupStatements,
        future: Future[bool],
        wrap: Callable[[BaseException], BackendError],
        group_id: str,
        index: int,
        size: int,
    ) -> None:
        self._session = session
        self._statements = statements
        self._future = future
        self._wrap = wrap
        self._group_id = group_id
        self._index = index
        self._shard = index // GROUP_SHARD_SIZE
        self._shard_size = min(GROUP_SHARD_SIZE, size - self._shard * GROUP_SHARD_SIZE)
        self._shards = -(-size // GROUP_SHARD_SIZE)
        self._ttl_s = 0

    def start(self, value: bytes | None, ttl_s: int) -> None:
        """Write the member's row (``value``, expiring after ``ttl_s``); the rest follows."""
        self._ttl_s = ttl_s
        params = (self._group_id, self._shard, self._index, value, now_ms(), ttl_s)
        self._send(self._statements.insert_member, params, self._member_written)

    def _member_written(self, _rows: object) -> None:
        params = (self._group_id, self._shard)
        self._send(self._statements.count_members, params, self._members_counted)

    def _members_counted(self, rows: list[dict[str, Any]]) -> None:
        if rows[0]["n"] < self._shard_size:
            self._future.set_result(False)
            return
        params = (self._group_id, self._shard, self._ttl_s)
        self._send(self._statements.insert_shard, params, self._shard_marked)

    def _shard_marked(self, _rows: object) -> None:
        self._send(self._statements.count_shards, (self._group_id,), self._shards_counted)

    def _shards_counted(self, rows: list[dict[str, Any]]) -> None:
        self._future.set_result(rows[0]["n"] == self._shards)

    def _send(
        self, statement: Any, params: tuple[Any, ...], then: Callable[[Any], None]
    ) -> None:
        _send_then(self._session, statement, params, self._future, self._wrap, then)


def _send_then(
    session: Any,
    statement: Any,
    params: tuple[Any, ...],
    future: Future[Any],
    wrap: Callable[[BaseException], BackendError],
    then: Callable[[Any], None],
) -> None:
    """Send a statement; on success call ``then(rows)``, on any error fail ``future``.

    ``then`` runs on the driver's I/O thread: it may send the next statement, never wait.
    """

    def failed(err: BaseException) -> None:
        if not future.done():
            future.set_exception(wrap(err))

    def succeeded(rows: Any) -> None:
        try:
            then(rows)
        except Exception as err:  # never let an error escape into the driver
            failed(err)

    try:
        response = session.execute_async(statement, params)
    except Exception as err:  # e.g. the session was shut down
        failed(err)
        return
    response.add_callbacks(succeeded, failed)


def listing_shard(task_id: str) -> int:
    """Return the listing partition shard of a task: crc32 of its id mod LISTING_SHARDS."""
    return zlib.crc32(task_id.encode()) % LISTING_SHARDS


def group_ttl_s(result_ttl_s: int, group_expires_s: int) -> int:
    """Return the TTL of group rows: ``group_expires_s``, at least the task rows' TTL.

    0 (no expiry) when either is 0 or less: group rows never expire before task rows.
    """
    if result_ttl_s <= 0 or group_expires_s <= 0:
        return 0
    return max(group_expires_s, result_ttl_s)


def _claim_from_row(row: dict[str, Any]) -> GroupClaim:
    """Return the GroupClaim of a trigger row (a read's, or a not-applied LWT's).

    The claim's cells and the later ``settled`` cell are written with the same TTL, so
    ``settled`` may outlive the rest by the time between claim and settle: such a row
    (claimer null) is a decision made and settled long ago, which no claimer holds.
    """
    return GroupClaim(
        claimer=row.get("claimer") or "",
        outcome=row.get("outcome") or "",
        claimed_ms=_to_ms(row.get("claimed_at")),
        settled=bool(row.get("settled")),
        reason=row.get("reason"),
    )


def _to_ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    return round((value - _EPOCH) / timedelta(milliseconds=1))
