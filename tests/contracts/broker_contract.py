"""The broker contract: every Broker implementation must pass these tests.

A subclass provides ``make_broker(settings)`` and may override ``topic_name()`` and
``timeout_s``; pytest collects the subclass (named ``Test...``), never this base.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import pytest

from streamtasks.broker.base import Broker, Consumer, Record, TopicPartition, TopicSpec
from streamtasks.errors import BrokerError, MessageTooLargeError
from streamtasks.settings import Settings

#: The max_message_bytes of brokers under test (small, so the limit test is cheap).
LIMIT_BYTES = 256 * 1024


class Listener:
    """Records rebalance events; may run a hook before a revocation is recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[TopicPartition]]] = []
        self.before_revoke: Callable[[list[TopicPartition]], None] | None = None
        self.after_assign: Callable[[list[TopicPartition]], None] | None = None

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        self.events.append(("assign", list(partitions)))
        if self.after_assign is not None:
            self.after_assign(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        if self.before_revoke is not None:
            self.before_revoke(partitions)
        self.events.append(("revoke", list(partitions)))

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.events.append(("lost", list(partitions)))


class Member:
    """A consumer under test with its listener and everything it has read."""

    def __init__(self, consumer: Consumer, listener: Listener) -> None:
        self.consumer = consumer
        self.listener = listener
        self.records: list[Record] = []

    def poll(self, timeout_s: float = 0.2) -> list[Record]:
        got = self.consumer.poll(timeout_s, 500)
        self.records.extend(got)
        return got

    def progress(self) -> dict[TopicPartition, int]:
        """Offset of the next record to read, per partition this member has read from."""
        done: dict[TopicPartition, int] = {}
        for r in self.records:
            done[r.tp] = max(done.get(r.tp, 0), r.offset + 1)
        return done


class BrokerContract(ABC):
    #: Bound of every wait for records or assignments.
    timeout_s: float = 30.0

    @abstractmethod
    def make_broker(self, settings: Settings) -> Broker:
        """Return a fresh broker built with ``settings``."""

    def topic_name(self) -> str:
        return f"contract.{uuid.uuid4().hex[:12]}"

    # -- fixtures and helpers ------------------------------------------------------------

    @pytest.fixture
    def broker(self) -> Iterator[Broker]:
        broker = self.make_broker(Settings(max_message_bytes=LIMIT_BYTES, partitions=3))
        self._members: list[Member] = []
        yield broker
        for member in self._members:
            with contextlib.suppress(BrokerError):
                member.consumer.close()
        broker.close()

    def new_topic(
        self, broker: Broker, partitions: int, config: dict[str, str] | None = None
    ) -> str:
        name = self.topic_name()
        assert broker.create_topics([TopicSpec(name, partitions, 1, config or {})]) == [name]
        return name

    def join(self, broker: Broker, group: str, topics: Sequence[str]) -> Member:
        listener = Listener()
        member = Member(broker.consumer(group, topics, listener), listener)
        self._members.append(member)
        return member

    def poll_until(self, members: Sequence[Member], done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {self.timeout_s}s waiting for {what}")
            for member in members:
                member.poll(0.1)

    def send_all(self, broker: Broker, topic: str, items: Sequence[dict[str, object]]) -> None:
        reports: list[str | None] = []
        for item in items:
            broker.send(topic, on_delivery=reports.append, **item)  # type: ignore[arg-type]
        assert broker.flush(self.timeout_s) == 0
        broker.poll(0)
        assert reports == [None] * len(items)

    @staticmethod
    def group() -> str:
        return f"contract-group.{uuid.uuid4().hex[:12]}"

    # -- producing and consuming ---------------------------------------------------------

    def test_send_confirm_and_consume_in_partition_order(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 3)
        items: list[dict[str, object]] = [
            {"value": f"v{i}".encode(), "key": f"k{i % 4}".encode(), "headers": {"n": b"%d" % i}}
            for i in range(30)
        ]
        self.send_all(broker, topic, items)

        member = self.join(broker, self.group(), [topic])
        self.poll_until([member], lambda: len(member.records) >= 30, "30 records")

        assert len(member.records) == 30
        for p in range(3):
            in_partition = [r for r in member.records if r.partition == p]
            offsets = [r.offset for r in in_partition]
            assert offsets == sorted(offsets) == list(range(len(offsets)))
            numbers = [int(r.headers["n"]) for r in in_partition]
            assert numbers == sorted(numbers)  # send order kept within a partition
        for r in member.records:
            n = int(r.headers["n"])
            assert r.topic == topic
            assert r.value == f"v{n}".encode()
            assert r.key == f"k{n % 4}".encode()
            assert r.headers == {"n": b"%d" % n}

    def test_same_key_same_partition_and_explicit_partition(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 4)
        keyed: list[dict[str, object]] = [
            {"value": b"x", "key": f"key-{i % 5}".encode()} for i in range(25)
        ]
        pinned: list[dict[str, object]] = [
            {"value": b"pinned", "key": b"key-0", "partition": 3} for _ in range(3)
        ]
        self.send_all(broker, topic, keyed + pinned)

        member = self.join(broker, self.group(), [topic])
        self.poll_until([member], lambda: len(member.records) >= 28, "28 records")

        by_key: dict[bytes | None, set[int]] = {}
        for r in member.records:
            if r.value == b"x":
                by_key.setdefault(r.key, set()).add(r.partition)
        assert len(by_key) == 5
        assert all(len(parts) == 1 for parts in by_key.values())
        assert {r.partition for r in member.records if r.value == b"pinned"} == {3}

    def test_create_topics_is_idempotent(self, broker: Broker) -> None:
        name = self.topic_name()
        spec = TopicSpec(name, 4, 1, {"retention.ms": "3600000"})
        assert broker.create_topics([spec]) == [name]
        assert broker.create_topics([spec]) == []
        assert broker.partition_count(name) == 4
        assert broker.watermarks(TopicPartition(name, 0)) == (0, 0)
        with pytest.raises(BrokerError):
            broker.partition_count(self.topic_name())

    def test_message_too_large_is_refused_and_nothing_sent(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 1, {"max.message.bytes": str(2 * LIMIT_BYTES)})
        reports: list[str | None] = []
        with pytest.raises(MessageTooLargeError, match="max_message_bytes") as caught:
            broker.send(topic, b"x" * (LIMIT_BYTES + 1), on_delivery=reports.append)
        assert str(LIMIT_BYTES) in str(caught.value)
        assert str(LIMIT_BYTES + 1) in str(caught.value)
        assert broker.flush(self.timeout_s) == 0
        assert reports == []
        assert broker.watermarks(TopicPartition(topic, 0)) == (0, 0)

        # Exactly the limit goes through, and comes back whole.
        value = os.urandom(LIMIT_BYTES)
        self.send_all(broker, topic, [{"value": value, "headers": {"h": b"1"}}])
        member = self.join(broker, self.group(), [topic])
        self.poll_until([member], lambda: len(member.records) >= 1, "the largest record")
        assert member.records[0].value == value

    # -- committing and positioning ------------------------------------------------------

    def test_commit_then_new_member_resumes_from_committed_offset(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 1)
        tp = TopicPartition(topic, 0)
        self.send_all(broker, topic, [{"value": b"%d" % i} for i in range(10)])
        group = self.group()

        first = self.join(broker, group, [topic])
        self.poll_until([first], lambda: len(first.records) >= 5, "5 records")
        assert first.consumer.committed([tp]) == {tp: None}
        first.consumer.commit({tp: 5}, asynchronous=False)
        assert first.consumer.committed([tp]) == {tp: 5}
        first.consumer.close()

        second = self.join(broker, group, [topic])
        self.poll_until([second], lambda: len(second.records) >= 5, "5 records")
        assert [r.offset for r in second.records] == [5, 6, 7, 8, 9]
        assert [r.value for r in second.records] == [b"%d" % i for i in range(5, 10)]

    def test_pause_holds_one_partition_while_others_flow(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 2)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        member = self.join(broker, self.group(), [topic])
        self.poll_until([member], lambda: len(member.consumer.assignment()) == 2, "assignment")

        member.consumer.pause([tp0])
        items: list[dict[str, object]] = [
            {"value": b"%d" % i, "partition": i % 2} for i in range(10)
        ]
        self.send_all(broker, topic, items)
        self.poll_until([member], lambda: len(member.records) >= 5, "records of partition 1")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            member.poll(0.1)
        assert {r.tp for r in member.records} == {tp1}
        assert len(member.records) == 5

        member.consumer.resume([tp0])
        self.poll_until([member], lambda: len(member.records) >= 10, "records of partition 0")
        assert [r.offset for r in member.records if r.tp == tp0] == [0, 1, 2, 3, 4]

    def test_a_partition_paused_then_revoked_comes_back_unpaused(self, broker: Broker) -> None:
        # librdkafka keeps an application pause on a partition across revoke and
        # re-assignment; a worker full during a rebalance then never read it again.
        topic = self.new_topic(broker, 2)
        everything = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        group = self.group()
        first = self.join(broker, group, [topic])
        self.poll_until([first], lambda: first.consumer.assignment() == everything, "assignment")

        # Given a member that read 5 records of each partition, committed 2 of each, paused all
        self.send_all(broker, topic, [{"value": b"%d" % i, "partition": i % 2} for i in range(10)])
        self.poll_until([first], lambda: len(first.records) >= 10, "10 records")
        first.consumer.commit({tp: 2 for tp in everything}, asynchronous=False)
        first.consumer.pause(everything)
        # When a second member takes one of them and leaves, so that it comes back
        second = self.join(broker, group, [topic])
        self.poll_until([first, second], lambda: bool(second.consumer.assignment()),
                        "the second member's partition")
        moved = second.consumer.assignment()
        second.consumer.close()
        self.poll_until([first], lambda: first.consumer.assignment() == everything,
                        "the partition back")

        # Then the partition that came back is read again from its committed offset, without
        # a resume; the other stays paused
        self.send_all(broker, topic, [{"value": b"%d" % i, "partition": i % 2}
                                      for i in range(10, 20)])
        self.poll_until([first], lambda: len(first.records) >= 18, "the returned partition")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            first.poll(0.1)
        again = first.records[10:]
        assert {r.tp for r in again} == set(moved)
        assert [r.offset for r in again] == list(range(2, 10))

    def test_seek_rereads_from_offset(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 1)
        tp = TopicPartition(topic, 0)
        self.send_all(broker, topic, [{"value": b"%d" % i} for i in range(5)])
        member = self.join(broker, self.group(), [topic])
        self.poll_until([member], lambda: len(member.records) >= 5, "5 records")

        member.consumer.seek(tp, 2)
        self.poll_until([member], lambda: len(member.records) >= 8, "3 records again")
        assert [r.offset for r in member.records] == [0, 1, 2, 3, 4, 2, 3, 4]

    def test_seek_and_pause_inside_on_assign(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 2)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        self.send_all(broker, topic, [{"value": b"%d" % i, "partition": i % 2} for i in range(10)])
        member = self.join(broker, self.group(), [topic])

        def position_new(partitions: list[TopicPartition]) -> None:
            assert set(partitions) <= set(member.consumer.assignment())
            member.consumer.seek(tp0, 3)
            member.consumer.pause([tp1])

        member.listener.after_assign = position_new
        self.poll_until([member], lambda: len(member.records) >= 2, "2 records of partition 0")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            member.poll(0.1)
        assert [(r.partition, r.offset) for r in member.records] == [(0, 3), (0, 4)]
        member.consumer.resume([tp1])
        self.poll_until([member], lambda: len(member.records) >= 7, "records of partition 1")
        assert [r.offset for r in member.records if r.tp == tp1] == [0, 1, 2, 3, 4]

    # -- groups --------------------------------------------------------------------------

    def test_two_members_split_partitions_and_read_each_record_once(self, broker: Broker) -> None:
        topic = self.new_topic(broker, 4)
        group = self.group()
        a = self.join(broker, group, [topic])
        b = self.join(broker, group, [topic])

        def split() -> bool:
            mine, theirs = set(a.consumer.assignment()), set(b.consumer.assignment())
            return bool(mine) and bool(theirs) and not mine & theirs and len(mine | theirs) == 4

        self.poll_until([a, b], split, "a split of 4 partitions")
        self.send_all(broker, topic, [{"value": b"%d" % i, "partition": i % 4} for i in range(40)])
        self.poll_until([a, b], lambda: len(a.records) + len(b.records) >= 40, "40 records")

        values = sorted(int(r.value or b"") for r in a.records + b.records)
        assert values == list(range(40))
        assert a.records and b.records
        assert {r.tp for r in a.records}.isdisjoint({r.tp for r in b.records})

    def test_rebalance_revokes_before_assigning_and_commit_on_revoke_hands_over(
        self, broker: Broker
    ) -> None:
        topic = self.new_topic(broker, 4)
        everything = [TopicPartition(topic, p) for p in range(4)]
        group = self.group()

        # Given a lone member that read 20 records and commits its progress on revoke
        first = self.join(broker, group, [topic])

        def commit_progress(partitions: list[TopicPartition]) -> None:
            progress = first.progress()
            offsets = {tp: progress[tp] for tp in partitions if tp in progress}
            first.consumer.commit(offsets, asynchronous=False)

        first.listener.before_revoke = commit_progress
        self.poll_until(
            [first], lambda: first.consumer.assignment() == everything, "all 4 partitions"
        )
        self.send_all(broker, topic, [{"value": b"%d" % i, "partition": i % 4} for i in range(20)])
        self.poll_until([first], lambda: len(first.records) >= 20, "20 records")
        assert first.listener.events == [("assign", everything)]

        # When a second member joins
        second = self.join(broker, group, [topic])
        self.poll_until(
            [first, second],
            lambda: len(first.consumer.assignment()) + len(second.consumer.assignment()) == 4
            and bool(second.consumer.assignment()),
            "the second member's partitions",
        )

        # Then the first gave up exactly what the second got, having committed it first
        moved = second.consumer.assignment()
        assert first.listener.events == [("assign", everything), ("revoke", moved)]
        assert second.listener.events == [("assign", moved)]
        assert sorted(set(first.consumer.assignment()) | set(moved)) == everything
        assert second.consumer.committed(moved) == {tp: 5 for tp in moved}

        # And nothing is read twice, new records are read once
        more: list[dict[str, object]] = [
            {"value": b"%d" % i, "partition": i % 4} for i in range(20, 40)
        ]
        self.send_all(broker, topic, more)
        self.poll_until(
            [first, second], lambda: len(first.records) + len(second.records) >= 40, "40 records"
        )
        values = sorted(int(r.value or b"") for r in first.records + second.records)
        assert values == list(range(40))

        # When the second leaves, the first gets its partitions back
        second.consumer.close()
        assert second.listener.events == [("assign", moved), ("revoke", moved)]
        self.poll_until(
            [first], lambda: first.consumer.assignment() == everything, "all 4 partitions back"
        )
        assert first.listener.events[-1] == ("assign", moved)
