"""The schema of the Cassandra backend: versioned CQL migrations and applying them.

Migrations are the files ``schemas/cql/NNN_name.cql`` (packaged as
``streamtasks/_schemas/cql``), applied in version order by ``streamtasks migrate`` and
recorded in the keyspace's ``schema_migrations`` table.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

from streamtasks.backend.cassandra.connection import Connection
from streamtasks.errors import ConfigError
from streamtasks.message import now_ms

log = logging.getLogger(__name__)

_MIGRATION_RE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.cql$")
_ADD_COLUMN_RE = re.compile(
    r'^ALTER\s+TABLE\s+(?:"?\w+"?\.)?"?(\w+)"?\s+ADD\s+"?(\w+)"?\s+\w+(?:\s*<.*>)?$',
    re.IGNORECASE,
)
_DDL_TIMEOUT_S = 60.0


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
    return Path(__file__).resolve().parents[3] / "schemas" / "cql"


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


class Migrator:
    """Applies the pending migrations to the connection's keyspace and records them."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    def migrate(self) -> list[str]:
        """Apply the pending CQL migrations in version order and record them.

        Idempotent: versions already in ``schema_migrations`` are skipped, and so is an
        ``ALTER TABLE ... ADD`` of a column that exists (a migration interrupted before
        its record is run again).

        Returns:
            The names of the migrations applied (e.g. ``["001_initial"]``), empty when
            the schema was up to date.

        Raises:
            BackendError: Cassandra failed a statement (the message names the migration).

        """
        from cassandra.query import SimpleStatement

        conn = self._conn
        session = conn.session()
        applied = self._applied_versions()
        done: list[str] = []
        replication = ""
        for migration in load_migrations():
            if migration.version in applied:
                continue
            replication = replication or self._replication()
            log.info("applying CQL migration %s to keyspace %s", migration.name,
                     conn.options.keyspace)
            for text in migration.statements(conn.ks, replication):
                if self._column_exists(added_column(text)):
                    continue
                try:
                    session.execute(SimpleStatement(text), timeout=_DDL_TIMEOUT_S)
                except Exception as err:
                    raise conn.error(err, f"migration {migration.name}") from err
            conn.run(
                f"INSERT INTO {conn.ks}.schema_migrations (version, name, applied_at) "
                "VALUES (%s, %s, %s)",
                f"recording migration {migration.name}",
                (migration.version, migration.name, now_ms()),
            )
            done.append(migration.name)
        if done:
            conn.forget_prepared()  # tables may have changed: prepare again
        return done

    def _replication(self) -> str:
        """Return the replication of a keyspace created now, from the nodes the driver sees.

        Raises:
            ConfigError: the backend URL's ``local_dc`` names a data center with no node
                (the keyspace would keep its rows nowhere).
        """
        options = self._conn.options
        nodes = self._conn.nodes(options.local_dc)
        if nodes == 0:
            raise ConfigError(
                f"backend URL option local_dc={options.local_dc}: the driver sees no "
                "Cassandra node in that data center; name one of the cluster's data centers"
            )
        return options.replication(nodes)

    def pending_migrations(self) -> list[str]:
        """Return the names of the migrations not yet applied to the keyspace, in order.

        Raises:
            BackendError: Cassandra is not reachable.

        """
        applied = self._applied_versions()
        return [m.name for m in load_migrations() if m.version not in applied]

    def applied_migrations(self) -> list[str]:
        """Return the names of the migrations recorded in ``schema_migrations``, in order.

        Raises:
            BackendError: Cassandra is not reachable.

        """
        if not self._has_migrations_table():
            return []
        rows = self._conn.run(
            f"SELECT version, name FROM {self._conn.ks}.schema_migrations", "reading migrations"
        )
        return [row["name"] for row in sorted(rows, key=lambda r: int(r["version"]))]

    def _applied_versions(self) -> set[int]:
        if not self._has_migrations_table():
            return set()
        rows = self._conn.run(
            f"SELECT version FROM {self._conn.ks}.schema_migrations", "reading migrations"
        )
        return {int(row["version"]) for row in rows}

    def _column_exists(self, column: tuple[str, str] | None) -> bool:
        """Whether ``(table, column)`` exists in the keyspace (False for None)."""
        if column is None:
            return False
        rows = self._conn.run(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s "
            "AND table_name = %s AND column_name = %s",
            "reading the schema",
            (self._conn.options.keyspace, column[0].lower(), column[1].lower()),
        )
        return bool(list(rows))

    def _has_migrations_table(self) -> bool:
        rows = self._conn.run(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s "
            "AND table_name = 'schema_migrations'",
            "reading the schema",
            (self._conn.options.keyspace,),
        )
        return bool(list(rows))
