"""An in-process partitioned log with consumer groups, for unit tests and ``memory://``.

It keeps Kafka's shape where the library depends on it: records are keyed to partitions,
offsets grow per partition, a group's committed offsets outlive its consumers, partitions
are split among the members of a group and handed over only after the old owner's
``on_revoke`` returned. It is no proof that the Kafka path works.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from streamtasks.broker.base import (
    Broker,
    Consumer,
    DeliveryCallback,
    RebalanceListener,
    Record,
    TopicPartition,
    TopicSpec,
)
from streamtasks.errors import BrokerError, MessageTooLargeError
from streamtasks.settings import Settings

DEFAULT_PARTITIONS = 3


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class MemoryBroker(Broker):
    """A thread-safe in-memory broker.

    Args:
        settings: topics auto-created on send get ``settings.partitions`` partitions
            (3 without settings); ``settings.max_message_bytes`` is enforced.

    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.default_partitions = settings.partitions if settings else DEFAULT_PARTITIONS
        if settings is not None:
            self.max_message_bytes = settings.max_message_bytes
        self._cond = threading.Condition(threading.RLock())
        self._topics: dict[str, list[list[Record]]] = {}
        self._specs: dict[str, TopicSpec] = {}
        self._round_robin: dict[str, int] = {}
        self._groups: dict[str, _Group] = {}
        self._reports: deque[tuple[DeliveryCallback, str | None]] = deque()
        self._failures: deque[str] = deque()
        self._failing_commits = 0
        # Low watermarks moved by delete_records; records below stay in the lists (so
        # an offset stays a list index) but are never read again.
        self._low: dict[TopicPartition, int] = {}

    def fail_next_commits(self, count: int) -> None:
        """Make the next ``count`` offset commits (of any group) fail (for tests)."""
        with self._cond:
            self._failing_commits += count

    def fail_next_sends(self, count: int, reason: str = "simulated delivery failure") -> None:
        """Make the next ``count`` sends fail: not stored, reported with ``reason``."""
        with self._cond:
            self._failures.extend([reason] * count)

    def records(self, topic: str) -> list[Record]:
        """Return every record of ``topic``, partition by partition (for assertions)."""
        with self._cond:
            return [
                r
                for p, log in enumerate(self._topics.get(topic, []))
                for r in log[self._low.get(TopicPartition(topic, p), 0) :]
            ]

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
        """Store one record now; its delivery report is served by :meth:`poll` / :meth:`flush`.

        Raises:
            MessageTooLargeError: the value exceeds :attr:`max_message_bytes`.
            BrokerError: ``partition`` does not exist.

        """
        if len(value) > self.max_message_bytes:
            raise MessageTooLargeError(
                f"record for topic {topic!r} is {len(value)} bytes, over the limit of "
                f"{self.max_message_bytes} bytes (setting max_message_bytes); nothing was sent"
            )
        with self._cond:
            logs = self._topics.get(topic) or self._create(topic, self.default_partitions)
            if partition is None:
                partition = self._choose_partition(topic, key, len(logs))
            elif not 0 <= partition < len(logs):
                raise BrokerError(f"topic {topic!r} has no partition {partition}")
            error = self._failures.popleft() if self._failures else None
            if error is None:
                log = logs[partition]
                stamp_ms = int(time.time() * 1000)
                headers_copy = dict(headers or {})
                log.append(Record(topic, partition, len(log), key, value, headers_copy, stamp_ms))
                self._cond.notify_all()
            if on_delivery is not None:
                self._reports.append((on_delivery, error))

    def _choose_partition(self, topic: str, key: bytes | None, count: int) -> int:
        if key is not None:
            return zlib.crc32(key) % count
        turn = self._round_robin.get(topic, 0)
        self._round_robin[topic] = turn + 1
        return turn % count

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery callbacks; return how many were served."""
        served = 0
        while True:
            with self._cond:
                if not self._reports:
                    return served
                callback, error = self._reports.popleft()
            callback(error)
            served += 1

    def flush(self, timeout_s: float) -> int:
        """Serve every pending delivery callback; nothing ever remains."""
        self.poll()
        return 0

    def consumer(
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener,
        *, eager: bool = False,
    ) -> MemoryConsumer:
        """Join ``group_id``; the assignment arrives in the consumer's next ``poll``.

        A memory consumer's poll never waits for more records, so ``eager`` changes
        nothing here.
        """
        with self._cond:
            group = self._groups.setdefault(group_id, _Group())
            member = MemoryConsumer(self, group_id, group, list(topics), listener)
            group.members.append(member)
            self._cond.notify_all()
        return member

    def create_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create the topics that do not exist yet; return the names created.

        The memory broker is one broker: automatic replication is 1.
        """
        with self._cond:
            new = [s.on_cluster(1) for s in specs if s.name not in self._topics]
            for spec in new:
                self._create(spec.name, spec.partitions)
                self._specs[spec.name] = spec
            return [s.name for s in new]

    def topic_spec(self, topic: str) -> TopicSpec | None:
        """Return the spec ``topic`` was created with (None: created on send, or missing)."""
        with self._cond:
            return self._specs.get(topic)

    def _create(self, topic: str, partitions: int) -> list[list[Record]]:
        logs: list[list[Record]] = [[] for _ in range(partitions)]
        self._topics[topic] = logs
        self._cond.notify_all()  # members subscribed to it get partitions
        return logs

    def partition_count(self, topic: str) -> int:
        """Return the number of partitions of ``topic`` (BrokerError if it does not exist)."""
        with self._cond:
            if topic not in self._topics:
                raise BrokerError(f"topic {topic!r} does not exist")
            return len(self._topics[topic])

    def watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """Return the (low, high) offsets of a partition (low is 0 until records are deleted)."""
        with self._cond:
            return self._low.get(tp, 0), len(self._log(tp))

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[TopicPartition, int]:
        """Return, per partition, the first offset stamped at or after ``timestamp_ms``."""
        with self._cond:
            result = {}
            for p, log in enumerate(self._topics.get(topic, [])):
                low = self._low.get(TopicPartition(topic, p), 0)
                found = (r.offset for r in log[low:] if r.timestamp_ms >= timestamp_ms)
                result[TopicPartition(topic, p)] = next(found, len(log))
            return result

    def read(
        self, tp: TopicPartition, start: int, end: int, timeout_s: float = 30.0
    ) -> Iterator[Record]:
        """Yield the records of ``tp`` with ``start <= offset < end`` (no group, no commit).

        Raises:
            BrokerError: the partition does not exist.
        """
        with self._cond:
            log = self._log(tp)
            first = max(start, self._low.get(tp, 0), 0)
            chunk = [dataclasses.replace(r, headers=dict(r.headers)) for r in log[first:end]]
        yield from chunk

    def delete_records(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Delete, per partition, every record before the given offset (the low watermark).

        Raises:
            BrokerError: a partition does not exist or an offset is beyond its end.
        """
        with self._cond:
            for tp, offset in offsets.items():
                high = len(self._log(tp))
                if not 0 <= offset <= high:
                    raise BrokerError(f"cannot delete records of {tp} before {offset}: "
                                      f"its offsets end at {high}")
                self._low[tp] = max(self._low.get(tp, 0), offset)

    def list_topics(self) -> list[str]:
        """Return the names of every topic, sorted."""
        with self._cond:
            return sorted(self._topics)

    def add_partitions(self, topic: str, total: int) -> None:
        """Grow ``topic`` to ``total`` partitions.

        Raises:
            BrokerError: the topic does not exist or already has ``total`` or more.
        """
        with self._cond:
            logs = self._topics.get(topic)
            if logs is None:
                raise BrokerError(f"topic {topic!r} does not exist")
            if total <= len(logs):
                raise BrokerError(f"topic {topic!r} has {len(logs)} partitions; "
                                  f"cannot grow it to {total}")
            logs.extend([] for _ in range(total - len(logs)))
            if topic in self._specs:
                self._specs[topic] = dataclasses.replace(self._specs[topic], partitions=total)
            self._cond.notify_all()  # members subscribed to it get the new partitions

    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """Return the offsets ``group_id`` has committed (none for an unknown group)."""
        with self._cond:
            group = self._groups.get(group_id)
            return dict(group.committed) if group is not None else {}

    def group_member_count(self, group_id: str) -> int:
        """Return how many consumers are members of ``group_id`` now."""
        with self._cond:
            group = self._groups.get(group_id)
            return len(group.members) if group is not None else 0

    def set_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` for ``group_id``, which must have no member (as Kafka asks).

        Raises:
            BrokerError: the group has members.
        """
        with self._cond:
            group = self._groups.setdefault(group_id, _Group())
            if group.members:
                raise BrokerError(
                    f"cannot set the offsets of group {group_id!r}: it has "
                    f"{len(group.members)} active member(s)"
                )
            group.committed.update(offsets)

    def close(self) -> None:
        """Serve the pending delivery callbacks."""
        self.flush(0)

    # -- used by MemoryConsumer, under the condition's lock ------------------------------

    def _log(self, tp: TopicPartition) -> list[Record]:
        with self._cond:
            logs = self._topics.get(tp.topic)
            if logs is None or not 0 <= tp.partition < len(logs):
                raise BrokerError(f"{tp} does not exist")
            return logs[tp.partition]

    def _target(self, member: MemoryConsumer) -> set[TopicPartition]:
        """Return the partitions ``member`` should own: each split by index among members."""
        members = self._groups[member.group_id].members
        target = set()
        for topic in member.topics:
            takers = [m for m in members if topic in m.topics]
            for p in range(len(self._topics.get(topic, []))):
                if takers[p % len(takers)] is member:
                    target.add(TopicPartition(topic, p))
        return target


class MemoryConsumer(Consumer):
    """A member of a :class:`MemoryBroker` consumer group."""

    def __init__(
        self,
        broker: MemoryBroker,
        group_id: str,
        group: _Group,
        topics: list[str],
        listener: RebalanceListener,
    ) -> None:
        self.group_id = group_id
        self.topics = topics
        self._broker = broker
        self._cond = broker._cond
        self._group = group
        self._listener = listener
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._closed = False

    def _rebalance(self) -> None:
        """Give up partitions the group moved away, then take the free ones it gave us."""
        with self._cond:
            revoked = sorted(set(self._positions) - self._broker._target(self))
        if revoked:
            self._listener.on_revoke(revoked)  # still owned: it may commit them
            with self._cond:
                for tp in revoked:
                    self._positions.pop(tp, None)
                    self._paused.discard(tp)
                self._cond.notify_all()
        with self._cond:
            held = {tp for m in self._group.members if m is not self for tp in m._positions}
            added = sorted(self._broker._target(self) - set(self._positions) - held)
            for tp in added:
                self._positions[tp] = self._group.committed.get(tp, 0)
        if added:
            self._listener.on_assign(added)

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout_s``.

        Raises:
            BrokerError: the consumer is closed.

        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closed:
                raise BrokerError("consumer is closed")
            self._rebalance()
            with self._cond:
                records = self._fetch(max_records)
                remaining = deadline - time.monotonic()
                if records or remaining <= 0:
                    return records
                self._cond.wait(remaining)

    def _fetch(self, max_records: int) -> list[Record]:
        records: list[Record] = []
        for tp in sorted(self._positions):
            if tp in self._paused:
                continue
            log = self._broker._log(tp)
            # Like auto.offset.reset=earliest: a position below deleted records moves up.
            self._positions[tp] = max(self._positions[tp], self._broker._low.get(tp, 0))
            chunk = log[self._positions[tp] : self._positions[tp] + max_records - len(records)]
            records.extend(dataclasses.replace(r, headers=dict(r.headers)) for r in chunk)
            self._positions[tp] += len(chunk)
            if len(records) >= max_records:
                break
        return records

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching from these partitions."""
        with self._cond:
            self._paused.update(tp for tp in partitions if tp in self._positions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Fetch again from these partitions."""
        with self._cond:
            self._paused.difference_update(partitions)
            self._cond.notify_all()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next.

        Raises:
            BrokerError: ``tp`` is not assigned to this consumer.

        """
        with self._cond:
            if tp not in self._positions:
                raise BrokerError(f"cannot seek {tp}: not assigned to this consumer")
            self._positions[tp] = offset
            self._cond.notify_all()

    def commit(self, offsets: Mapping[TopicPartition, int], *, asynchronous: bool) -> None:
        """Store the group's offsets of the next records to read.

        An asynchronous commit is answered to the listener's ``on_commit`` at once; the
        broker's :meth:`MemoryBroker.fail_next_commits` makes commits fail.

        Raises:
            BrokerError: a synchronous commit was made to fail.
        """
        with self._cond:
            failing = self._broker._failing_commits > 0
            if failing:
                self._broker._failing_commits -= 1
            else:
                self._group.committed.update(offsets)
        if not asynchronous:
            if failing:
                raise BrokerError("simulated commit failure")
            return
        on_commit = getattr(self._listener, "on_commit", None)
        if on_commit is not None:
            if failing:
                on_commit({}, dict(offsets), "simulated commit failure")
            else:
                on_commit(dict(offsets), {}, None)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Return the group's committed offsets (None where nothing is committed)."""
        with self._cond:
            return {tp: self._group.committed.get(tp) for tp in partitions}

    def assignment(self) -> list[TopicPartition]:
        """Return the partitions currently assigned to this consumer."""
        with self._cond:
            return sorted(self._positions)

    def close(self) -> None:
        """Revoke what this consumer owns (``on_revoke`` runs) and leave the group."""
        if self._closed:
            return
        self._closed = True
        owned = self.assignment()
        if owned:
            self._listener.on_revoke(owned)
        with self._cond:
            self._positions.clear()
            self._group.members.remove(self)
            self._cond.notify_all()
