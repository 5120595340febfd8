"""``streamtasks topics list / alter``: the queues of a namespace and their partition counts.

A queue is its task topic ``{ns}.{q}``, one topic per delay tier and a dead-letter topic.
They must keep one partition count: a forwarded or dead-lettered record keeps its
partition number, so growing a queue grows all of its topics together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamtasks.errors import BrokerError, StreamTasksError
from streamtasks.ops.inspect import PartitionLag, lag_of_group, queues_of_topics

if TYPE_CHECKING:
    from streamtasks.app import App


class ShrinkRefused(StreamTasksError):
    """A partition count below the current one was asked for (Kafka cannot shrink)."""


@dataclass(slots=True)
class QueueTopics:
    """What ``topics list`` shows of one queue."""

    queue: str
    topic: str
    partitions: int
    group: str
    lag: list[PartitionLag]

    @property
    def lag_total(self) -> int:
        """Records of the task topic its group has not committed yet."""
        return sum(p.lag for p in self.lag)


def list_queue_topics(app: App) -> list[QueueTopics]:
    """Return every queue of the app's namespace found on the broker, sorted by name.

    Raises:
        BrokerError: the broker did not answer.
    """
    settings, broker = app.settings, app.broker
    found = []
    for queue in queues_of_topics(settings, broker.list_topics()):
        topic, group = settings.topic(queue), settings.group_id(queue)
        found.append(QueueTopics(queue, topic, broker.partition_count(topic), group,
                                 lag_of_group(broker, group, topic)))
    return found


def grow_queue(app: App, queue: str, partitions: int) -> dict[str, tuple[int, int]]:
    """Grow every topic of ``queue`` (task topic, delay tiers, DLQ) to ``partitions``.

    A topic of the queue that is missing is created with ``partitions``; one that has
    that many already is left alone.

    Returns:
        Per topic, (partitions before, partitions after); 0 before: it was created.

    Raises:
        ShrinkRefused: a topic of the queue already has more than ``partitions``.
        BrokerError: the task topic does not exist, or the broker refused.
    """
    broker = app.broker
    specs = app.topic_specs(queue, partitions)
    main = app.settings.topic(queue)
    before = {s.name: broker.partition_count(s.name) if broker.topic_exists(s.name) else 0
              for s in specs}
    if not before[main]:
        raise BrokerError(f"queue {queue} has no topic {main}; create it with "
                          f"streamtasks topics create --queue {queue} --partitions {partitions}")
    larger = {name: n for name, n in before.items() if n > partitions}
    if larger:
        listed = ", ".join(f"{name} has {n}" for name, n in larger.items())
        raise ShrinkRefused(f"cannot shrink queue {queue} to {partitions} partitions "
                            f"({listed}); Kafka can only add partitions")
    missing = [s for s in specs if not before[s.name]]
    broker.create_topics(missing)
    for spec in specs:
        if 0 < before[spec.name] < partitions:
            broker.add_partitions(spec.name, partitions)
    return {s.name: (before[s.name], broker.partition_count(s.name)) for s in specs}
