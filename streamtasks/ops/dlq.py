"""Dead-letter tooling: list, requeue and purge a queue's dead-letter topic.

A dead-letter record keeps the original bytes and says why in its headers (see
``streamtasks.worker.deadletter``), so listing needs no decoding and works on records
whose value is not a task at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from streamtasks.app import App
from streamtasks.broker.base import Record
from streamtasks.errors import BrokerError, MessageError
from streamtasks.headers import ATTEMPT, TASK_ID, TASK_NAME, header_text
from streamtasks.ops._common import (
    Progress,
    Resender,
    partition_ranges,
    read_ranges,
    run_again,
)
from streamtasks.worker.deadletter import (
    DEAD_AT,
    ERROR_MESSAGE,
    ERROR_TYPE,
    ORIGINAL_OFFSET,
    ORIGINAL_PARTITION,
    ORIGINAL_TIMESTAMP,
    ORIGINAL_TOPIC,
    REASON,
)

log = structlog.get_logger("streamtasks.ops")

_CARRIED = (ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET, ORIGINAL_TIMESTAMP)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, described from its headers.

    Attributes:
        partition: the dead-letter topic's partition.
        offset: the record's offset there.
        task_id: the task id (``st-id``), or None when the record has none.
        task_name: the task name (``st-name``), or None.
        reason: why it was dead-lettered (``unknown-task``, ``decode-error``, ...).
        error: ``"ErrorType: message"`` of the latest failure, or None.
        dead_at_ms: when it was dead-lettered (ms since the epoch), or None.
        attempt: the attempt that failed, or None.
        original_partition: the partition of the queue's topic it came from, or None.
        original_offset: its offset there, or None.
    """

    partition: int
    offset: int
    task_id: str | None
    task_name: str | None
    reason: str | None
    error: str | None
    dead_at_ms: int | None
    attempt: int | None = None
    original_partition: int | None = None
    original_offset: int | None = None

    @classmethod
    def from_record(cls, record: Record) -> DeadLetter:
        """Describe a dead-letter record from its headers (the value is not read)."""
        headers = record.headers
        error_type = header_text(headers, ERROR_TYPE)
        message = header_text(headers, ERROR_MESSAGE)
        error = f"{error_type}: {message}" if error_type and message else error_type or message
        return cls(
            partition=record.partition,
            offset=record.offset,
            task_id=header_text(headers, TASK_ID),
            task_name=header_text(headers, TASK_NAME),
            reason=header_text(headers, REASON),
            error=error,
            dead_at_ms=_header_int(record, DEAD_AT),
            attempt=_header_int(record, ATTEMPT),
            original_partition=_header_int(record, ORIGINAL_PARTITION),
            original_offset=_header_int(record, ORIGINAL_OFFSET),
        )


def _header_int(record: Record, name: str) -> int | None:
    text = header_text(record.headers, name)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def list_dead_letters(
    app: App, queue: str, limit: int = 50, *, reason: str | None = None
) -> list[DeadLetter]:
    """Return up to ``limit`` dead letters of ``queue``, oldest first.

    Args:
        app: the app (its broker and settings).
        queue: the queue whose dead-letter topic is read.
        limit: how many at most.
        reason: only those whose ``dlq-reason`` equals this (the whole topic is read).

    Raises:
        BrokerError: the dead-letter topic does not exist or the broker failed.
    """
    ranges = partition_ranges(app, app.settings.dlq_topic(queue))
    if reason is None:
        # The oldest ``limit`` overall are among the first ``limit`` of each partition.
        ranges = {tp: (low, min(high, low + limit)) for tp, (low, high) in ranges.items()}
    letters = [DeadLetter.from_record(r) for r in read_ranges(app, ranges, None)]
    if reason is not None:
        letters = [d for d in letters if d.reason == reason]
    letters.sort(key=lambda d: (d.dead_at_ms or 0, d.partition, d.offset))
    return letters[:limit]


def requeue(
    app: App,
    queue: str,
    *,
    task_id: str | None = None,
    all_: bool = False,
    reason: str | None = None,
    progress: Progress | None = None,
    on_skip: Callable[[DeadLetter, str], None] | None = None,
) -> int:
    """Send dead letters of ``queue`` back to its topic to run again; return how many.

    Each picked record is decoded, its attempt set back to 1 and its due time cleared
    (it runs now), and sent with the same id and key to the partition it came from
    (when that partition still exists), with its ``dlq-original-*`` headers, so a
    second dead-lettering keeps the first origin.
    A task id found more than once (dead-lettered, requeued, dead-lettered again) is
    sent once. The dead letters stay in the topic: :func:`purge` removes them.

    Args:
        app: the app (its broker, codec and settings).
        queue: the queue whose dead-letter topic is read.
        task_id: requeue only the dead letters of this task id.
        all_: requeue every dead letter (exactly one of ``task_id`` / ``all_``).
        reason: only those whose ``dlq-reason`` equals this.
        progress: told (records read, records to read) every 1000 records and at the end.
        on_skip: told about each picked record that cannot be decoded (and so is skipped).

    Raises:
        ValueError: both or neither of ``task_id`` and ``all_``.
        BrokerError: the dead-letter topic does not exist or the broker failed.
        SendError: some requeued records were not confirmed (naming them).
    """
    if (task_id is None) == (not all_):
        raise ValueError("requeue needs exactly one of task_id or all_=True")
    main_topic = app.settings.topic(queue)
    try:
        partitions: int | None = app.broker.partition_count(main_topic)
    except BrokerError:
        partitions = None  # created on the first send, when allowed
    ranges = partition_ranges(app, app.settings.dlq_topic(queue))
    sender = Resender(app)
    seen: set[str] = set()
    skipped = 0
    for record in read_ranges(app, ranges, progress):
        letter = DeadLetter.from_record(record)
        if reason is not None and letter.reason != reason:
            continue
        if task_id is not None and letter.task_id is not None and letter.task_id != task_id:
            continue
        try:
            msg = app.codec.decode_task(record.value or b"")
        except MessageError as err:
            skipped += 1
            if on_skip is not None:
                on_skip(letter, str(err))
            continue
        if (task_id is not None and msg.id != task_id) or msg.id in seen:
            continue
        seen.add(msg.id)
        # Runs again now, from attempt 1 (a due time would send it to a delay tier).
        run_again(msg, queue)
        original = letter.original_partition
        valid = partitions is not None and original is not None and 0 <= original < partitions
        carried = {name: record.headers[name] for name in _CARRIED if name in record.headers}
        sender.send(msg, key=record.key, partition=original if valid else None, headers=carried)
    # Confirm before reporting: a requeue that Kafka did not take must not look done.
    sender.flush()
    if skipped:
        log.warning("undecodable dead letters skipped", queue=queue, skipped=skipped)
    log.info("dead letters requeued", queue=queue, requeued=sender.sent)
    return sender.sent


def purge(app: App, queue: str) -> int:
    """Delete every dead letter of ``queue`` (up to each partition's end); return how many.

    Records dead-lettered while this runs are kept.

    Raises:
        BrokerError: the dead-letter topic does not exist or the records could not be
            deleted.
    """
    ranges = partition_ranges(app, app.settings.dlq_topic(queue))
    ends = {tp: high for tp, (low, high) in ranges.items() if high > low}
    app.broker.delete_records(ends)
    purged = sum(high - low for low, high in ranges.values())
    log.info("dead letters purged", queue=queue, purged=purged)
    return purged
