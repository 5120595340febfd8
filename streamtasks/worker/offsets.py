"""Which offsets may be committed: the contiguous done watermark per partition.

Tasks of one partition may finish out of order. A partition's committed offset may
only move past records whose effects (result row, follow-up messages) are durable,
so the tracker commits the lowest offset not yet done: a crash then repeats the
records above it, and never skips one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping

from streamtasks.broker.base import Broker, Consumer, TopicPartition
from streamtasks.errors import BrokerError
from streamtasks.logs import get_logger

log = get_logger("streamtasks.worker")


class PartitionOffsets:
    """Offsets of one partition taken in, in order, and which of them are done."""

    __slots__ = ("_committed", "_done", "_pending", "_released", "_sent")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._released: int | None = None
        self._committed: int | None = None
        self._sent: int | None = None

    def add(self, offset: int) -> None:
        """Track a record taken in; offsets must rise within a partition.

        Raises:
            ValueError: ``offset`` is not above the last one added.
        """
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} added after {self._pending[-1]}")
        self._pending.append(offset)

    def mark_done(self, offset: int) -> None:
        """Record that the effects of ``offset`` are durable."""
        self._done.add(offset)

    @property
    def in_flight(self) -> int:
        """Records taken in and not yet released by the watermark."""
        return len(self._pending)

    def watermark(self, resend: bool = False) -> int | None:
        """Return the offset to commit (next record to read), or None if nothing new.

        Pops every done offset at the head of the pending queue: the last one popped
        plus one is the watermark. It stays due until :meth:`committed` is told of it,
        so a failed commit is simply retried. One sent asynchronously and not yet
        answered is not due again unless ``resend`` (a synchronous commit).
        """
        pending, done = self._pending, self._done
        while pending and pending[0] in done:
            last = pending.popleft()
            done.discard(last)
            self._released = last + 1
        if self._released is None or self._released == self._committed:
            return None
        if self._released == self._sent and not resend:
            return None
        return self._released

    def done_below(self, floor: int) -> bool:
        """Whether every record taken in below ``floor`` is done."""
        for offset in self._pending:
            if offset >= floor:
                return True
            if offset not in self._done:
                return False
        return True

    def sent(self, offset: int) -> None:
        """Remember that ``offset`` was sent in an asynchronous commit, not yet answered."""
        self._sent = offset

    def committed(self, offset: int) -> None:
        """Remember that ``offset`` was committed."""
        if self._committed is None or offset > self._committed:
            self._committed = offset

    def failed(self, offset: int) -> None:
        """An asynchronous commit of ``offset`` failed: the watermark is due again."""
        if self._sent == offset:
            self._sent = None


class OffsetTracker:
    """Done watermarks for every partition a worker owns."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionOffsets] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        """Track a record of ``tp`` taken in."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = PartitionOffsets()
        part.add(offset)

    def mark_done(self, tp: TopicPartition, offset: int) -> None:
        """Record that a record's effects are durable (no-op for a dropped partition)."""
        part = self._parts.get(tp)
        if part is not None:
            part.mark_done(offset)

    def watermarks(
        self, partitions: Iterable[TopicPartition] | None = None, resend: bool = False
    ) -> dict[TopicPartition, int]:
        """Return the offsets to commit, for partitions whose watermark moved."""
        chosen = self._parts.keys() if partitions is None else partitions
        marks: dict[TopicPartition, int] = {}
        for tp in list(chosen):
            part = self._parts.get(tp)
            if part is None:
                continue
            mark = part.watermark(resend)
            if mark is not None:
                marks[tp] = mark
        return marks

    def committed(self, marks: Mapping[TopicPartition, int]) -> None:
        """Remember offsets that were committed."""
        for tp, offset in marks.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed(offset)

    def done_below(self, tp: TopicPartition, floor: int) -> bool:
        """Whether every record of ``tp`` taken in below ``floor`` is done."""
        part = self._parts.get(tp)
        return part is None or part.done_below(floor)

    def sent(self, marks: Mapping[TopicPartition, int]) -> None:
        """Remember offsets sent in an asynchronous commit (answered by :meth:`confirm`)."""
        for tp, offset in marks.items():
            part = self._parts.get(tp)
            if part is not None:
                part.sent(offset)

    def confirm(
        self, committed: Mapping[TopicPartition, int], failed: Mapping[TopicPartition, int]
    ) -> None:
        """An asynchronous commit's answer: ``committed`` stored, ``failed`` due again."""
        self.committed(committed)
        for tp, offset in failed.items():
            part = self._parts.get(tp)
            if part is not None:
                part.failed(offset)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """Records not yet released, for one partition or all."""
        if tp is not None:
            part = self._parts.get(tp)
            return part.in_flight if part else 0
        return sum(p.in_flight for p in self._parts.values())

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget partitions (revoked or lost); late completions for them are ignored."""
        for tp in partitions:
            self._parts.pop(tp, None)

    def partitions(self) -> list[TopicPartition]:
        """Partitions being tracked."""
        return list(self._parts)


def commit_watermarks(
    consumer: Consumer,
    tracker: OffsetTracker,
    partitions: Iterable[TopicPartition] | None = None,
    *,
    asynchronous: bool,
) -> bool:
    """Commit the done watermarks that moved; return False (logged) when the commit failed.

    A failed commit leaves the watermarks due, so the next call commits them again. An
    asynchronous commit is only sent here: the consumer's answer (``on_commit`` of its
    listener, from a later poll) confirms it, or makes it due again.
    """
    marks = tracker.watermarks(partitions, resend=not asynchronous)
    if not marks:
        return True
    if asynchronous:
        tracker.sent(marks)  # before the call: a consumer may answer inside it
    try:
        consumer.commit(marks, asynchronous=asynchronous)
    except BrokerError as err:
        if asynchronous:
            tracker.confirm({}, marks)
        log.warning("commit failed; it is retried, or the records are repeated",
                    error=str(err))
        return False
    if not asynchronous:
        tracker.committed(marks)
    return True


def caught_up(consumer: Consumer, broker: Broker, partitions: Collection[TopicPartition]) -> bool:
    """Whether the group's committed offset of every partition is its high watermark."""
    committed = consumer.committed(sorted(partitions))
    for tp in partitions:
        low, high = broker.watermarks(tp)
        position = committed.get(tp)
        if (position if position is not None else low) < high:
            return False
    return True
