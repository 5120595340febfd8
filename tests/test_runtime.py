"""The partition runtime: offsets committed asynchronously, leases, revokes, pauses.

The tracker is tested on its own (``PartitionOffsets`` / ``OffsetTracker``, with a
hypothesis model of asynchronous commits answered later, failed or not), then a
:class:`PartitionRuntime` on the memory broker with a handler that only records.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtasks.broker.base import Record, TopicPartition, TopicSpec
from streamtasks.broker.memory import MemoryBroker
from streamtasks.worker.offsets import OffsetTracker, PartitionOffsets
from streamtasks.worker.runtime import Lease, PartitionRuntime

TP = TopicPartition("t", 0)
TOPIC = "t"
GROUP = "g"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


# -- PartitionOffsets / OffsetTracker: asynchronous commits -------------------------------


def test_a_sent_watermark_is_not_offered_again_until_answered() -> None:
    part = PartitionOffsets()
    for off in (0, 1, 2):
        part.add(off)
    part.mark_done(0)
    part.mark_done(1)
    assert part.watermark() == 2
    part.sent(2)
    # Sent asynchronously, not answered: not due again (no duplicate commits) ...
    assert part.watermark() is None
    # ... except for a synchronous commit (revoke, shutdown), which must not rely on it.
    assert part.watermark(resend=True) == 2
    part.committed(2)
    assert part.watermark() is None
    assert part.watermark(resend=True) is None


def test_a_failed_asynchronous_commit_makes_the_watermark_due_again() -> None:
    part = PartitionOffsets()
    part.add(7)
    part.mark_done(7)
    assert part.watermark() == 8
    part.sent(8)
    assert part.watermark() is None
    part.failed(8)
    assert part.watermark() == 8
    part.sent(8)
    part.committed(8)
    assert part.watermark() is None


def test_a_late_failure_of_an_older_commit_does_not_undo_a_newer_one() -> None:
    part = PartitionOffsets()
    for off in range(4):
        part.add(off)
    part.mark_done(0)
    assert part.watermark() == 1
    part.sent(1)
    for off in (1, 2, 3):
        part.mark_done(off)
    assert part.watermark() == 4
    part.sent(4)
    # The commit of 1 fails, the one of 4 is still on its way: nothing is due.
    part.failed(1)
    assert part.watermark() is None
    # The commit of 4 fails too: 4 is due again.
    part.failed(4)
    assert part.watermark() == 4


def test_the_tracker_confirms_committed_and_failed_partitions_apart() -> None:
    other = TopicPartition("t", 1)
    tracker = OffsetTracker()
    for tp in (TP, other):
        tracker.add(tp, 0)
        tracker.mark_done(tp, 0)
    marks = tracker.watermarks()
    assert marks == {TP: 1, other: 1}
    tracker.sent(marks)
    assert tracker.watermarks() == {}
    tracker.confirm({TP: 1}, {other: 1})
    assert tracker.watermarks() == {other: 1}
    # An answer for a partition dropped meanwhile is ignored.
    tracker.drop([other])
    tracker.confirm({}, {other: 1})
    assert tracker.watermarks() == {}


class CommitModel:
    """A tracker of one partition, with a broker that answers commits in order."""

    def __init__(self, offsets: list[int]) -> None:
        self.offsets = offsets
        self.tracker = OffsetTracker()
        for off in offsets:
            self.tracker.add(TP, off)
        self.not_done = set(offsets)
        self.in_flight: deque[dict[TopicPartition, int]] = deque()
        self.stored: list[int] = []  # every offset the broker stored, in order

    def done(self, pick: int) -> None:
        off = self.offsets[pick % len(self.offsets)]
        if off in self.not_done:
            self.not_done.discard(off)
            self.tracker.mark_done(TP, off)

    def commit(self) -> None:
        marks = self.tracker.watermarks()
        if marks:
            self.tracker.sent(marks)
            self.in_flight.append(marks)

    def answer(self, ok: bool) -> None:
        if not self.in_flight:
            return
        marks = self.in_flight.popleft()
        if ok:
            self.stored.append(marks[TP])
            self.tracker.confirm(marks, {})
        else:
            self.tracker.confirm({}, marks)

    def commit_sync(self, ok_before: bool) -> None:
        # Stored after the asynchronous commits sent before it.
        while self.in_flight:
            self.answer(ok_before)
        marks = self.tracker.watermarks(resend=True)
        if marks:
            self.stored.append(marks[TP])
            self.tracker.committed(marks)

    def check(self) -> None:
        if self.stored:
            first_not_done = min(self.not_done) if self.not_done else self.offsets[-1] + 1
            assert self.stored[-1] <= first_not_done
            assert self.stored == sorted(self.stored)


_OPS = st.one_of(
    st.tuples(st.just("done"), st.integers(0, 10_000)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("answer"), st.booleans()),
    st.tuples(st.just("commit_sync"), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40),
    ops=st.lists(_OPS, max_size=150),
)
def test_the_committed_offset_never_passes_an_offset_not_done(
    gaps: list[int], ops: list[tuple[str, int]]
) -> None:
    # Given offsets with gaps, taken in in order
    model = CommitModel(list(accumulate(gaps)))
    # When records finish in any order, and asynchronous commits are sent, answered
    # later (in order), succeed or fail, with synchronous commits in between
    for op, arg in ops:
        if op == "commit":
            model.commit()
        else:
            getattr(model, op)(arg)
        # Then the broker's offset never passes an offset not done, and never goes back
        model.check()
    # And once everything is done and commits go through, the committed offset is the end
    for pick in range(len(model.offsets)):
        model.done(pick)
    while model.in_flight:
        model.answer(False)
    for _ in range(2):
        model.commit()
        model.answer(True)
    assert model.stored[-1] == model.offsets[-1] + 1
    assert model.tracker.watermarks() == {}
    assert model.tracker.in_flight() == 0


# -- PartitionRuntime on the memory broker ------------------------------------------------


class Recorder:
    """A handler that takes every record in and keeps its lease."""

    def __init__(self) -> None:
        self.leases: dict[tuple[int, int], Lease] = {}
        self.taken: list[tuple[int, int]] = []
        self.released_parts: list[TopicPartition] = []
        self.held: set[TopicPartition] = set()

    def take(self, record: Record, runtime: PartitionRuntime) -> None:
        self.taken.append((record.partition, record.offset))
        self.leases[(record.partition, record.offset)] = runtime.track(record)

    def released(self, partitions: Sequence[TopicPartition]) -> None:
        self.released_parts.extend(partitions)

    def holds(self) -> set[TopicPartition]:
        return set(self.held)


@pytest.fixture
def broker() -> MemoryBroker:
    b = MemoryBroker()
    b.create_topics([TopicSpec(TOPIC, 2)])
    return b


def runtime(broker: MemoryBroker, handler: Recorder, grace_s: float = 2.0) -> PartitionRuntime:
    rt = PartitionRuntime(broker, GROUP, [TOPIC], handler, commit_interval_s=0.0,
                          grace_s=grace_s)
    rt.start()
    return rt


def fill(broker: MemoryBroker, per_partition: int) -> None:
    for p in (0, 1):
        for i in range(per_partition):
            broker.send(TOPIC, f"{p}-{i}".encode(), partition=p)


def committed(rt: PartitionRuntime) -> dict[TopicPartition, int | None]:
    return rt.consumer.committed([P0, P1])


def test_only_the_contiguous_done_offsets_are_committed(broker: MemoryBroker) -> None:
    handler = Recorder()
    rt = runtime(broker, handler)
    fill(broker, 3)
    assert rt.poll(0) == 6
    leases = handler.leases
    for key in [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]:
        assert leases[key].start()
        leases[key].done()
    rt.collect()
    rt.maybe_commit()
    # Partition 0 stops below its unfinished offset 1.
    assert committed(rt) == {P0: 1, P1: 3}
    assert not rt.idle()
    assert leases[(0, 1)].start()
    leases[(0, 1)].done()
    rt.collect()
    rt.maybe_commit()
    assert committed(rt) == {P0: 3, P1: 3}
    assert rt.idle()
    rt.close()


def test_a_failed_asynchronous_commit_is_sent_again(broker: MemoryBroker) -> None:
    # Regression: the memory consumer answers on_commit inside commit(); the watermark
    # used to be marked sent only after the call, so a failed answer was lost for ever.
    handler = Recorder()
    rt = runtime(broker, handler)
    fill(broker, 1)
    rt.poll(0)
    for lease in handler.leases.values():
        assert lease.start()
        lease.done()
    rt.collect()
    answers: list[tuple[dict[TopicPartition, int], dict[TopicPartition, int]]] = []
    original = rt.on_commit

    def spy(done: Mapping[TopicPartition, int], failed: Mapping[TopicPartition, int],
            error: str | None) -> None:
        answers.append((dict(done), dict(failed)))
        original(done, failed, error)

    rt.on_commit = spy  # type: ignore[method-assign]
    # Given a commit that fails
    broker.fail_next_commits(1)
    rt.maybe_commit()
    assert answers == [({}, {P0: 1, P1: 1})]
    assert committed(rt) == {P0: None, P1: None}
    # When the worker commits again (no record finished meanwhile)
    rt.maybe_commit()
    # Then the same watermarks are sent again, and stored
    assert answers[1:] == [({P0: 1, P1: 1}, {})]
    assert committed(rt) == {P0: 1, P1: 1}
    rt.close()


def test_a_revoke_waits_for_started_records_and_refuses_queued_ones(
    broker: MemoryBroker,
) -> None:
    # Given a member that took in three records of each partition and started the
    # first of partition 1
    handler = Recorder()
    rt = runtime(broker, handler)
    fill(broker, 3)
    rt.poll(0)
    running = handler.leases[(1, 0)]
    assert running.start()
    # When a second member joins (partition 1 moves to it), a queued record of
    # partition 1 is about to start while the revoke waits, and the running record
    # becomes durable
    other = Recorder()
    rt2 = runtime(broker, other)
    rt2.poll(0)  # joins; partition 1 is still held by the first member
    started_meanwhile: list[bool] = []

    def meanwhile() -> None:
        started_meanwhile.append(handler.leases[(1, 1)].start())
        running.done()

    finisher = threading.Timer(0.1, meanwhile)
    finisher.start()
    rt.poll(0)  # on_revoke: waits for the running record, commits, releases
    finisher.join()
    assert started_meanwhile == [False]
    # Then the revoke committed just past the finished record
    assert rt.assigned == {P0}
    assert P1 in handler.released_parts
    assert committed(rt)[P1] == 1
    # and the queued records of partition 1 can no longer start here
    assert not handler.leases[(1, 1)].start()
    assert not handler.leases[(1, 2)].current()
    # while those of the partition kept still can
    assert handler.leases[(0, 0)].start()
    handler.leases[(0, 0)].done()
    # The new owner reads partition 1 from the committed offset: nothing repeats.
    rt2.poll(0)
    assert other.taken == [(1, 1), (1, 2)]
    rt2.close()
    rt.close()


def test_a_late_completion_of_a_released_partition_is_ignored(broker: MemoryBroker) -> None:
    handler = Recorder()
    rt = runtime(broker, handler, grace_s=0.05)
    fill(broker, 2)
    rt.poll(0)
    slow = handler.leases[(1, 0)]
    assert slow.start()
    other = Recorder()
    rt2 = runtime(broker, other)
    rt2.poll(0)
    # The running record outlasts the grace period: the partition is released without it
    rt.poll(0)
    assert rt.assigned == {P0}
    assert not slow.current()
    # When it ends at last, nothing of it is committed by the old owner
    slow.done()
    rt.collect()
    rt.maybe_commit(force=True)
    assert committed(rt)[P1] is None
    assert rt.tracker.partitions() == [P0]
    # and the new owner runs it again (it ran past the grace period)
    rt2.poll(0)
    assert other.taken == [(1, 0), (1, 1)]
    rt2.close()
    rt.close()


def test_a_lost_partition_is_dropped_without_a_commit(broker: MemoryBroker) -> None:
    handler = Recorder()
    rt = runtime(broker, handler)
    fill(broker, 2)
    rt.poll(0)
    for key in [(1, 0), (1, 1)]:
        handler.leases[key].start()
        handler.leases[key].done()
    rt.on_lost([P1])
    rt.collect()
    rt.maybe_commit(force=True)
    assert committed(rt)[P1] is None
    assert rt.assigned == {P0}
    assert P1 in handler.released_parts
    rt.close()


class PauseRecorder:
    """A consumer stand-in that records pause and resume calls."""

    def __init__(self) -> None:
        self.paused: list[list[TopicPartition]] = []
        self.resumed: list[list[TopicPartition]] = []

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self.paused.append(list(partitions))

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self.resumed.append(list(partitions))


class _Broker:
    def __init__(self, consumer: PauseRecorder) -> None:
        self._consumer = consumer

    def consumer(self, group_id: str, topics: Sequence[str], listener: object,
                 *, eager: bool = False) -> PauseRecorder:
        return self._consumer


def test_pauses_are_applied_again_after_every_assignment_change() -> None:
    consumer = PauseRecorder()
    handler = Recorder()
    rt = PartitionRuntime(_Broker(consumer), GROUP, [TOPIC], handler,  # type: ignore[arg-type]
                          commit_interval_s=0.0, grace_s=0.1)
    rt.start()
    rt.on_assign([P0, P1])
    handler.held = {P0}
    rt.apply_pauses(pause_all=False)
    assert consumer.paused == [[P0]]
    rt.apply_pauses(pause_all=False)
    assert consumer.paused == [[P0]]  # nothing new: not paused twice
    # When the assignment changes (a pause flag may not survive it) ...
    rt.on_lost([P1])
    rt.on_assign([P1])
    rt.apply_pauses(pause_all=False)
    # ... every wanted pause is applied again, the one of a partition kept too
    assert consumer.paused[-1] == [P0]
    # Full: everything paused; then room again: the partitions not held are resumed.
    rt.apply_pauses(pause_all=True)
    assert consumer.paused[-1] == [P1]
    rt.apply_pauses(pause_all=False)
    assert consumer.resumed[-1] == [P1]
