"""The partition runtime: one consumer group membership, its offsets, pauses and rebalances.

Written once and shared by the task worker and the delay-tier forwarder. A runtime owns
one group consumer; it tracks, per partition, the records taken in (:class:`Lease`) and
commits only the contiguous done watermark. What a record means is the handler's
business (:class:`PartitionHandler`): the runtime hands it records and is told, through
each record's lease, when the record's effects are durable.

Rebalance rules (``docs/decisions.md``, "Rebalance"):

- **revoke**: records taken in but not started are dropped (:meth:`Lease.start` refuses
  them from then on) — except those below the highest offset already started, which
  the committed offset cannot pass without them: they still run, or a record that
  finished here would repeat on the next owner. The runtime waits, within the grace
  period, for the started ones (and those below) to become durable, commits
  synchronously, and releases the partitions;
- **lost**: everything is dropped without a commit (another member may own them);
- a lease of a released partition is stale: it may not start, and its late completion
  is ignored; a handler checks :meth:`Lease.current` before writing anything;
- pauses live here (one map per runtime) and are applied again after every assignment
  change: a partition is always handed to the runtime unpaused.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from streamtasks.broker.base import Broker, Consumer, Record, TopicPartition
from streamtasks.logs import get_logger
from streamtasks.worker.observe import NullObserver, WorkerObserver
from streamtasks.worker.offsets import OffsetTracker, caught_up, commit_watermarks

log = get_logger("streamtasks.worker")

_POLL_BATCH = 500
#: A runtime with nothing in flight commits what moved this soon, not at the interval:
#: a burst's last offsets (and a lone task's) are committed within this, not up to
#: ``commit_interval_s`` later; a trickle commits at most this often.
_IDLE_COMMIT_S = 0.05


class PartitionHandler(Protocol):
    """What a :class:`PartitionRuntime` hands records and assignment changes to."""

    def take(self, record: Record, runtime: PartitionRuntime) -> None:
        """A polled record of an owned partition; call ``runtime.track(record)`` to take it.

        A record not tracked is not the runtime's concern (the forwarder seeks back to a
        head that is not due, and reads it again later).
        """

    def released(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions left (revoked or lost): forget what is queued for them.

        Every lease of these partitions is stale by now.
        """

    def holds(self) -> set[TopicPartition]:
        """Partitions the handler wants paused now (slow heads, heads not yet due)."""


class Lease:
    """One record taken in by a runtime, until its effects are durable or it is dropped.

    Thread-safe: a job checks :meth:`start` in the thread that runs it, and reports
    :meth:`done` from whichever thread learnt that its effects are durable.
    """

    __slots__ = ("_runtime", "_state", "generation", "offset", "tp")

    _QUEUED, _STARTED, _ENDED = 0, 1, 2

    def __init__(self, runtime: PartitionRuntime, tp: TopicPartition, offset: int,
                 generation: int) -> None:
        self._runtime = runtime
        self.tp = tp
        self.offset = offset
        self.generation = generation
        self._state = Lease._QUEUED

    def start(self) -> bool:
        """Begin the record's work; False when its partition was revoked or lost meanwhile.

        A lease refused here is dropped: the record is not run, and the next owner of the
        partition reads it again from the committed offset.
        """
        return self._runtime._start(self)

    def current(self) -> bool:
        """Whether this worker still owns the record's partition (same assignment)."""
        return self._runtime._generation[self.tp] == self.generation

    def done(self) -> None:
        """The record's effects are durable: its offset may be committed."""
        self._runtime._end(self, done=True)

    def drop(self) -> None:
        """The record will not be completed here (its partition is gone, or never started)."""
        self._runtime._end(self, done=False)


