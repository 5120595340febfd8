"""Schedule claims and revoked ids in the Cassandra backend (migration 006).

A due time of a periodic task is claimed by ``INSERT ... IF NOT EXISTS`` on
``schedule_fires (schedule, due_ms)``: the lightweight transaction lets exactly one
scheduler win, and the losers are told who holds it. A claim not marked ``sent`` in time
is taken over by ``UPDATE ... IF claimer = ? AND sent = null``. Revoked ids are plain
rows with a TTL. Calls are synchronous: schedulers and the command line use them, never
the task path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamtasks.backend.base import FireClaim
from streamtasks.backend.cassandra.connection import Connection
from streamtasks.message import now_ms


@dataclass(slots=True)
class _ControlStatements:
    claim: Any
    take_over: Any
    mark_sent: Any
    select_claim: Any
    select_last: Any
    insert_revoked: Any
    select_revoked: Any


def _prepare_control(conn: Connection) -> _ControlStatements:
    from cassandra import ConsistencyLevel

    ks = conn.ks
    statements = _ControlStatements(**conn.prepare_all({
        "claim": f"INSERT INTO {ks}.schedule_fires (schedule, due_ms, claimer, claimed_ms) "
        "VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?",
        "take_over": f"UPDATE {ks}.schedule_fires USING TTL ? SET claimer = ?, claimed_ms = ? "
        "WHERE schedule = ? AND due_ms = ? IF claimer = ? AND sent = null",
        "mark_sent": f"UPDATE {ks}.schedule_fires USING TTL ? SET sent = true "
        "WHERE schedule = ? AND due_ms = ?",
        "select_claim": f"SELECT claimer, claimed_ms, sent FROM {ks}.schedule_fires "
        "WHERE schedule = ? AND due_ms = ?",
        "select_last": f"SELECT due_ms FROM {ks}.schedule_fires WHERE schedule = ? LIMIT 1",
        "insert_revoked": f"INSERT INTO {ks}.revoked_tasks (task_id, revoked_ms, terminate) "
        "VALUES (?, ?, ?) USING TTL ?",
        "select_revoked": f"SELECT task_id, terminate FROM {ks}.revoked_tasks "
        "WHERE task_id IN ?",
    }))
    serial = ConsistencyLevel.name_to_value[conn.options.serial_consistency]
    statements.claim.serial_consistency_level = serial
    statements.take_over.serial_consistency_level = serial
    # a read that sees every claim decided so far (a takeover is decided by the LWT anyway)
    statements.select_claim.consistency_level = serial
    return statements


def _claim(row: dict[str, Any]) -> FireClaim:
    return FireClaim(row["claimer"], row.get("claimed_ms") or 0, bool(row.get("sent")))


class ControlStore:
    """Schedule claims and revoked ids (the control half of :class:`CassandraBackend`)."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    def _execute(self, name: str, params: tuple[Any, ...], action: str) -> list[dict[str, Any]]:
        session, statements = self._conn.prepared("control", _prepare_control)
        try:
            return list(session.execute(getattr(statements, name), params))
        except Exception as err:
            raise self._conn.error(err, action) from err

    def claim_fire(self, schedule: str, due_ms: int, claimer: str, ttl_s: int) -> FireClaim:
        """Claim a due time by ``INSERT ... IF NOT EXISTS``; return the claim holding it."""
        now = now_ms()
        rows = self._execute("claim", (schedule, due_ms, claimer, now, ttl_s),
                             f"claiming {schedule} at {due_ms}")
        row = rows[0]
        if row["[applied]"]:
            return FireClaim(claimer, now)
        return _claim(row)

    def fire_claim(self, schedule: str, due_ms: int) -> FireClaim | None:
        """Return the claim of a due time, or None."""
        rows = self._execute("select_claim", (schedule, due_ms),
                             f"reading the claim of {schedule} at {due_ms}")
        return _claim(rows[0]) if rows else None

    def take_over_fire(
        self, schedule: str, due_ms: int, claimer: str, previous: str, ttl_s: int
    ) -> bool:
        """Take an unsent due time over from ``previous`` (``UPDATE ... IF``)."""
        rows = self._execute("take_over", (ttl_s, claimer, now_ms(), schedule, due_ms, previous),
                             f"taking over {schedule} at {due_ms}")
        return bool(rows[0]["[applied]"])

    def fire_sent(self, schedule: str, due_ms: int, ttl_s: int) -> None:
        """Mark a due time's task confirmed sent."""
        self._execute("mark_sent", (ttl_s, schedule, due_ms),
                      f"marking {schedule} at {due_ms} sent")

    def last_fire(self, schedule: str) -> int | None:
        """Return the newest claimed due time of ``schedule``, or None."""
        rows = self._execute("select_last", (schedule,), f"reading the last due time of {schedule}")
        return int(rows[0]["due_ms"]) if rows else None

    def store_revoked(self, task_ids: Sequence[str], terminate: bool, ttl_s: int) -> None:
        """Write a row per revoked id, with a TTL."""
        now = now_ms()
        for task_id in task_ids:
            self._execute("insert_revoked", (task_id, now, terminate, ttl_s),
                          f"revoking {task_id}")

    def revoked(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Return which of ``task_ids`` are revoked, with their ``terminate`` flags."""
        found: dict[str, bool] = {}
        for start in range(0, len(task_ids), 100):
            rows = self._execute("select_revoked", (list(task_ids[start:start + 100]),),
                                 "reading revoked ids")
            found.update({row["task_id"]: bool(row["terminate"]) for row in rows})
        return found
