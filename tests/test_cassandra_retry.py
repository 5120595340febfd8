"""A timed-out write is retried only when writing it again is harmless."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cassandra import ConsistencyLevel
from cassandra.policies import RetryPolicy, WriteType

from streamtasks.backend.cassandra.retry import UpsertRetryPolicy

QUORUM = ConsistencyLevel.LOCAL_QUORUM


def timeout(idempotent: bool, write_type: int, retry_num: int = 0) -> tuple[int, int | None]:
    return UpsertRetryPolicy().on_write_timeout(
        SimpleNamespace(is_idempotent=idempotent), QUORUM, write_type, 2, 1, retry_num)


@pytest.mark.parametrize("write_type", [WriteType.SIMPLE, WriteType.UNLOGGED_BATCH])
def test_a_timed_out_upsert_is_retried_once_on_the_next_host(write_type: int) -> None:
    assert timeout(True, write_type) == (RetryPolicy.RETRY_NEXT_HOST, QUORUM)
    assert timeout(True, write_type, retry_num=1)[0] == RetryPolicy.RETHROW


def test_a_timed_out_lightweight_transaction_is_not_retried_by_the_driver() -> None:
    # the claim may have been applied: the caller claims again, which reads it back
    assert timeout(True, WriteType.CAS)[0] == RetryPolicy.RETHROW
    assert timeout(False, WriteType.CAS)[0] == RetryPolicy.RETHROW


def test_a_timed_out_write_not_marked_idempotent_is_not_retried() -> None:
    assert timeout(False, WriteType.SIMPLE)[0] == RetryPolicy.RETHROW


def test_unavailable_is_not_a_timeout_nothing_was_written_so_the_next_host_is_tried() -> None:
    decision = UpsertRetryPolicy().on_unavailable(
        SimpleNamespace(is_idempotent=False), QUORUM, 2, 1, 0)
    assert decision == (RetryPolicy.RETRY_NEXT_HOST, None)


def test_prepared_statements_are_idempotent_except_lightweight_transactions() -> None:
    from streamtasks.backend.cassandra.connection import CassandraOptions, Connection
    from streamtasks.settings import Settings

    conn = Connection(CassandraOptions.from_url("cassandra://127.0.0.1:1/ks", Settings()))
    prepared: list[SimpleNamespace] = []

    def prepare(text: str) -> SimpleNamespace:
        prepared.append(SimpleNamespace(text=text))
        return prepared[-1]

    conn._session = SimpleNamespace(prepare=prepare)
    statements = conn.prepare_all({
        "upsert": "INSERT INTO ks.t (k, v) VALUES (?, ?) USING TTL ?",
        "claim": "INSERT INTO ks.g (k, c) VALUES (?, ?) IF NOT EXISTS USING TTL ?",
        "settle": "UPDATE ks.g SET s = true WHERE k = ? IF EXISTS",
    })
    assert statements["upsert"].is_idempotent is True
    assert statements["claim"].is_idempotent is False
    assert statements["settle"].is_idempotent is False
