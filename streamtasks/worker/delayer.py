"""The delay-tier forwarder: move delayed records on when they are due.

A record in tier ``T`` is due ``T`` after it was written (its record timestamp). Every
record of a tier waits the same time, so due times rise with offsets and only a
partition's head needs watching: when the head is not due, the partition is paused and
the consumer seeks back to it; shortly before it is due (``_RESUME_LEAD_MS``, what a
fetch after resume takes) the partition is resumed, and records read that are due
within ``_HOLD_MS`` wait in memory for their time — a bounded few per partition.
A due record is sent to the queue's topic when its eta (header ``st-eta-ms``) has come,
else to the tier its remaining wait calls for, with its value, key, headers and
partition number unchanged; the value is never decoded.

Only when the broker confirmed that send is the source offset marked done, and only the
contiguous done watermark is committed: a crash repeats a forward, never loses one.
Nothing is forwarded before it is due.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog

from streamtasks.broker.base import Consumer, Record, TopicPartition
from streamtasks.delays import DelayTier, next_hop
from streamtasks.errors import ConfigError
from streamtasks.headers import ETA_MS, header_text
from streamtasks.message import now_ms
from streamtasks.worker.effects import EffectRunner, send_step
from streamtasks.worker.offsets import OffsetTracker, caught_up, commit_watermarks

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.delayer")

_POLL_BATCH = 500
#: Poll timeout of :meth:`DelayForwarder.run` when nothing is due sooner.
_RUN_POLL_S = 0.02
#: Poll timeout while forwards wait for their delivery report.
_CONFIRM_POLL_S = 0.005
#: A paused head is resumed this long before it is due: fetching a resumed partition
#: takes librdkafka about half a second (measured), which would all be lateness.
_RESUME_LEAD_MS = 600
#: Records due within this long are held in memory until due instead of paused.
_HOLD_MS = _RESUME_LEAD_MS + 200


@dataclass(frozen=True, slots=True)
class _Source:
    """What a tier topic belongs to."""

    queue: str
    tier: DelayTier


@dataclass(frozen=True, slots=True)
class _Head:
    """The first record of a paused partition not yet forwarded, and when it is due."""

    offset: int
    due_ms: int


class DelayForwarder:
    """Forwards the records of the delay tiers of a set of queues when they are due.

    One consumer group per queue set (``settings.delayer_group_id(queues)``), separate
    from the worker group, so waiting records never count as the workers' lag. Drive it
    with :meth:`run` in a thread of its own, or call :meth:`step` from a loop.

    Args:
        app: the app whose broker and settings are used.
        queues: the queues whose tier topics are forwarded.

    Raises:
        ConfigError: no queue was given.
    """

    def __init__(self, app: App, queues: Sequence[str]) -> None:
        if not queues:
            raise ConfigError("a DelayForwarder needs at least one queue")
        self.app = app
        self.settings = app.settings
        self.queues = list(queues)
        self.tiers = self.settings.tiers()
        self.group_id = self.settings.delayer_group_id(self.queues)
        self.max_in_flight = self.settings.max_in_flight
        # Built from the settings rather than parsed out of names, so a queue whose
        # name contains ".delay." cannot be mistaken.
        self._sources = {
            self.settings.tier_topic(q, t): _Source(q, t) for q in self.queues for t in self.tiers
        }
        self.tracker = OffsetTracker()
        self.effects = EffectRunner()
        self.stats = {"forwarded": 0, "to_queue": 0, "to_tier": 0, "waits": 0}
        self._consumer: Consumer | None = None
        self._done: queue.SimpleQueue[tuple[TopicPartition, int, int]] = queue.SimpleQueue()
        # Replaced, never mutated, so other threads may read it (see ``assigned``).
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._generation: defaultdict[TopicPartition, int] = defaultdict(int)
        self._unconfirmed: defaultdict[TopicPartition, int] = defaultdict(int)
        self._position: dict[TopicPartition, int] = {}
        self._heads: dict[TopicPartition, _Head] = {}
        self._paused: set[TopicPartition] = set()
        self._full = False
        self._reapply_pauses = False
        self._last_commit = 0.0
        self._drain_deadline: float | None = None
        self._held: dict[TopicPartition, deque[tuple[Record, _Source, int]]] = {}

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Create the queues' topics (when allowed) and join the forwarder group."""
        for q in self.queues:
            self.app.ensure_queue(q)
        self._consumer = self.app.broker.consumer(self.group_id, sorted(self._sources), self)
        log.info("delay forwarder started", queues=self.queues, group=self.group_id,
                 tiers=[t.name for t in self.tiers])

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set, then wait for unconfirmed forwards, commit, close.

        Starts the forwarder first unless :meth:`start` was called.
        """
        if self._consumer is None:
            self.start()
        try:
            while not stop.is_set():
                self.step(_RUN_POLL_S)
            self._drain()
        finally:
            self.close()

    def close(self) -> None:
        """Leave the group; partitions still owned are committed as far as confirmed."""
        if self._consumer is None:
            return
        # Let queued forwards be confirmed first, so the revoke below can commit them.
        self.app.broker.flush(min(5.0, self.settings.shutdown_grace_s))
        self._service()
        try:
            self._consumer.close()  # runs on_revoke for what is still assigned
        finally:
            self._consumer = None
        log.info("delay forwarder stopped", group=self.group_id, **self.stats)

    @property
    def consumer(self) -> Consumer:
        """The group consumer (after :meth:`start`)."""
        if self._consumer is None:
            raise RuntimeError("delay forwarder not started")
        return self._consumer

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """Tier partitions owned now (safe to read from another thread)."""
        return self._assigned

    @property
    def unconfirmed(self) -> int:
        """Forwards sent whose delivery the broker has not confirmed yet."""
        return sum(self._unconfirmed.values())

    # -- the loop ----------------------------------------------------------------

    def step(self, timeout_s: float) -> None:
        """One round: poll, forward what is due, serve reports, commit, resume due heads.

        Args:
            timeout_s: longest wait for records; shorter when a paused head falls due
                sooner or forwards wait for their delivery report.
        """
        halted: set[TopicPartition] = set()
        for record in self.consumer.poll(self._poll_timeout(timeout_s), _POLL_BATCH):
            self._take(record, halted)
        self._release_held()
        self._service()
        self._maybe_commit()
        self._apply_pauses()

    def idle(self) -> bool:
        """Return True when every assigned tier partition is forwarded and committed.

        Commits first (synchronously). False while a forward is unconfirmed, a record
        waits in a tier, or no partition is assigned yet.
        """
        self._service()
        if self.unconfirmed or self.effects.active or self._held or not self._assigned:
            return False
        self._maybe_commit(force=True)
        return caught_up(self.consumer, self.app.broker, self._assigned)

    def _poll_timeout(self, timeout_s: float) -> float:
        wait = timeout_s
        dues = [head.due_ms - _RESUME_LEAD_MS for head in self._heads.values()]
        dues += [held[0][2] for held in self._held.values()]
        if dues:
            wait = min(wait, max(0.0, (min(dues) - now_ms()) / 1000))
        if self.unconfirmed:
            wait = min(wait, _CONFIRM_POLL_S)
        return wait

    def _take(self, record: Record, halted: set[TopicPartition]) -> None:
        """Forward one polled record if due, else hold its partition at it."""
        tp = record.tp
        source = self._sources.get(record.topic)
        if source is None or tp not in self._assigned or tp in halted:
            return  # later records of a halted partition are read again after the head
        if record.offset < self._position.get(tp, -1):
            return  # read again after a seek: already taken in
        head = self._heads.get(tp)
        if head is not None:
            # Fetched although the head waits (a pause lost in a rebalance, or records
            # fetched before the pause took): go back to the head.
            self._halt(tp, head, halted)
            return
        now = now_ms()
        due_ms = record.timestamp_ms + source.tier.delay_ms
        held = self._held.get(tp)
        if due_ms > now + _HOLD_MS:
            self._halt(tp, _Head(record.offset, due_ms), halted)
            return
        self.tracker.add(tp, record.offset)
        self._position[tp] = record.offset + 1
        if due_ms > now or held:
            # Due soon (or behind one that is): wait in memory, in offset order.
            self._held.setdefault(tp, deque()).append((record, source, due_ms))
            return
        self._forward(record, source, now)

    def _release_held(self) -> None:
        """Forward the held records that are due now, in offset order."""
        if not self._held:
            return
        now = now_ms()
        for tp in list(self._held):
            held = self._held[tp]
            while held and held[0][2] <= now:
                record, source, _ = held.popleft()
                self._forward(record, source, now)
            if not held:
                del self._held[tp]

    def _halt(self, tp: TopicPartition, head: _Head, halted: set[TopicPartition]) -> None:
        """Pause ``tp`` and read it again from its head once that is due."""
        self.consumer.pause([tp])
        self.consumer.seek(tp, head.offset)
        self._paused.add(tp)
        self._heads[tp] = head
        self._position[tp] = head.offset
        halted.add(tp)
        self.stats["waits"] += 1
        log.debug("tier head not due", topic=tp.topic, partition=tp.partition,
                  offset=head.offset, due_in_ms=head.due_ms - now_ms())

    def _forward(self, record: Record, source: _Source, now: int) -> None:
        eta = _eta_ms(record.headers)
        hop = None if eta is None else next_hop(self.tiers, eta - now)
        if hop is None:
            target = self.settings.topic(source.queue)
            self.stats["to_queue"] += 1
        else:
            target = self.settings.tier_topic(source.queue, hop)
            self.stats["to_tier"] += 1
        tp = record.tp
        self._unconfirmed[tp] += 1
        self.stats["forwarded"] += 1
        log.debug("forwarding", topic=record.topic, partition=record.partition,
                  offset=record.offset, to=target, eta_ms=eta)
        if record.value is None:
            log.warning("tombstone in a delay tier, forwarded with an empty value",
                        topic=record.topic, partition=record.partition, offset=record.offset)
        self.effects.run(
            [send_step(self.app.broker, target, record.value or b"", record.key,
                       record.headers, record.partition)],
            partial(self._forwarded, tp, record.offset, self._generation[tp]),
            f"forward of {record.topic}/{record.partition}@{record.offset} to {target}",
        )

    def _forwarded(self, tp: TopicPartition, offset: int, generation: int) -> None:
        """Any thread: the broker confirmed the forward of ``offset``."""
        self._done.put((tp, offset, generation))

    def _service(self) -> None:
        """Serve delivery reports and due retries, then collect confirmed forwards."""
        self.app.broker.poll(0)
        self.effects.run_due()
        while True:
            try:
                tp, offset, generation = self._done.get_nowait()
            except queue.Empty:
                return
            if generation != self._generation[tp] or tp not in self._assigned:
                continue  # revoked or lost meanwhile
            self.tracker.mark_done(tp, offset)
            self._unconfirmed[tp] -= 1

    # -- commits and pauses ------------------------------------------------------

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.settings.commit_interval_s:
            return
        self._last_commit = now
        commit_watermarks(self.consumer, self.tracker, asynchronous=not force)

    def _apply_pauses(self) -> None:
        """Resume partitions whose head is due; pause everything while too much is unconfirmed.

        After an assignment change every wanted pause is applied again: a pause flag
        does not reliably survive a rebalance.
        """
        now = now_ms()
        for tp in [tp for tp, head in self._heads.items()
                   if head.due_ms - _RESUME_LEAD_MS <= now]:
            del self._heads[tp]
        unconfirmed = self.unconfirmed
        if unconfirmed >= self.max_in_flight:
            self._full = True
        elif unconfirmed <= self.max_in_flight // 2:
            self._full = False
        wanted = set(self._assigned) if self._full else set(self._heads)
        to_pause = wanted if self._reapply_pauses else wanted - self._paused
        to_resume = (self._paused - wanted) & self._assigned
        self._reapply_pauses = False
        if to_pause:
            self.consumer.pause(sorted(to_pause))
        if to_resume:
            self.consumer.resume(sorted(to_resume))
        self._paused = wanted

    def _drain(self) -> None:
        """Wait (within the grace period) for unconfirmed forwards, then commit."""
        if self._consumer is None:
            return
        self._drain_deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.unconfirmed and time.monotonic() < self._drain_deadline:
            self._service()
            time.sleep(_CONFIRM_POLL_S)
        commit_watermarks(self.consumer, self.tracker, asynchronous=False)
        if self.unconfirmed:
            log.warning("forwards unconfirmed at stop; they will be forwarded again",
                        unconfirmed=self.unconfirmed)

    # -- rebalance listener (called inside consumer.poll / close) ----------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """New partitions start unpaused; their head is judged again when read."""
        for tp in partitions:
            self._generation[tp] += 1
            self._unconfirmed[tp] = 0
            self._heads.pop(tp, None)
            self._held.pop(tp, None)
            self._position.pop(tp, None)
            self._paused.discard(tp)
        self._assigned = self._assigned | frozenset(partitions)
        self._reapply_pauses = True
        log.info("delay partitions assigned", partitions=_names(partitions))

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions leaving: wait (grace) for their forwards, commit, release."""
        mine = [tp for tp in partitions if tp in self._assigned]
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        if self._drain_deadline is not None:
            deadline = min(deadline, self._drain_deadline)
        while any(self._unconfirmed[tp] for tp in mine) and time.monotonic() < deadline:
            self._service()
            time.sleep(_CONFIRM_POLL_S)
        if not commit_watermarks(self.consumer, self.tracker, mine, asynchronous=False):
            log.warning("commit on revoke failed; forwards will be repeated",
                        partitions=_names(mine))
        self._release(mine)
        log.info("delay partitions revoked", partitions=_names(mine))

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost: another member may own them; drop without committing."""
        mine = [tp for tp in partitions if tp in self._assigned]
        self._release(mine)
        log.warning("delay partitions lost", partitions=_names(mine))

    def _release(self, partitions: Sequence[TopicPartition]) -> None:
        self.tracker.drop(partitions)
        for tp in partitions:
            self._generation[tp] += 1
            self._unconfirmed.pop(tp, None)
            self._heads.pop(tp, None)
            self._held.pop(tp, None)
            self._position.pop(tp, None)
            self._paused.discard(tp)
        self._assigned = self._assigned - frozenset(partitions)
        self._reapply_pauses = True


def _eta_ms(headers: Mapping[str, bytes]) -> int | None:
    """Return the due time of a record, or None when it is missing or garbled (due now)."""
    text = header_text(headers, ETA_MS)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        log.debug("garbled eta header, forwarding as due", value=text)
        return None


def _names(partitions: Sequence[TopicPartition]) -> list[str]:
    return [f"{tp.topic}/{tp.partition}" for tp in partitions]