class PartitionRuntime:
    """One consumer group membership: poll, lease, commit watermarks, pause, rebalance.

    Args:
        broker: the broker whose group consumer this runtime drives.
        group_id: the consumer group (one per queue, see ``streamtasks.topology``).
        topics: the topics the group consumes.
        handler: what polled records are handed to.
        commit_interval_s: how often done watermarks are committed (asynchronously).
        grace_s: how long a revoke or a drain waits for started records.
        eager: the consumer returns at the first record (see :meth:`Broker.consumer`).
        service: called while a revoke or drain waits (serves delivery reports, effects).
        observer: told how long synchronous commits take.
    """

    def __init__(
        self,
        broker: Broker,
        group_id: str,
        topics: Sequence[str],
        handler: PartitionHandler,
        *,
        commit_interval_s: float,
        grace_s: float,
        eager: bool = False,
        service: Callable[[], None] | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.observer: WorkerObserver = observer or NullObserver()
        self.broker = broker
        self.group_id = group_id
        self.topics = list(topics)
        self.handler = handler
        self.commit_interval_s = commit_interval_s
        self.grace_s = grace_s
        self.eager = eager
        self._service = service or (lambda: None)
        self.tracker = OffsetTracker()
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self._ended: queue.SimpleQueue[tuple[Lease, bool]] = queue.SimpleQueue()
        # Replaced, never mutated, so other threads may read it.
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._generation: defaultdict[TopicPartition, int] = defaultdict(int)
        self._revoking: set[TopicPartition] = set()
        self._unfinished: defaultdict[TopicPartition, int] = defaultdict(int)
        self._started: defaultdict[TopicPartition, int] = defaultdict(int)
        # Highest offset started per partition, and while revoking the offset below
        # which queued records may still start (see _begin_revoke).
        self._high: dict[TopicPartition, int] = {}
        self._floor: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._reapply_pauses = False
        self._last_commit = 0.0
        self._draining = False

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Join the group (the consumer subscribes; partitions come with a poll)."""
        if self._consumer is None:
            self._consumer = self.broker.consumer(self.group_id, self.topics, self,
                                                  eager=self.eager)

    @property
    def started(self) -> bool:
        """Whether :meth:`start` joined the group and :meth:`close` did not leave it."""
        return self._consumer is not None

    @property
    def consumer(self) -> Consumer:
        """The group consumer (after :meth:`start`)."""
        if self._consumer is None:
            raise RuntimeError(f"runtime of group {self.group_id} not started")
        return self._consumer

    def close(self) -> None:
        """Leave the group: what is still owned is revoked (drained within the grace)."""
        if self._consumer is None:
            return
        consumer, self._draining = self._consumer, True
        try:
            consumer.close()  # runs on_revoke for what is still assigned
        finally:
            self._consumer = None

    # -- the loop ----------------------------------------------------------------

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """Partitions owned now (safe to read from another thread)."""
        return self._assigned

    @property
    def outstanding(self) -> int:
        """Records taken in whose effects are not yet durable (nor dropped)."""
        return sum(self._unfinished.values())

    def poll(self, timeout_s: float, max_records: int = _POLL_BATCH) -> int:
        """Poll once, hand the records of owned partitions to the handler; return how many."""
        records = self.consumer.poll(timeout_s, max(1, min(max_records, _POLL_BATCH)))
        if self._draining:
            return 0  # not taken in: read again by whoever owns them next
        for record in records:
            if record.tp in self._assigned and record.tp not in self._revoking:
                self.handler.take(record, self)
        return len(records)

    def track(self, record: Record) -> Lease:
        """Take ``record`` in: its offset is committed only after its lease is done."""
        tp = record.tp
        self.tracker.add(tp, record.offset)
        with self._lock:
            self._unfinished[tp] += 1
        return Lease(self, tp, record.offset, self._generation[tp])

    def collect(self) -> None:
        """Apply the leases ended since the last call (the loop thread)."""
        while True:
            try:
                lease, done = self._ended.get_nowait()
            except queue.Empty:
                return
            self._apply_ended(lease, done)

    def wait_ended(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a lease to end (room for a record), and apply it."""
        try:
            lease, done = self._ended.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._apply_ended(lease, done)

    def _apply_ended(self, lease: Lease, done: bool) -> None:
        if lease.current() and done:
            self.tracker.mark_done(lease.tp, lease.offset)

    def maybe_commit(self, force: bool = False) -> bool:
        """Commit the watermarks that moved: every interval asynchronously, or now.

        When nothing taken in is still in flight, what moved is committed (still
        asynchronously) after ``_IDLE_COMMIT_S`` instead of the interval.
        """
        now = time.monotonic()
        since = now - self._last_commit
        if not force and since < self.commit_interval_s and (
                since < _IDLE_COMMIT_S or self.outstanding):
            return True
        self._last_commit = now
        ok = commit_watermarks(self.consumer, self.tracker, asynchronous=not force)
        if force:
            self.observer.committed(self.group_id, time.monotonic() - now, ok)
        return ok

    def apply_pauses(self, pause_all: bool) -> None:
        """Pause what the handler holds (or everything), resume the rest.

        After an assignment change every wanted pause is applied again.
        """
        assigned = self._assigned
        wanted = set(assigned) if pause_all else (self.handler.holds() & assigned)
        to_pause = wanted if self._reapply_pauses else wanted - self._paused
        to_resume = (self._paused - wanted) & assigned
        self._reapply_pauses = False
        if to_pause:
            self.consumer.pause(sorted(to_pause))
        if to_resume:
            self.consumer.resume(sorted(to_resume))
        self._paused = wanted

    def pause_now(self, tp: TopicPartition) -> None:
        """Pause ``tp`` at once (it stays paused while the handler holds it)."""
        self.consumer.pause([tp])
        self._paused.add(tp)

    def idle(self) -> bool:
        """Whether everything owned is done and committed up to the end (tests, scripts)."""
        self.collect()
        if self.outstanding or not self._assigned:
            return False
        if not self.maybe_commit(force=True):
            return False
        return caught_up(self.consumer, self.broker, self._assigned)

    def begin_drain(self) -> None:
        """Stop starting records (but those a commit needs, see :meth:`_begin_revoke`).

        Records polled from now on are not taken in; partitions assigned meanwhile are
        not read. Keep calling :meth:`poll` while draining: it serves rebalances.
        """
        self._draining = True
        self._begin_revoke(list(self._assigned))

    def drain_busy(self) -> bool:
        """While draining: whether records that must end before the commit are running."""
        self.collect()
        with self._lock:
            return any(self._busy(tp) for tp in self._assigned)

    def finish_drain(self, attempts: int = 5) -> bool:
        """Commit what is done, polling between tries.

        A commit refused during a rebalance goes through once the group's new
        generation is known.
        """
        for attempt in range(attempts):
            if self.maybe_commit(force=True):
                return True
            if attempt + 1 < attempts:
                self.poll(0.2)
        log.warning("commit at drain failed; records past the last commit will repeat",
                    group=self.group_id)
        return False

    def drain(self, deadline: float) -> None:
        """Drain alone: stop starting records, wait (until ``deadline``), commit."""
        self.begin_drain()
        while time.monotonic() < deadline and self.drain_busy():
            self.poll(0.005)
            self._service()
        self.finish_drain()

    # -- leases ------------------------------------------------------------------

    def _start(self, lease: Lease) -> bool:
        with self._lock:
            if lease._state != Lease._QUEUED:
                return lease._state == Lease._STARTED
            tp = lease.tp
            if self._generation[tp] != lease.generation or (
                tp in self._revoking and lease.offset >= self._floor.get(tp, 0)
            ):
                lease._state = Lease._ENDED
                self._unfinished[tp] -= 1 if lease.current() else 0
                return False
            lease._state = Lease._STARTED
            self._started[tp] += 1
            if lease.offset > self._high.get(tp, -1):
                self._high[tp] = lease.offset
            return True

    def _end(self, lease: Lease, *, done: bool) -> None:
        with self._lock:
            if lease._state == Lease._ENDED:
                return
            was_started = lease._state == Lease._STARTED
            lease._state = Lease._ENDED
            if self._generation[lease.tp] != lease.generation:
                return  # a partition released meanwhile: nothing of it is counted now
            self._unfinished[lease.tp] -= 1
            if was_started:
                self._started[lease.tp] -= 1
        if done:
            self._ended.put((lease, True))

    def _begin_revoke(self, partitions: Sequence[TopicPartition]) -> None:
        """Refuse records not yet started from now on, but those below the highest started.

        A record above a queued one may have finished already: if the queued one were
        dropped, the committed offset would stop below it and the next owner would run
        the finished one again. So queued records below the highest started offset may
        still start (within the grace period).
        """
        with self._lock:
            for tp in partitions:
                self._revoking.add(tp)
                self._floor[tp] = self._high.get(tp, -1) + 1

    def _busy(self, tp: TopicPartition) -> bool:
        """Started records not yet durable, or records below the floor not yet done."""
        if self._started[tp]:
            return True
        return not self.tracker.done_below(tp, self._floor.get(tp, 0))

    def _wait_started(self, partitions: Sequence[TopicPartition], deadline: float) -> None:
        while time.monotonic() < deadline:
            self.collect()
            with self._lock:
                busy = any(self._busy(tp) for tp in partitions)
            if not busy:
                break
            self._service()
            time.sleep(0.005)
        self.collect()

    # -- rebalance listener (called inside consumer.poll / close) ----------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """New partitions: a new generation each, unpaused; pauses are re-applied."""
        with self._lock:
            for tp in partitions:
                self._generation[tp] += 1
                self._unfinished[tp] = 0
                self._started[tp] = 0
                self._revoking.discard(tp)
                self._high.pop(tp, None)
                self._floor.pop(tp, None)
        self._assigned = self._assigned | frozenset(partitions)
        self._paused.difference_update(partitions)
        self._reapply_pauses = True
        if self._draining:
            self._begin_revoke(partitions)
        log.info("partitions assigned", group=self.group_id, partitions=_names(partitions))

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions leaving: drop queued records, wait for started ones, commit, release."""
        mine = [tp for tp in partitions if tp in self._assigned]
        if not mine:
            return
        self._begin_revoke(mine)
        self._wait_started(mine, time.monotonic() + self.grace_s)
        if not commit_watermarks(self.consumer, self.tracker, mine, asynchronous=False):
            log.warning("commit on revoke failed; records past the last commit will repeat",
                        group=self.group_id, partitions=_names(mine))
        with self._lock:
            left = sum(self._started[tp] for tp in mine)
        if left:
            log.warning("records still running after the grace period; the next owner runs "
                        "them again and this worker writes nothing for them",
                        group=self.group_id, running=left, grace_s=self.grace_s)
        self._release(mine)
        log.info("partitions revoked", group=self.group_id, partitions=_names(mine))

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost: another member may own them; drop without committing."""
        mine = [tp for tp in partitions if tp in self._assigned]
        if not mine:
            return
        self._release(mine)
        log.warning("partitions lost", group=self.group_id, partitions=_names(mine))

    def on_commit(self, committed: Mapping[TopicPartition, int],
                  failed: Mapping[TopicPartition, int], error: str | None) -> None:
        """An asynchronous commit's answer: confirmed offsets, or failures to commit again."""
        self.tracker.confirm(committed, failed)
        if failed:
            log.warning("offset commit failed; it is sent again", group=self.group_id,
                        partitions=_names(list(failed)), error=error)

    def _release(self, partitions: Sequence[TopicPartition]) -> None:
        self.tracker.drop(partitions)
        with self._lock:
            for tp in partitions:
                self._generation[tp] += 1
                self._unfinished.pop(tp, None)
                self._started.pop(tp, None)
                self._revoking.discard(tp)
                self._high.pop(tp, None)
                self._floor.pop(tp, None)
        self._assigned = self._assigned - frozenset(partitions)
        self._paused.difference_update(partitions)
        self._reapply_pauses = True
        self.handler.released(partitions)


def _names(partitions: Sequence[TopicPartition]) -> list[str]:
    return [f"{tp.topic}/{tp.partition}" for tp in partitions]
