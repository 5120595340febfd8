"""The broker seam: send records, consume them as a group, commit offsets.

A broker is a partitioned log (Kafka, or the in-memory one for tests). Nothing in
this module knows Kafka's client; the Kafka specifics stay in ``broker.kafka``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

from streamtasks.errors import BrokerError
from streamtasks.replicas import AUTO, topic_replication


class TopicPartition(NamedTuple):
    """One partition of one topic.

    A named tuple, not a frozen dataclass: it keys every per-partition map of the worker's
    hot path, and its hash and construction are C-level (0.1 vs 0.5 µs a lookup, 0.6 vs
    2.1 µs built and looked up).
    """

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
    #: The record's topic partition (built once: the worker looks it up many times).
    tp: TopicPartition = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tp = TopicPartition(self.topic, self.partition)


@dataclass(slots=True)
class TopicSpec:
    """A topic to create: name, partitions, replication and topic configs.

    ``replication_factor`` and ``min_insync_replicas`` may be :data:`~streamtasks.replicas.AUTO`
    (0): a broker chooses them from its cluster when it creates the topic
    (:meth:`on_cluster`). A ``min.insync.replicas`` given in ``config`` wins.
    """

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)
    min_insync_replicas: int = AUTO

    def on_cluster(self, brokers: int) -> TopicSpec:
        """Return this spec as created on a cluster of ``brokers``: automatic values chosen.

        The result has a replication factor of at least 1 and ``min.insync.replicas`` in
        its config (:func:`~streamtasks.replicas.topic_replication`).

        Raises:
            ConfigError: ``min_insync_replicas`` is above the replication factor chosen.
        """
        replicas, insync = topic_replication(self.replication_factor,
                                             self.min_insync_replicas, brokers)
        return replace(self, replication_factor=replicas, min_insync_replicas=insync,
                       config={"min.insync.replicas": str(insync), **self.config})

    @property
    def automatic(self) -> bool:
        """Whether the replication factor is chosen from the cluster (:meth:`on_cluster`)."""
        return self.replication_factor == AUTO


#: Called once per sent record from :meth:`Broker.poll` / :meth:`Broker.flush`:
#: ``None`` when the broker confirmed it, else the error text.
DeliveryCallback = Callable[[str | None], None]


class RebalanceListener(Protocol):
    """Told about partition assignment changes, from inside :meth:`Consumer.poll`."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Partitions were added to this consumer, unpaused, at their committed offsets.

        They stay unpaused even if they were paused when they last left this consumer;
        the listener may seek or pause them here.
        """

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions are being taken away; commit their progress before returning."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions were lost (another member may own them already): do not commit."""

    def on_commit(
        self, committed: Mapping[TopicPartition, int], failed: Mapping[TopicPartition, int],
        error: str | None,
    ) -> None:
        """An asynchronous commit was answered: offsets stored, and offsets that failed.

        Called from inside :meth:`Consumer.poll`; ``error`` says why some failed.
        """


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
        """Commit, per partition, the offset of the next record to read.

        An asynchronous commit returns at once; its answer reaches the listener's
        ``on_commit`` from a later :meth:`poll`.
        """

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
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener,
        *, eager: bool = False,
    ) -> Consumer:
        """Join ``group_id`` and subscribe to ``topics``.

        ``eager``: :meth:`Consumer.poll` returns as soon as one record is there (with
        what else is already fetched), instead of waiting for ``max_records`` records or
        the timeout. Workers poll eagerly, so a lone task starts at once.
        """

    @abstractmethod
    def create_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create the topics that do not exist yet; return the names created.

        Automatic replication is chosen from the brokers serving now
        (:meth:`TopicSpec.on_cluster`).

        Raises:
            ConfigError: ``min_insync_replicas`` is above the replication chosen.
            BrokerError: the broker refused or did not answer.
        """

    @abstractmethod
    def partition_count(self, topic: str) -> int:
        """Return the number of partitions of ``topic`` (BrokerError if it does not exist)."""

    @abstractmethod
    def watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """Return the (low, high) offsets of a partition."""

    @abstractmethod
    def close(self) -> None:
        """Flush what can be flushed and release connections."""

    # -- operator tools (dead letters, replay); not used on the task path ----------------

    def topic_exists(self, topic: str) -> bool:
        """Return whether ``topic`` exists.

        This default takes any :class:`BrokerError` of :meth:`partition_count` for a
        missing topic; a broker that can tell "missing" from "unreachable" overrides it
        and raises ``BrokerError`` for the latter.
        """
        try:
            self.partition_count(topic)
        except BrokerError:
            return False
        return True

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[TopicPartition, int]:
        """Return, per partition, the first offset stamped at or after ``timestamp_ms``.

        Where no record is that new, the partition's high watermark is returned.

        Raises:
            BrokerError: the topic does not exist or the broker did not answer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot look up offsets by time")

    def read(
        self, tp: TopicPartition, start: int, end: int, timeout_s: float = 30.0
    ) -> Iterator[Record]:
        """Yield the records of ``tp`` with ``start <= offset < end``, in offset order.

        A plain read: no consumer group is joined and no offset is committed. It stops
        at ``end`` or at the partition's high watermark, whichever comes first; records
        already deleted (below the low watermark) are skipped.

        Args:
            tp: the partition to read.
            start: the first offset to read.
            end: the offset after the last one to read.
            timeout_s: the longest wait for the next record.

        Raises:
            BrokerError: the partition does not exist, or no record came within
                ``timeout_s`` although the partition holds more.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read a partition range")

    def delete_records(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Delete, per partition, every record before the given offset.

        The low watermark moves to that offset; offsets of the records kept do not change.

        Raises:
            BrokerError: the records could not be deleted.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete records")

    # -- topic administration (operator tools: ``streamtasks topics list / alter``) -------

    def list_topics(self) -> list[str]:
        """Return the names of every topic, sorted.

        Raises:
            BrokerError: the broker did not answer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list topics")

    def add_partitions(self, topic: str, total: int) -> None:
        """Grow ``topic`` to ``total`` partitions (records already there stay where they are).

        Raises:
            BrokerError: the topic does not exist, already has ``total`` or more
                partitions, or the broker refused.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot add partitions")

    # -- consumer group offsets (operator tools: ``streamtasks groups migrate``) ----------

    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """Return the offsets ``group_id`` has committed, per partition.

        Partitions without a committed offset are left out; an unknown group has none.

        Raises:
            BrokerError: the broker did not answer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list a group's offsets")

    def check_reachable(self) -> None:
        """Fail fast when no broker can be reached at all (checked once per broker object).

        A broker that needs no connection (the memory broker) is always reachable.

        Raises:
            BrokerError: naming the servers and why none answered.
        """
        return

    def drop_queued(self) -> None:
        """Drop the records queued for sending that were not handed to a broker yet.

        Each dropped record's delivery callback reports an error. Records already in
        flight cannot be recalled. A broker that confirms at once (memory) has none.
        """
        return

    def cluster_size(self) -> int | None:
        """Return how many brokers serve now, or None when unknown (durability checks).

        Raises:
            BrokerError: the broker did not answer.
        """
        return None

    def topic_replicas(self, topic: str) -> int | None:
        """Return the fewest replicas of any partition of ``topic``; None if unknown or missing.

        Raises:
            BrokerError: the broker did not answer.
        """
        return None

    def group_member_count(self, group_id: str) -> int:
        """Return how many consumers are members of ``group_id`` now (0: none or unknown).

        Raises:
            BrokerError: the broker did not answer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot describe a group")

    def set_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (the next record to read, per partition) for ``group_id``.

        The group must have no active member; it is created when unknown.

        Raises:
            BrokerError: the group has members, or the broker refused an offset.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot alter a group's offsets")
