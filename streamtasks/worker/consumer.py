"""The worker: consume a queue's topic as a group, run tasks, commit done watermarks.

One thread owns the Kafka consumer and runs :meth:`Worker._step`: poll records,
hand them to the executor, collect completions, commit. Everything a task
causes (its result row, dead letters) is a chain of durable effects; only when
the chain is done is the record's offset marked done, and only the contiguous
done watermark of each partition is ever committed.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from streamtasks import states
from streamtasks.backend.base import TaskMeta
from streamtasks.broker.base import Consumer, Record, TopicPartition
from streamtasks.codec import bind_arguments
from streamtasks.errors import (
    DecodeError,
    MessageError,
    ResultTimeout,
    Retry,
    StreamTasksError,
    TaskExpired,
)
from streamtasks.headers import task_headers
from streamtasks.message import TaskMessage, now_ms
from streamtasks.task import Task
from streamtasks.worker.deadletter import dead_letter_headers
from streamtasks.worker.delayer import DelayForwarder
from streamtasks.worker.effects import EffectRunner, Step, send_step, store_step
from streamtasks.worker.executor import Executor, Outcome
from streamtasks.worker.flows import FOLLOW_UP_ERRORS, FollowUps, claimer_of
from streamtasks.worker.offsets import OffsetTracker, caught_up, commit_watermarks

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.worker")

_POLL_BATCH = 500
_SLOW_HEAD_FACTOR = 10
_MAX_KEPT_ERRORS = 100


@dataclass(slots=True)
class _Job:
    record: Record
    generation: int
    msg: TaskMessage
    task: Task[Any, Any]
    args: list[Any]
    kwargs: dict[str, Any]


class Worker:
    """Consumes queues as one member of each queue's consumer group and runs their tasks.

    Args:
        app: the app whose registered tasks run here.
        queues: the queues to consume.
        concurrency: tasks running at once (default: the ``concurrency`` setting).
        max_in_flight: records held before partitions are paused.
        name: this worker's name in result rows (default ``host:pid``).
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        *,
        concurrency: int | None = None,
        max_in_flight: int | None = None,
        name: str | None = None,
    ) -> None:
        self.app = app
        self.settings = app.settings
        self.queues = list(queues)
        self.concurrency = concurrency or self.settings.concurrency
        self.max_in_flight = max(max_in_flight or self.settings.max_in_flight, self.concurrency)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.group_id = self.settings.group_id(self.queues[0]) if len(self.queues) == 1 else (
            self.settings.namespace + "." + "+".join(sorted(self.queues))
        )
        self._topic_queue = {self.settings.topic(q): q for q in self.queues}
        self.tracker = OffsetTracker()
        self.effects = EffectRunner()
        self.flows = FollowUps(app, self.name)
        self.executor = Executor(self.concurrency)
        #: Errors raised by tasks here, newest last (kept for :meth:`App.drain`).
        self.task_errors: list[BaseException] = []
        self._consumer: Consumer | None = None
        #: Forwards this worker's delayed records when due (``run_delayer``), or None.
        self.delayer: DelayForwarder | None = None
        self._done: queue.SimpleQueue[
            tuple[TopicPartition, int, int, tuple[TopicPartition, str] | None]
        ] = queue.SimpleQueue()
        self._full = False
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._generation: dict[TopicPartition, int] = defaultdict(int)
        self._held: dict[TopicPartition, int] = defaultdict(int)
        self._waiting: dict[tuple[TopicPartition, str], deque[_Job]] = {}
        self._stop = threading.Event()
        self._reapply_pauses = False
        self._last_commit = 0.0
        self.stats = {"received": 0, "succeeded": 0, "failed": 0, "retried": 0,
                      "dead_lettered": 0}

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Create the queues' topics (when allowed) and join the consumer groups."""
        for q in self.queues:
            self.app.ensure_queue(q)
        self._consumer = self.app.broker.consumer(
            self.group_id, list(self._topic_queue), self, eager=True
        )
        if self.settings.run_delayer and self.delayer is None:
            self.delayer = DelayForwarder(self.app, self.queues)
            self.delayer.start()
        log.info("worker started", worker=self.name, queues=self.queues, group=self.group_id,
                 concurrency=self.concurrency, max_in_flight=self.max_in_flight)

    def run(self, install_signals: bool = True) -> int:
        """Run until :meth:`stop` or SIGTERM / SIGINT, drain, and return the exit code 0.

        A second signal exits at once (code 1) without draining.
        """
        if install_signals:
            self._install_signals()
        self.start()
        delayer_stop = threading.Event()
        delayer_thread = None
        if self.delayer is not None:
            # Its own consumer group and thread: waiting records are not this group's lag.
            delayer_thread = threading.Thread(
                target=self.delayer.run, args=(delayer_stop,), name="streamtasks-delayer",
                daemon=True,
            )
            delayer_thread.start()
        try:
            while not self._stop.is_set():
                self._step(self._poll_timeout())
        finally:
            delayer_stop.set()
            self._drain(self.settings.shutdown_grace_s)
            if delayer_thread is not None:
                delayer_thread.join(self.settings.shutdown_grace_s + 5)
            self.close()
        return 0

    def run_until_idle(self, timeout_s: float) -> None:
        """Run until every record of the queues is done and committed (tests, scripts).

        Raises:
            ResultTimeout: not idle within ``timeout_s``.
        """
        if self._consumer is None:
            self.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._step(0.01)
            if self.delayer is not None:
                self.delayer.step(0.0)
            if self._idle() and (self.delayer is None or self.delayer.idle()):
                return
        raise ResultTimeout(f"queues {self.queues} not drained within {timeout_s}s")

    def stop(self) -> None:
        """Ask the run loop to drain and return (thread-safe, signal-safe)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and stop the executor (does not wait for running tasks)."""
        if self.delayer is not None:
            self.delayer.close()  # a no-op when its own run() closed it
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self.executor.shutdown(wait=False)
        self.flows.close()
        self.app.broker.flush(5.0)

    def _install_signals(self) -> None:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                log.warning("second signal: exiting at once", signal=signum)
                os._exit(1)
            log.info("signal received: draining", signal=signum,
                     grace_s=self.settings.shutdown_grace_s)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # -- the loop ----------------------------------------------------------------

    @property
    def consumer(self) -> Consumer:
        """The group consumer (after :meth:`start`)."""
        if self._consumer is None:
            raise RuntimeError("worker not started")
        return self._consumer

    @property
    def outstanding(self) -> int:
        """Records taken in whose effects are not yet durable."""
        return sum(self._held.values())

    def _poll_timeout(self) -> float:
        return 0.005 if self.outstanding else 0.1

    def _step(self, timeout_s: float) -> None:
        for record in self.consumer.poll(timeout_s, _POLL_BATCH):
            self._accept(record)
        self._service()
        self._maybe_commit()
        self._apply_pauses()

    def _service(self) -> None:
        """Serve delivery reports, due retries and completions."""
        self.app.broker.poll(0)
        self.effects.run_due()
        self._collect_done()

    def _accept(self, record: Record) -> None:
        tp = record.tp
        if tp not in self._assigned:
            return
        self.tracker.add(tp, record.offset)
        self._held[tp] += 1
        self.stats["received"] += 1
        generation = self._generation[tp]
        msg: TaskMessage | None = None
        try:
            if record.value is None:
                raise DecodeError("record has no value (a tombstone?)")
            msg = self.app.codec.decode_task(record.value)
            task = self.app.get_task(msg.name)
            now = now_ms()
            if msg.expires_ms is not None and now > msg.expires_ms:
                self._expired(record, generation, msg)
                return
            if msg.eta_ms is not None and msg.eta_ms > now:
                self._postpone(record, generation, msg, now)
                return
            args, kwargs = bind_arguments(task.fn, msg.args, msg.kwargs)
        except MessageError as err:
            self._dead_letter(record, generation, msg, err)
            return
        job = _Job(record, generation, msg, task, args, kwargs)
        if task.options.ordered and msg.key is not None:
            slot = (tp, msg.key)
            if slot in self._waiting:
                self._waiting[slot].append(job)
                return
            self._waiting[slot] = deque()
        self._run(job)

    @staticmethod
    def _slot(job: _Job) -> tuple[TopicPartition, str] | None:
        if job.task.options.ordered and job.msg.key is not None:
            return (job.record.tp, job.msg.key)
        return None

    def _run(self, job: _Job) -> None:
        self.executor.submit(job.task, job.args, job.kwargs, partial(self._ran, job))

    def _ran(self, job: _Job, outcome: Outcome) -> None:
        """Runs in an executor thread: make the outcome durable, then mark the offset."""
        done = partial(self._mark_done, job.record, job.generation, self._slot(job))
        what = f"result of {job.msg.name} {job.msg.id}"
        error = outcome.error
        if error is None:
            try:
                follow_ups = self.flows.after_success(job.msg, outcome.result,
                                                      claimer_of(job.record))
            except FOLLOW_UP_ERRORS as err:
                # what follows cannot be sent (and never will): the task fails visibly
                error = err
                outcome = Outcome(states.FAILURE, None, err, None, outcome.started_ms,
                                  outcome.finished_ms)
            else:
                self.stats["succeeded"] += 1
                meta = self._meta(job.msg, outcome)
                self.effects.run([store_step(self.app.backend, meta), *follow_ups], done, what)
                return
        delay_s = self._retry_delay_s(job, error)
        if delay_s is not None:
            self.stats["retried"] += 1
            self.effects.run(self._retry_steps(job, outcome, delay_s), done, what)
            return
        self.stats["failed"] += 1
        if len(self.task_errors) < _MAX_KEPT_ERRORS:
            self.task_errors.append(error)
        log.info("task failed", task=job.msg.name, id=job.msg.id, attempt=job.msg.attempt,
                 error=f"{type(error).__name__}: {error}")
        reason = "retries-exhausted" if job.msg.attempt > 1 else "task-failed"
        self.effects.run(
            [store_step(self.app.backend, self._meta(job.msg, outcome)),
             self._dead_letter_step(job.record, reason, error),
             *self.flows.after_failure(job.msg, error, claimer_of(job.record))],
            done, what,
        )

    def _retry_delay_s(self, job: _Job, error: BaseException) -> float | None:
        """Return the delay before the next attempt, or None when the failure is final."""
        if isinstance(error, FOLLOW_UP_ERRORS):
            return None
        policy = job.task.options.retry
        try:
            policy = policy.with_options(job.msg.options)
        except (ValueError, StreamTasksError) as err:
            log.warning("malformed retry options ignored", id=job.msg.id, error=str(err))
        if not policy.allows(error, job.msg.attempt):
            return None
        if isinstance(error, Retry) and error.countdown_s is not None:
            delay_s = error.countdown_s
        else:
            delay_s = policy.delay_s(job.msg.attempt)
        if policy.deadline_ms is not None and now_ms() + delay_s * 1000 > policy.deadline_ms:
            return None
        return delay_s

    def _retry_steps(self, job: _Job, outcome: Outcome, delay_s: float) -> list[Step]:
        """RETRY row with the last error, then the next attempt into the delay tier."""
        meta = self._meta(job.msg, outcome)
        meta.state = states.RETRY
        now = now_ms()
        again = dataclasses.replace(
            job.msg, attempt=job.msg.attempt + 1, eta_ms=now + int(delay_s * 1000)
        )
        return [
            store_step(self.app.backend, meta),
            send_step(self.app.broker, self.app.topic_for(again, now),
                      self.app.codec.encode_task(again), job.record.key, task_headers(again),
                      job.record.partition),
        ]

    def _meta(self, msg: TaskMessage, outcome: Outcome) -> TaskMeta:
        err = outcome.error
        return TaskMeta(
            task_id=msg.id,
            state=outcome.state,
            name=msg.name,
            queue=msg.queue,
            result=outcome.result,
            error_type=type(err).__name__ if err is not None else None,
            error_message=str(err) if err is not None else None,
            traceback=outcome.traceback,
            attempts=msg.attempt,
            worker=self.name,
            created_ms=msg.created_ms,
            started_ms=outcome.started_ms,
            finished_ms=outcome.finished_ms,
            parent_id=msg.parent_id,
            root_id=msg.root_id,
            group_id=msg.group_id,
            group_index=msg.group_index,
        )

    def _dead_letter_step(self, record: Record, reason: str, error: BaseException) -> Step:
        """Send the record's original bytes to its queue's DLQ, with the reason."""
        queue_name = self._topic_queue.get(record.topic, record.topic)
        headers = dead_letter_headers(record, reason, error, self.group_id)
        self.stats["dead_lettered"] += 1
        log.warning("dead-lettered", topic=record.topic, partition=record.partition,
                    offset=record.offset, reason=reason, error=str(error))
        return send_step(self.app.broker, self.settings.dlq_topic(queue_name), record.value or b"",
                               record.key, headers, record.partition)

    def _dead_letter(
        self, record: Record, generation: int, msg: TaskMessage | None, err: MessageError
    ) -> None:
        """Send a record that can never run to the DLQ; write FAILURE when its id is known."""
        steps = [self._dead_letter_step(record, err.reason, err)]
        if msg is not None:
            failed = Outcome(states.FAILURE, None, err, None, now_ms(), now_ms())
            steps.insert(0, store_step(self.app.backend, self._meta(msg, failed)))
            steps += self.flows.after_failure(msg, err, claimer_of(record))
        self.effects.run(steps, partial(self._mark_done, record, generation),
                         f"dead letter of {record.topic}/{record.partition}@{record.offset}")

    def _postpone(self, record: Record, generation: int, msg: TaskMessage, now: int) -> None:
        """A task not yet due (sent or replayed straight to the queue): to its delay tier."""
        step = send_step(self.app.broker, self.app.topic_for(msg, now), record.value or b"",
                         record.key, record.headers, record.partition)
        self.effects.run([step], partial(self._mark_done, record, generation),
                         f"postponing {msg.id}")

    def _expired(self, record: Record, generation: int, msg: TaskMessage) -> None:
        meta = self._meta(msg, Outcome(states.REVOKED, None, None, None, now_ms(), now_ms()))
        meta.error_type, meta.error_message = "Expired", f"expired at {msg.expires_ms} ms"
        expired = TaskExpired(f"task {msg.id} expired at {msg.expires_ms} ms before it ran")
        steps = [store_step(self.app.backend, meta),
                 *self.flows.after_failure(msg, expired, claimer_of(record))]
        self.effects.run(steps, partial(self._mark_done, record, generation),
                         f"expiry of {msg.id}")

    def _mark_done(
        self, record: Record, generation: int, slot: tuple[TopicPartition, str] | None = None
    ) -> None:
        """Any thread: the record's effects are durable."""
        self._done.put((record.tp, record.offset, generation, slot))

    def _collect_done(self) -> None:
        while True:
            try:
                tp, offset, generation, slot = self._done.get_nowait()
            except queue.Empty:
                return
            if generation != self._generation[tp] or tp not in self._assigned:
                continue  # a partition revoked or lost meanwhile
            self.tracker.mark_done(tp, offset)
            self._held[tp] -= 1
            self._start_next_of_key(slot)

    def _start_next_of_key(self, slot: tuple[TopicPartition, str] | None) -> None:
        """An ordered task ended: start the next record of its key, if one waits."""
        if slot is None or slot not in self._waiting:
            return
        waiting = self._waiting[slot]
        if waiting:
            self._run(waiting.popleft())
        else:
            del self._waiting[slot]

    # -- commits and pauses ------------------------------------------------------

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.settings.commit_interval_s:
            return
        self._last_commit = now
        commit_watermarks(self.consumer, self.tracker, asynchronous=not force)

    def _apply_pauses(self) -> None:
        """Pause partitions: all while full (until half the room is free) or draining.

        Otherwise only partitions whose slow head holds too many records behind it.
        """
        if self.outstanding >= self.max_in_flight:
            self._full = True
        elif self.outstanding <= self.max_in_flight // 2:
            self._full = False
        if self._stop.is_set() or self._full:
            wanted = set(self._assigned)
        else:
            cap = self.max_in_flight * _SLOW_HEAD_FACTOR
            wanted = {tp for tp in self._assigned if self.tracker.in_flight(tp) > cap}
        to_pause = wanted - self._paused
        to_resume = (self._paused - wanted) & self._assigned
        if self._reapply_pauses:
            to_pause = wanted
            self._reapply_pauses = False
        if to_pause:
            self.consumer.pause(sorted(to_pause))
        if to_resume:
            self.consumer.resume(sorted(to_resume))
        self._paused = wanted

    # -- rebalance listener (called inside consumer.poll) ------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """New partitions: track them; pauses are re-applied after the poll."""
        for tp in partitions:
            self._generation[tp] += 1
            self._held[tp] = 0
        self._assigned.update(partitions)
        self._reapply_pauses = True
        log.info("partitions assigned", partitions=_names(partitions))

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions leaving: let their running tasks finish (grace), commit, release."""
        mine = [tp for tp in partitions if tp in self._assigned]
        self._forget_waiting(mine)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(self._held[tp] for tp in mine) and time.monotonic() < deadline:
            self._service()
            time.sleep(0.005)
        commit_watermarks(self.consumer, self.tracker, mine, asynchronous=False)
        self._release(mine)
        log.info("partitions revoked", partitions=_names(mine))

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost: another member may own them; drop without committing."""
        mine = [tp for tp in partitions if tp in self._assigned]
        self._forget_waiting(mine)
        self._release(mine)
        log.warning("partitions lost", partitions=_names(mine))

    def _forget_waiting(self, partitions: Sequence[TopicPartition]) -> None:
        gone = set(partitions)
        for slot in [s for s in self._waiting if s[0] in gone]:
            self._held[slot[0]] -= len(self._waiting.pop(slot))

    def _release(self, partitions: Sequence[TopicPartition]) -> None:
        self.tracker.drop(partitions)
        for tp in partitions:
            self._generation[tp] += 1
            self._held.pop(tp, None)
        self._assigned.difference_update(partitions)
        self._paused.difference_update(partitions)

    # -- draining ----------------------------------------------------------------

    def _drain(self, grace_s: float) -> None:
        """Stop taking records, let running tasks finish within ``grace_s``, commit."""
        if self._consumer is None:
            return
        self._stop.set()
        self._forget_waiting(list(self._assigned))
        deadline = time.monotonic() + grace_s
        while (self.outstanding or self.effects.active) and time.monotonic() < deadline:
            self._apply_pauses()
            for record in self.consumer.poll(0.02, _POLL_BATCH):
                self._accept(record)
            self._service()
        self._maybe_commit(force=True)
        log.info("worker drained", worker=self.name, left=self.outstanding, **self.stats)

    def _idle(self) -> bool:
        if self.outstanding or self.effects.active or not self._assigned:
            return False
        self._maybe_commit(force=True)
        return caught_up(self.consumer, self.app.broker, self._assigned)


def _names(partitions: Sequence[TopicPartition]) -> list[str]:
    return [f"{tp.topic}/{tp.partition}" for tp in partitions]
