"""The broker seam: send records, consume them as a group, commit offsets.

A broker is a partitioned log (Kafka, or the in-memory one for tests). Nothing in
this module knows Kafka's client; the Kafka specifics stay in ``broker.kafka``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    """One partition of one topic."""

    topic: str
    partition: int


@dataclass(slots=True)
class Record:
    """One record read from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = 0

    @property
    def tp(self) -> TopicPartition:
        """The record's topic partition."""
        return TopicPartition(self.topic, self.partition)


@dataclass(slots=True)
class TopicSpec:
    """A topic to create: name, partitions, replication and topic configs."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


#: Called once per sent record from :meth:`Broker.poll` / :meth:`Broker.flush`:
#: ``None`` when the broker confirmed it, else the error text.
DeliveryCallback = Callable[[str | None], None]


class RebalanceListener(Protocol):
    """Told about partition assignment changes, from inside :meth:`Consumer.poll`."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Partitions were added to this consumer."""

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions are being taken away; commit their progress before returning."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions were lost (another member may own them already): do not commit."""


class Consumer(ABC):
    """A member of a consumer group; offsets are committed only when asked to."""

    @abstractmethod
    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout_s``.

        Rebalance callbacks of the listener run inside this call.
        """

    @abstractmethod
    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching from these partitions (the group membership stays)."""

    @abstractmethod
    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Fetch again from these partitions."""

    @abstractmethod
    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int], *, asynchronous: bool) -> None:
        """Commit, per partition, the offset of the next record to read."""

    @abstractmethod
    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Return the group's committed offsets (None where nothing is committed)."""

    @abstractmethod
    def assignment(self) -> list[TopicPartition]:
        """Return the partitions currently assigned to this consumer."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group (without committing anything more)."""


class Broker(ABC):
    """A partitioned log: producer side plus a factory of group consumers."""

    #: Largest record value the broker accepts, in bytes.
    max_message_bytes: int = 1_000_000

    @abstractmethod
    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Queue one record for sending and return at once.

        ``on_delivery`` is called from :meth:`poll` or :meth:`flush` when the broker
        confirmed the record or gave up on it.

        Raises:
            MessageTooLargeError: the value exceeds :attr:`max_message_bytes`.
            BrokerError: the record could not even be queued.

        """

    @abstractmethod
    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery callbacks; return how many were served."""

    @abstractmethod
    def flush(self, timeout_s: float) -> int:
        """Wait until every queued record is confirmed or failed; return how many remain."""

    @abstractmethod
    def consumer(
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener
    ) -> Consumer:
        """Join ``group_id`` and subscribe to ``topics``."""

    @abstractmethod
    def create_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create the topics that do not exist yet; return the names created."""

    @abstractmethod
    def partition_count(self, topic: str) -> int:
        """Return the number of partitions of ``topic`` (BrokerError if it does not exist)."""

    @abstractmethod
    def watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """Return the (low, high) offsets of a partition."""

    @abstractmethod
    def close(self) -> None:
        """Flush what can be flushed and release connections."""
