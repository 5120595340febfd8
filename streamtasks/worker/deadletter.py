"""Dead letters: a record that cannot succeed, kept whole with the reason."""

from __future__ import annotations

import time
import traceback as tb

from streamtasks.broker.base import Record
from streamtasks.headers import ATTEMPT, TASK_ID, TASK_NAME
from streamtasks.worker.outcomes import error_text, safe_text

REASON = "dlq-reason"
ERROR_TYPE = "dlq-error-type"
ERROR_MESSAGE = "dlq-error-message"
TRACEBACK = "dlq-traceback"
ORIGINAL_TOPIC = "dlq-original-topic"
ORIGINAL_PARTITION = "dlq-original-partition"
ORIGINAL_OFFSET = "dlq-original-offset"
ORIGINAL_TIMESTAMP = "dlq-original-timestamp-ms"
CONSUMER_GROUP = "dlq-consumer-group"
DEAD_AT = "dlq-time-ms"

_ORIGINAL = (ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET, ORIGINAL_TIMESTAMP)
_MAX_TRACEBACK = 16_000


def dead_letter_headers(
    record: Record, reason: str, error: BaseException, group_id: str
) -> dict[str, bytes]:
    """Return the headers of a dead-letter record made from ``record``.

    The task headers are kept; the first ``dlq-original-*`` set is kept when the
    record was already dead-lettered once (requeued and failed again); the error
    headers always describe the latest failure.
    """
    headers = dict(record.headers)
    if ORIGINAL_TOPIC not in headers:
        headers[ORIGINAL_TOPIC] = record.topic.encode()
        headers[ORIGINAL_PARTITION] = str(record.partition).encode()
        headers[ORIGINAL_OFFSET] = str(record.offset).encode()
        headers[ORIGINAL_TIMESTAMP] = str(record.timestamp_ms).encode()
    trace = safe_text("".join(tb.format_exception(error))[-_MAX_TRACEBACK:], _MAX_TRACEBACK)
    headers.update(
        {
            REASON: reason.encode(),
            ERROR_TYPE: type(error).__name__.encode(),
            ERROR_MESSAGE: error_text(error).encode(),
            TRACEBACK: trace.encode(),
            CONSUMER_GROUP: group_id.encode(),
            DEAD_AT: str(time.time_ns() // 1_000_000).encode(),
        }
    )
    headers.setdefault(ATTEMPT, b"1")
    return headers


__all__ = [
    "ATTEMPT",
    "CONSUMER_GROUP",
    "DEAD_AT",
    "ERROR_MESSAGE",
    "ERROR_TYPE",
    "ORIGINAL_OFFSET",
    "ORIGINAL_PARTITION",
    "ORIGINAL_TIMESTAMP",
    "ORIGINAL_TOPIC",
    "REASON",
    "TASK_ID",
    "TASK_NAME",
    "TRACEBACK",
    "dead_letter_headers",
]
