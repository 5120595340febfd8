"""``streamtasks purge``: Celery's purge, deleting the task records a queue holds.

The module is not named ``purge``: ``streamtasks.ops.purge`` is the dead-letter function.

Kafka cannot remove single records: the task topic's records are deleted up to each
partition's high watermark (DeleteRecords), so tasks sent after the look-up are kept.
Delay tiers and dead letters are left alone (``dlq purge`` empties the latter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from streamtasks.ops._common import partition_ranges

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.ops")


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What a purge deleted.

    Attributes:
        topic: the queue's task topic.
        deleted: records deleted.
        waiting: of those, how many the queue's group had not committed (not yet run).
    """

    topic: str
    deleted: int
    waiting: int


def waiting_records(app: App, queue: str) -> PurgeReport:
    """Return what :func:`purge_queue` would delete now, deleting nothing.

    Raises:
        BrokerError: the task topic does not exist or the broker did not answer.
    """
    topic = app.settings.topic(queue)
    ranges = partition_ranges(app, topic)
    committed = app.broker.group_offsets(app.settings.group_id(queue))
    deleted = waiting = 0
    for tp, (low, high) in ranges.items():
        deleted += high - low
        waiting += high - max(low, committed.get(tp, low))
    return PurgeReport(topic, deleted, waiting)


def purge_queue(app: App, queue: str) -> PurgeReport:
    """Delete every record of ``queue``'s task topic up to each partition's end.

    Raises:
        BrokerError: the task topic does not exist or the records could not be deleted.
    """
    topic = app.settings.topic(queue)
    ranges = partition_ranges(app, topic)
    committed = app.broker.group_offsets(app.settings.group_id(queue))
    app.broker.delete_records({tp: high for tp, (low, high) in ranges.items() if high > low})
    deleted = sum(high - low for low, high in ranges.values())
    waiting = sum(high - max(low, committed.get(tp, low)) for tp, (low, high) in ranges.items())
    log.info("queue purged", queue=queue, deleted=deleted, waiting=waiting)
    return PurgeReport(topic, deleted, waiting)
