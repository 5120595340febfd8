"""What the operator tools share: reading offset ranges, re-sending with extra headers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from streamtasks.app import App
from streamtasks.broker.base import Record, TopicPartition
from streamtasks.message import TaskMessage
from streamtasks.worker.flows import CHORD_BODY

#: Progress is reported after every this many records read (and at the end).
PROGRESS_EVERY = 1000

#: Called with (records read so far, records to read in all).
Progress = Callable[[int, int], None]


def run_again(msg: TaskMessage, queue: str) -> None:
    """Make ``msg`` run again now on ``queue``: attempt 1, no due time.

    A chord body sent again by an operator runs even though its row is final (the
    worker skips only duplicates that the chord machinery itself may send).
    """
    msg.queue, msg.attempt, msg.eta_ms = queue, 1, None
    if CHORD_BODY in msg.options:
        msg.options = {k: v for k, v in msg.options.items() if k != CHORD_BODY}


class Resender:
    """Queue task records through :meth:`App.publish` and count them; confirm at the end.

    Args:
        app: the app whose broker, codec and settings are used.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.sent = 0

    def send(
        self,
        msg: TaskMessage,
        *,
        key: bytes | None,
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> None:
        """Queue ``msg`` on its queue (see :meth:`App.publish`) with extra ``headers``."""
        self.app.publish(msg, key=key, partition=partition, headers=headers)
        self.sent += 1

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued record is confirmed.

        Raises:
            SendError: naming every record that failed or was not confirmed in time.
        """
        self.app.flush(timeout_s)


def partition_ranges(app: App, topic: str) -> dict[TopicPartition, tuple[int, int]]:
    """Return the (low, high) watermarks of every partition of ``topic``.

    Raises:
        BrokerError: the topic does not exist or the broker did not answer.
    """
    count = app.broker.partition_count(topic)
    partitions = [TopicPartition(topic, p) for p in range(count)]
    return {tp: app.broker.watermarks(tp) for tp in partitions}


def read_ranges(
    app: App, ranges: dict[TopicPartition, tuple[int, int]], progress: Progress | None
) -> Iterator[Record]:
    """Yield the records of every ``[start, end)`` range, partition after partition.

    ``progress`` is told every :data:`PROGRESS_EVERY` records and once at the end.
    """
    total = sum(max(0, end - start) for start, end in ranges.values())
    done = 0
    for tp, (start, end) in sorted(ranges.items()):
        for record in app.broker.read(tp, start, end):
            done += 1
            if progress is not None and done % PROGRESS_EVERY == 0:
                progress(done, total)
            yield record
    if progress is not None:
        progress(done, total)
