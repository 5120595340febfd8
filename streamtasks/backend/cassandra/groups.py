"""Groups (chords) in the Cassandra backend: member rows, shard marks, the trigger row.

A member joins by writing its row and counting its shard (:class:`_GroupJoin`); the
members that see the group complete race for the trigger row by a lightweight
transaction (:meth:`GroupStore.claim_group`), and the winner marks it settled once the
decided outcome's messages are confirmed (:meth:`GroupStore.settle_group`). Every group
row expires after the group TTL (:func:`group_ttl_s`). Operations return futures
completed by chains of statements, each sent from the driver's callback of the one
before. See ``docs/backend.md`` for the trigger row's states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from streamtasks.backend.base import GROUP_SHARD_SIZE, GroupClaim
from streamtasks.backend.cassandra.connection import Connection
from streamtasks.backend.cassandra.consistency import check_group_consistency
from streamtasks.backend.cassandra.futures import Gather, send_then
from streamtasks.backend.cassandra.rows import to_ms
from streamtasks.backend.memory import (
    check_group_member,
    missing_members_message,
    unclaimed_group_message,
)
from streamtasks.codec.base import Codec
from streamtasks.errors import BackendError, ConfigError, DecodeError
from streamtasks.message import now_ms

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _GroupStatements:
    """The statements of migrations 002 and 004 (prepared on first use of a group)."""

    insert_member: Any
    count_members: Any
    insert_shard: Any
    count_shards: Any
    select_members: Any
    claim: Any
    settle: Any
    select_claim: Any


def _prepare_groups(conn: Connection) -> _GroupStatements:
    from cassandra import ConsistencyLevel

    ks = conn.ks
    statements = _GroupStatements(**conn.prepare_all({
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
    # the Paxos phase of claims and settles (checked by GroupStore.check_groups)
    serial = ConsistencyLevel.name_to_value[conn.options.serial_consistency]
    statements.claim.serial_consistency_level = serial
    statements.settle.serial_consistency_level = serial
    return statements


class GroupStore:
    """Group joins, chord claims and settles (the group half of :class:`CassandraBackend`).

    Args:
        connection: the session and its prepared statements.
        codec: encodes members' results with their exact types.
        ttl_s: TTL of every group row (:func:`group_ttl_s`; 0: none).

    """

    def __init__(self, connection: Connection, codec: Codec, ttl_s: int) -> None:
        self._conn = connection
        self._codec = codec
        self._ttl_s = ttl_s
        self._checked = False
        self._refusal: ConfigError | None = None

    def _ready(self) -> tuple[Any, _GroupStatements]:
        """Return the session and the group statements, preparing them once.

        Kept apart from the task statements, so that task rows keep working on a
        keyspace not yet migrated to 002. The first call checks the consistency
        (:meth:`check_groups`).

        Raises:
            ConfigError: the consistency cannot make group joins and claims correct.
            BackendError: Cassandra is not reachable, or the tables are missing.

        """
        if not self._checked:
            self.check_groups()
        return self._conn.prepared("groups", _prepare_groups)

    def check_groups(self) -> None:
        """Refuse a consistency under which group joins and claims cannot be correct.

        Reads the keyspace's replication (connecting if needed) and applies
        :func:`check_group_consistency`; a refusal is remembered.

        Raises:
            ConfigError: naming the setting to change.
            BackendError: Cassandra is not reachable.

        """
        if self._refusal is not None:
            raise self._refusal
        opts = self._conn.options
        rows = self._conn.run(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            "reading the keyspace's replication",
            (opts.keyspace,),
        )
        row = rows.one()
        if row is None:
            return  # not migrated: the group statements' preparation says so
        try:
            warnings = check_group_consistency(
                opts.consistency, opts.serial_consistency, dict(row["replication"]),
                opts.keyspace,
            )
        except ConfigError as err:
            self._refusal = err
            raise
        for warning in warnings:
            log.warning("%s", warning)
        self._checked = True

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
            ConfigError: the consistency cannot make joins correct (nothing is written).

        """
        check_group_member(group_id, index, size)
        value = None if result is None else self._codec.encode_value(result)
        future: Future[bool] = Future()
        ready = self._conn.begin(future, self._ready)
        if ready is None:
            return future
        session, statements = ready

        def wrap(err: BaseException) -> BackendError:
            return self._conn.error(err, f"joining group {group_id} (member {index} of {size})")

        join = _GroupJoin(session, statements, future, wrap, group_id, index, size)
        join.start(value, self._ttl_s)
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

        Raises:
            ConfigError: the consistency cannot make claims correct (nothing is written).

        """
        future: Future[GroupClaim] = Future()
        ready = self._conn.begin(future, self._ready)
        if ready is None:
            return future
        session, statements = ready
        claimed_ms = now_ms()

        def wrap(err: BaseException) -> BackendError:
            return self._conn.error(err, f"claiming group {group_id}")

        def claimed(rows: list[dict[str, Any]]) -> None:
            row = rows[0]
            if row["[applied]"]:
                future.set_result(GroupClaim(claimer, outcome, claimed_ms, False, reason))
            else:
                # not applied: the row returned is the one that exists
                future.set_result(_claim_from_row(row))

        params = (group_id, claimer, outcome, claimed_ms, reason, self._ttl_s)
        send_then(session, statements.claim, params, future, wrap, claimed)
        return future

    def settle_group(self, group_id: str) -> Future[None]:
        """Set ``settled`` on the trigger row by a lightweight transaction (UPDATE ... IF EXISTS).

        Returns:
            A future done when the mark is written; failed with BackendError when
            Cassandra fails (or cannot tell: settling again is safe) or when the group
            has no trigger row.

        """
        future: Future[None] = Future()
        ready = self._conn.begin(future, self._ready)
        if ready is None:
            return future
        session, statements = ready

        def wrap(err: BaseException) -> BackendError:
            return self._conn.error(err, f"settling group {group_id}")

        def settled(rows: list[dict[str, Any]]) -> None:
            if rows[0]["[applied]"]:
                future.set_result(None)
            else:
                future.set_exception(BackendError(unclaimed_group_message(group_id)))

        params = (self._ttl_s, group_id)
        send_then(session, statements.settle, params, future, wrap, settled)
        return future

    def group_results(self, group_id: str, size: int) -> Future[list[Any]]:
        """Read the members' results, every shard concurrently, and return them in order.

        Returns:
            A future of the results of members ``0 .. size-1``; failed with BackendError
            when Cassandra fails a read or a member's entry is missing, with DecodeError
            when a stored result cannot be decoded.

        """
        try:
            session, statements = self._ready()
        except BackendError as err:
            failed: Future[list[Any]] = Future()
            failed.set_exception(err)
            return failed
        shards = -(-size // GROUP_SHARD_SIZE) if size > 0 else 0
        requests = [(statements.select_members, (group_id, shard)) for shard in range(shards)]

        def wrap(err: BaseException, shard: int) -> BackendError:
            return self._conn.error(err, f"reading group {group_id} (shard {shard})")

        def assemble(pages: list[list[dict[str, Any]]]) -> list[Any]:
            return self._member_results(group_id, size, pages)

        future = Gather(session, requests, wrap, assemble).start()
        self._conn.track(future)
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
        """Return the group's trigger row (claimer, outcome, settled, reason), or None.

        A plain read at the configured consistency (LOCAL_QUORUM by default), not a
        serial one: it sees every claim and settle that completed, and may miss one in
        flight. Decisions come from :meth:`claim_group` only.

        Raises:
            BackendError: Cassandra failed the read.

        """
        session, statements = self._ready()
        row = self._conn.read_one(session, statements.select_claim, (group_id,),
                                  f"reading the claim of group {group_id}")
        return None if row is None else _claim_from_row(row)


class _GroupJoin:
    """The steps of :meth:`GroupStore.join_group`, each sent from a driver callback.

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
        send_then(self._session, statement, params, self._future, self._wrap, then)


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
        claimed_ms=to_ms(row.get("claimed_at")),
        settled=bool(row.get("settled")),
        reason=row.get("reason"),
    )
