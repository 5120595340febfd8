"""The Cassandra result backend: a row per task, a time-bucketed listing, chord groups.

URL: ``cassandra://h1:9042[,h2:9042]/keyspace?option=value&...``; the options are listed
in :mod:`streamtasks.backend.cassandra.connection`.

The package, by concern:

- :mod:`.connection`: URL options, cluster, TLS, prepared statements, closing;
- :mod:`.consistency`: which consistency levels are accepted, for what;
- :mod:`.schema`: the versioned CQL migrations (``schemas/cql``) and applying them;
- :mod:`.rows`: task rows and the listing by queue, state and time;
- :mod:`.groups`: group members, shard marks and the chord trigger row;
- :mod:`.control`: schedule claims and revoked ids;
- :mod:`.futures`: driver callbacks as futures; :mod:`.errors`: driver errors explained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from streamtasks.backend.base import (
    FireClaim,
    GroupClaim,
    Replication,
    ResultBackend,
    TaskMeta,
)
from streamtasks.backend.cassandra.connection import CassandraOptions, Connection
from streamtasks.backend.cassandra.consistency import (
    SERIAL_LEVELS,
    check_group_consistency,
    check_serial_consistency,
    replicas,
)
from streamtasks.backend.cassandra.control import ControlStore
from streamtasks.backend.cassandra.groups import GroupStore, group_ttl_s
from streamtasks.backend.cassandra.rows import (
    HOUR_MS,
    LISTING_SHARDS,
    SavedGroups,
    TaskRows,
    listing_shard,
)
from streamtasks.backend.cassandra.schema import (
    Migration,
    Migrator,
    added_column,
    load_migrations,
    schema_dir,
    split_statements,
)
from streamtasks.codec.base import Codec
from streamtasks.settings import Settings

__all__ = [
    "HOUR_MS",
    "LISTING_SHARDS",
    "SERIAL_LEVELS",
    "CassandraBackend",
    "CassandraOptions",
    "Migration",
    "added_column",
    "check_group_consistency",
    "check_serial_consistency",
    "group_ttl_s",
    "listing_shard",
    "load_migrations",
    "replicas",
    "schema_dir",
    "split_statements",
]


class CassandraBackend(ResultBackend):
    """Task rows and chord groups in Cassandra.

    Connects lazily on first use. Call :meth:`migrate` once (``streamtasks migrate``)
    to create the keyspace and tables. Group operations raise ConfigError when the
    consistency cannot make them correct on the keyspace (:meth:`check_groups`).

    Args:
        url: ``cassandra://host:9042[,host2]/keyspace[?options]`` (see
            :mod:`streamtasks.backend.cassandra.connection`).
        settings: ``result_expires_s`` (task row TTL), ``group_expires_s`` (group row
            TTL, at least ``result_expires_s``), ``consistency`` and
            ``backend_max_in_flight`` (concurrent stores) apply.
        codec: encodes results with their exact types (``result_value`` column).
        json_text: renders a result as JSON text (``result`` column, for cqlsh).

    Raises:
        ConfigError: a malformed URL, or a consistency no statement can use.

    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        codec: Codec,
        json_text: Callable[[Any], str],
    ) -> None:
        self.options = CassandraOptions.from_url(url, settings)
        ttl_s = max(int(settings.result_expires_s), 0)
        self._conn = Connection(self.options)
        self._rows = TaskRows(self._conn, codec, json_text, ttl_s, settings.backend_max_in_flight)
        self._groups = GroupStore(
            self._conn, codec, group_ttl_s(ttl_s, int(settings.group_expires_s))
        )
        self._saved_groups = SavedGroups(self._conn, ttl_s)
        self._control = ControlStore(self._conn)
        self._migrator = Migrator(self._conn)

    def __repr__(self) -> str:
        return (
            f"CassandraBackend(hosts={self.options.hosts_text!r}, "
            f"keyspace={self.options.keyspace!r}, consistency={self.options.consistency!r})"
        )

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
        return self._conn.session()

    # -- task rows (see TaskRows) ------------------------------------------------------

    def store(self, meta: TaskMeta) -> Future[None]:
        """Upsert a task row and its listing entry, asynchronously (:meth:`TaskRows.store`)."""
        return self._rows.store(meta)

    def store_many(self, metas: Sequence[TaskMeta]) -> Future[None]:
        """Upsert rows; listing entries batched per partition (:meth:`TaskRows.store_many`)."""
        return self._rows.store_many(metas)

    def own_writes(self) -> bool:
        """Complete the acsylla writer's writes on this thread (:meth:`TaskRows.own_writes`)."""
        return self._rows.own_writes()

    def release_writes(self) -> None:
        """Give the acsylla writer's loop its own thread again (:meth:`TaskRows.release_writes`)."""
        self._rows.release_writes()

    def pump_writes(self, timeout_s: float = 0.0) -> None:
        """Complete the writes acknowledged meanwhile (:meth:`TaskRows.pump_writes`)."""
        self._rows.pump_writes(timeout_s)

    def fetch(self, task_id: str) -> TaskMeta | None:
        """Return the row of ``task_id``, or None (:meth:`TaskRows.fetch`)."""
        return self._rows.fetch(task_id)

    def fetch_many(self, task_ids: Sequence[str]) -> list[TaskMeta | None]:
        """Return the rows of ``task_ids`` in order (:meth:`TaskRows.fetch_many`)."""
        return self._rows.fetch_many(task_ids)

    def list_tasks(
        self,
        queue: str,
        state: str,
        since_ms: int,
        until_ms: int,
        limit: int = 100,
    ) -> list[TaskMeta]:
        """List tasks of a queue now in a state, newest first (:meth:`TaskRows.list_tasks`)."""
        return self._rows.list_tasks(queue, state, since_ms, until_ms, limit)

    def mark_progress(
        self, task_id: str, state: str, attempt: int, name: str, queue: str,
        worker: str | None = None,
    ) -> Future[None]:
        """Write a progress entry, never the state (:meth:`TaskRows.mark_progress`)."""
        return self._rows.mark_progress(task_id, state, attempt, name, queue, worker)

    def forget(self, task_id: str) -> Future[None]:
        """Delete a task row (:meth:`TaskRows.forget`)."""
        return self._rows.forget(task_id)

    def save_group(self, group_id: str, task_ids: Sequence[str]) -> Future[None]:
        """Save a group's member ids (:meth:`SavedGroups.save`)."""
        return self._saved_groups.save(group_id, task_ids)

    def fetch_group(self, group_id: str) -> list[str] | None:
        """Return a saved group's member ids, or None (:meth:`SavedGroups.fetch`)."""
        return self._saved_groups.fetch(group_id)

    def forget_group(self, group_id: str) -> Future[None]:
        """Delete a saved group's row (:meth:`SavedGroups.forget`)."""
        return self._saved_groups.forget(group_id)

    # -- groups (see GroupStore) ---------------------------------------------------------

    def check_groups(self) -> None:
        """Refuse a consistency unfit for groups (:meth:`GroupStore.check_groups`)."""
        self._groups.check_groups()

    def join_group(self, group_id: str, index: int, size: int, result: Any) -> Future[bool]:
        """Record a member; True when the group is complete (:meth:`GroupStore.join_group`)."""
        return self._groups.join_group(group_id, index, size, result)

    def claim_group(
        self, group_id: str, claimer: str, outcome: str, reason: str | None = None
    ) -> Future[GroupClaim]:
        """Claim a group's outcome by a lightweight transaction (:meth:`GroupStore.claim_group`)."""
        return self._groups.claim_group(group_id, claimer, outcome, reason)

    def settle_group(self, group_id: str) -> Future[None]:
        """Mark a group's decision settled (:meth:`GroupStore.settle_group`)."""
        return self._groups.settle_group(group_id)

    def group_results(self, group_id: str, size: int) -> Future[list[Any]]:
        """Return the members' results in order (:meth:`GroupStore.group_results`)."""
        return self._groups.group_results(group_id, size)

    def group_claim(self, group_id: str) -> GroupClaim | None:
        """Return the group's trigger row, or None (:meth:`GroupStore.group_claim`)."""
        return self._groups.group_claim(group_id)

    # -- schedules and revokes (see ControlStore) -----------------------------------------

    def claim_fire(self, schedule: str, due_ms: int, claimer: str, ttl_s: int) -> FireClaim:
        """Claim a schedule's due time by a lightweight transaction (:class:`ControlStore`)."""
        return self._control.claim_fire(schedule, due_ms, claimer, ttl_s)

    def fire_claim(self, schedule: str, due_ms: int) -> FireClaim | None:
        """Return the claim of a due time, or None (:class:`ControlStore`)."""
        return self._control.fire_claim(schedule, due_ms)

    def take_over_fire(
        self, schedule: str, due_ms: int, claimer: str, previous: str, ttl_s: int
    ) -> bool:
        """Take an unsent due time over (:class:`ControlStore`)."""
        return self._control.take_over_fire(schedule, due_ms, claimer, previous, ttl_s)

    def fire_sent(self, schedule: str, due_ms: int, ttl_s: int) -> None:
        """Mark a due time's task sent (:class:`ControlStore`)."""
        self._control.fire_sent(schedule, due_ms, ttl_s)

    def last_fire(self, schedule: str) -> int | None:
        """Return a schedule's newest claimed due time (:class:`ControlStore`)."""
        return self._control.last_fire(schedule)

    def store_revoked(self, task_ids: Sequence[str], terminate: bool, ttl_s: int) -> None:
        """Record revoked ids with a TTL (:class:`ControlStore`)."""
        self._control.store_revoked(task_ids, terminate, ttl_s)

    def revoked(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Return which ids are revoked (:class:`ControlStore`)."""
        return self._control.revoked(task_ids)

    # -- schema, close -----------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply the pending CQL migrations; return their names (:meth:`Migrator.migrate`)."""
        return self._migrator.migrate()

    def pending_migrations(self) -> list[str]:
        """Return the migrations not yet applied (:meth:`Migrator.pending_migrations`)."""
        return self._migrator.pending_migrations()

    def replication(self) -> Replication | None:
        """Return the nodes the driver knows, the keyspace, its replication and levels.

        None when the keyspace does not exist yet.

        Raises:
            BackendError: Cassandra is not reachable.
        """
        row = self._conn.run(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            "reading the keyspace's replication", (self.options.keyspace,)).one()
        if row is None:
            return None
        nodes = self._conn.nodes()
        opts = self.options
        return Replication(nodes, opts.keyspace, dict(row["replication"]), opts.consistency,
                           opts.serial_consistency)

    def applied_migrations(self) -> list[str]:
        """Return the names of the applied migrations (:meth:`Migrator.applied_migrations`)."""
        return self._migrator.applied_migrations()

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for pending writes, then disconnect (:meth:`Connection.close`)."""
        self._conn.close(timeout_s)
        self._rows.close()

