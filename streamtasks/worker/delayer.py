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

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from streamtasks.broker.base import Consumer, Record, TopicPartition
from streamtasks.delays import DelayTier, next_hop
from streamtasks.errors import ConfigError
from streamtasks.headers import ETA_MS, header_text
from streamtasks.message import now_ms
from streamtasks.worker.effects import EffectRunner, send_step
from streamtasks.worker.observe import NullObserver, WorkerObserver
from streamtasks.worker.runtime import Lease, PartitionRuntime

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.delayer")

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

    One consumer group per queue (``settings.delayer_group_id(queue)``), separate from
    the worker group, so waiting records never count as the workers' lag; each is a
    :class:`PartitionRuntime`, the same runtime the worker uses. Drive it with :meth:`run`
    in a thread of its own, or call :meth:`step` from a loop.

    Args:
        app: the app whose broker and settings are used.
        queues: the queues whose tier topics are forwarded.
        observer: told how late each forward is (metrics).

    Raises:
        ConfigError: no queue was given.
    """

    def __init__(
        self, app: App, queues: Sequence[str], *, observer: WorkerObserver | None = None
    ) -> None:
        if not queues:
            raise ConfigError("a DelayForwarder needs at least one queue")
        self.observer: WorkerObserver = observer or NullObserver()
        self.app = app
        self.settings = app.settings
        self.queues = list(dict.fromkeys(queues))
        self.tiers = self.settings.tiers()
        self.max_in_flight = self.settings.max_in_flight
        # Built from the settings rather than parsed out of names, so a queue whose
        # name contains ".delay." cannot be mistaken.
        self._sources = {
            self.settings.tier_topic(q, t): _Source(q, t) for q in self.queues for t in self.tiers
        }
        self.effects = EffectRunner()
        self.runtimes = [
            PartitionRuntime(
                app.broker, self.settings.delayer_group_id(q),
                [self.settings.tier_topic(q, t) for t in self.tiers], self,
                commit_interval_s=self.settings.commit_interval_s,
                grace_s=self.settings.shutdown_grace_s, service=self._service_held,
                observer=self.observer,
            )
            for q in self.queues
        ]
        self.stats = {"forwarded": 0, "to_queue": 0, "to_tier": 0, "waits": 0}
        self._position: dict[TopicPartition, int] = {}
        self._heads: dict[TopicPartition, _Head] = {}
        self._halted: set[TopicPartition] = set()
        self._full = False
        self._held: dict[TopicPartition, deque[tuple[Record, _Source, int, Lease]]] = {}

    @property
    def group_ids(self) -> list[str]:
        """The forwarder's consumer groups (one per queue)."""
        return [rt.group_id for rt in self.runtimes]

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Create the queues' topics (when allowed) and join the forwarder groups."""
        for q in self.queues:
            self.app.ensure_queue(q)
        for rt in self.runtimes:
            rt.start()
        log.info("delay forwarder started", queues=self.queues, groups=self.group_ids,
                 tiers=[t.name for t in self.tiers])

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set, then wait for unconfirmed forwards, commit, close.

        Starts the forwarder first unless :meth:`start` was called.
        """
        if not self.runtimes[0].started:
            self.start()
        try:
            while not stop.is_set():
                self.step(_RUN_POLL_S)
            self._drain()
        finally:
            self.close()

    def close(self) -> None:
        """Leave the groups; partitions still owned are committed as far as confirmed."""
        if not any(rt.started for rt in self.runtimes):
            return
        # Let queued forwards be confirmed first, so the revoke below can commit them.
        self.app.broker.flush(min(5.0, self.settings.shutdown_grace_s))
        self._service()
        for rt in self.runtimes:
            rt.close()  # runs on_revoke for what is still assigned
        log.info("delay forwarder stopped", groups=self.group_ids, **self.stats)

    def abandon(self) -> None:
        """Close after a failure, logging (not raising) what else goes wrong."""
        try:
            self.close()
        except Exception as err:
            log.warning("delay forwarder did not close cleanly",
                        error=f"{type(err).__name__}: {err}")

    @property
    def consumer(self) -> Consumer:
        """The group consumer of the first queue (after :meth:`start`)."""
        return self.runtimes[0].consumer

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """Tier partitions owned now (safe to read from another thread)."""
        return frozenset().union(*(rt.assigned for rt in self.runtimes))

    @property
    def unconfirmed(self) -> int:
        """Forwards sent whose delivery the broker has not confirmed yet."""
        held = sum(len(h) for h in self._held.values())
        return sum(rt.outstanding for rt in self.runtimes) - held

    # -- the loop ----------------------------------------------------------------

    def step(self, timeout_s: float) -> None:
        """One round: poll, forward what is due, serve reports, commit, resume due heads.

        Args:
            timeout_s: longest wait for records; shorter when a paused head falls due
                sooner or forwards wait for their delivery report.
        """
        self._halted.clear()
        share = self._poll_timeout(timeout_s) / len(self.runtimes)
        for rt in self.runtimes:
            rt.poll(share)
        self._release_held()
        self._service()
        for rt in self.runtimes:
            rt.maybe_commit()
        self._apply_pauses()
        self.observer.loop_turned("forwarder")

    def idle(self) -> bool:
        """Return True when every assigned tier partition is forwarded and committed.

        Commits first (synchronously). False while a forward is unconfirmed, a record
        waits in a tier, or no partition is assigned yet.
        """
        self._service()
        if self.effects.active or self._held:
            return False
        return all(rt.idle() for rt in self.runtimes)

    def _poll_timeout(self, timeout_s: float) -> float:
        wait = timeout_s
        dues = [head.due_ms - _RESUME_LEAD_MS for head in self._heads.values()]
        dues += [held[0][2] for held in self._held.values()]
        if dues:
            wait = min(wait, max(0.0, (min(dues) - now_ms()) / 1000))
        if self.unconfirmed:
            wait = min(wait, _CONFIRM_POLL_S)
        return wait

    # -- records (PartitionHandler) ------------------------------------------------

    def take(self, record: Record, runtime: PartitionRuntime) -> None:
        """Forward one polled record if due, else hold its partition at it."""
        tp = record.tp
        source = self._sources.get(record.topic)
        if source is None or tp in self._halted:
            return  # later records of a halted partition are read again after the head
        if record.offset < self._position.get(tp, -1):
            return  # read again after a seek: already taken in
        head = self._heads.get(tp)
        if head is not None:
            # Fetched although the head waits (a pause lost in a rebalance, or records
            # fetched before the pause took): go back to the head.
            self._halt(runtime, tp, head)
            return
        now = now_ms()
        due_ms = record.timestamp_ms + source.tier.delay_ms
        held = self._held.get(tp)
        if due_ms > now + _HOLD_MS:
            self._halt(runtime, tp, _Head(record.offset, due_ms))
            return
        lease = runtime.track(record)
        lease.start()
        self._position[tp] = record.offset + 1
        if due_ms > now or held:
            # Due soon (or behind one that is): wait in memory, in offset order.
            self._held.setdefault(tp, deque()).append((record, source, due_ms, lease))
            return
        self._forward(record, source, lease, now, due_ms)

    def released(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions left: forget heads and held records."""
        for tp in partitions:
            for _record, _source, _due, lease in self._held.pop(tp, ()):
                lease.drop()
            self._heads.pop(tp, None)
            self._position.pop(tp, None)

    def holds(self) -> set[TopicPartition]:
        """Partitions whose head is not due yet."""
        return set(self._heads)

    def _release_held(self) -> None:
        """Forward the held records that are due now, in offset order."""
        if not self._held:
            return
        now = now_ms()
        for tp in list(self._held):
            held = self._held[tp]
            while held and held[0][2] <= now:
                record, source, due_ms, lease = held.popleft()
                self._forward(record, source, lease, now, due_ms)
            if not held:
                del self._held[tp]

    def _halt(self, runtime: PartitionRuntime, tp: TopicPartition, head: _Head) -> None:
        """Pause ``tp`` and read it again from its head once that is due."""
        runtime.pause_now(tp)
        runtime.consumer.seek(tp, head.offset)
        self._heads[tp] = head
        self._position[tp] = head.offset
        self._halted.add(tp)
        self.stats["waits"] += 1

    def _forward(
        self, record: Record, source: _Source, lease: Lease, now: int, due_ms: int
    ) -> None:
        self.observer.forwarded(source.queue, source.tier.name, max(0, now - due_ms) / 1000)
        eta = _eta_ms(record.headers)
        hop = None if eta is None else next_hop(self.tiers, eta - now)
        if hop is None:
            target = self.settings.topic(source.queue)
            self.stats["to_queue"] += 1
        else:
            target = self.settings.tier_topic(source.queue, hop)
            self.stats["to_tier"] += 1
        self.stats["forwarded"] += 1
        if record.value is None:
            log.warning("tombstone in a delay tier, forwarded with an empty value",
                        topic=record.topic, partition=record.partition, offset=record.offset)
        self.effects.run(
            [send_step(self.app.broker, target, record.value or b"", record.key,
                       record.headers, record.partition)],
            lease.done,
            f"forward of {record.topic}/{record.partition}@{record.offset} to {target}",
            guard=lease.current,
        )

    def _service_held(self) -> None:
        """While a revoke or drain waits: held records fall due too."""
        self._release_held()
        self._service()

    def _service(self) -> None:
        """Serve delivery reports and due retries, then collect confirmed forwards."""
        self.app.broker.poll(0)
        self.effects.run_due()
        for rt in self.runtimes:
            rt.collect()

    # -- pauses --------------------------------------------------------------------

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
        for rt in self.runtimes:
            rt.apply_pauses(self._full)

    def _drain(self) -> None:
        """Wait (within the grace period) for unconfirmed forwards, then commit."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        runtimes = [rt for rt in self.runtimes if rt.started]
        for rt in runtimes:
            rt.begin_drain()
        while time.monotonic() < deadline and any(rt.drain_busy() for rt in runtimes):
            for rt in runtimes:
                rt.poll(0.002)
            self._service_held()
        for rt in runtimes:
            rt.finish_drain()
        if self.unconfirmed:
            log.warning("forwards unconfirmed at stop; they will be forwarded again",
                        unconfirmed=self.unconfirmed)


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
