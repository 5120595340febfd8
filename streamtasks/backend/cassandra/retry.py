"""How the driver retries a statement that a Cassandra node could not complete.

The driver's default policy retries a read that timed out with enough replicas, and an
``Unavailable`` once on the next host (another coordinator may see more live replicas),
but never a write that timed out: such a write may or may not have been applied.
Every write of this backend but the chord claims is an upsert of fixed values
(statements marked ``is_idempotent``, see :meth:`Connection.prepare_all`): writing it
again is harmless, so :class:`UpsertRetryPolicy` retries it once on the next host. A
lightweight transaction that timed out (write type ``CAS``) is not retried here: its
caller claims again with the same arguments, which reads the outcome back
(:meth:`GroupStore.claim_group`).
"""

from __future__ import annotations

from typing import Any

from cassandra.policies import RetryPolicy, WriteType


class UpsertRetryPolicy(RetryPolicy):  # type: ignore[misc]
    """The driver's :class:`RetryPolicy`, plus one retry of a timed-out idempotent write."""

    def on_write_timeout(
        self, query: Any, consistency: int, write_type: Any, required_responses: int,
        received_responses: int, retry_num: int,
    ) -> tuple[int, int | None]:
        """Retry a timed-out idempotent plain write once, on the next host; else the default.

        ``Unavailable`` (too few replicas alive to try) is a different answer, handled by
        :meth:`RetryPolicy.on_unavailable`: nothing was written then.
        """
        if (retry_num == 0 and write_type in (WriteType.SIMPLE, WriteType.UNLOGGED_BATCH)
                and getattr(query, "is_idempotent", False)):
            return self.RETRY_NEXT_HOST, consistency
        decision: tuple[int, int | None] = super().on_write_timeout(
            query, consistency, write_type, required_responses, received_responses, retry_num)
        return decision
