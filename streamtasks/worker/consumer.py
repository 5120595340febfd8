"""The worker: one consumer group membership per queue, tasks run, outcomes made durable.

One thread owns the worker's consumers (a :class:`PartitionRuntime` per queue, group
``{ns}.{queue}``, whatever set of queues the worker serves) and runs :meth:`Worker._step`:
poll each, hand the records to the executor, carry out the outcomes that came back,
commit. A task's outcome is decided by :func:`outcomes.decide` (a pure function) and
carried out here as a chain of durable effects (its row, its follow-ups, a dead letter);
only when the chain is done is the record's lease done, and only the contiguous done
watermark of each partition is committed.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from streamtasks import states
from streamtasks.backend.base import TaskMeta
from streamtasks.broker.base import Record, TopicPartition
from streamtasks.codec import bind_arguments
from streamtasks.context import Running
from streamtasks.control import ControlListener, RevokedIds
from streamtasks.durability import check_worker_start
from streamtasks.errors import (
    ArgumentError,
    BackendError,
    ConfigError,
    DecodeError,
    MessageError,
    ResultTimeout,
    Retry,
    TaskExpired,
    TaskRevoked,
)
from streamtasks.headers import task_headers
from streamtasks.logs import get_logger
from streamtasks.message import TaskMessage, now_ms
from streamtasks.ratelimit import RateGate, rate_gate
from streamtasks.schedules import Scheduler, SchedulerThread
from streamtasks.task import Task
from streamtasks.tracing import record_traceparent
from streamtasks.worker.deadletter import dead_letter_headers
from streamtasks.worker.delayer import DelayForwarder
from streamtasks.worker.effects import EffectRunner, Step, StepDone, send_step, store_step
from streamtasks.worker.executor import Executor, Outcome
from streamtasks.worker.flows import CHORD_BODY, FollowUps, claimer_of
from streamtasks.worker.hooks import HookRunner
from streamtasks.worker.observe import NullObserver, WorkerObserver
from streamtasks.worker.outcomes import (
    FAIL,
    FOLLOW_UP_ERRORS,
    RETRY,
    decide,
    error_text,
    final_error,
    safe_text,
)
from streamtasks.worker.progress import ProgressWriter, RunProgress
from streamtasks.worker.runtime import Lease, PartitionRuntime
from streamtasks.workflow import as_failure_pair

if TYPE_CHECKING:
    from streamtasks.app import App

log = get_logger("streamtasks.worker")

_SLOW_HEAD_FACTOR = 10
#: A worker full of records not yet durable for this long pauses every partition.
_FULL_PAUSE_AFTER_S = 1.0
_MAX_KEPT_ERRORS = 100
#: Restarts of the delay forwarder in a row (without a healthy minute) before the worker
#: gives up and exits non-zero, so that its supervisor (Kubernetes) restarts it.
_FORWARDER_RESTARTS = 5
_FORWARDER_HEALTHY_S = 60.0

_Slot = tuple[TopicPartition, str]


def _bind(task: Task[Any, Any], msg: TaskMessage) -> tuple[list[Any], dict[str, Any]]:
    """Bind a record's arguments to its task (an error callback's failure as it takes it).

    Raises:
        ArgumentError: the arguments fit neither as sent nor, for an error callback
            taking two arguments, as ``(task_id, "Type: message")``.
    """
    try:
        return bind_arguments(task.fn, msg.args, msg.kwargs)
    except ArgumentError as err:
        pair = as_failure_pair(msg.args)
        if pair is None:
            raise
        try:
            return bind_arguments(task.fn, pair, msg.kwargs)
        except ArgumentError:
            raise err from None


@dataclass(slots=True)
class _Job:
    """A record taken in to run: the executor's run of it too (:class:`Run`)."""

    worker: Worker
    record: Record
    lease: Lease
    group_id: str
    msg: TaskMessage
    task: Task[Any, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    ended: bool = False
    #: A duplicate record of a chord body whose row is already final: not run.
    skipped: bool = False
    #: When the outcome's effects were started (monotonic s; 0 before).
    effects_started: float = 0.0
    #: The run's request, current while it runs (``self.request``).
    running: Running | None = None
    #: RECEIVED / STARTED bookkeeping, or None when nothing is written for it.
    progress: RunProgress | None = None
    #: Revoked while it waited to start: not run, ends REVOKED.
    revoked: bool = False
    #: The run's log fields and the record's traceparent (set when it is submitted).
    context: Mapping[str, object] | None = None

    @property
    def inline(self) -> bool:
        """A chord body never runs inline: its start reads its row first."""
        return CHORD_BODY not in self.msg.options

    def start(self) -> bool:
        """In the thread about to run it: may it run (:meth:`Worker._may_start`)?"""
        return self.worker._may_start(self)

    def done(self, outcome: Outcome | None) -> None:
        """In the thread that ran it: hand the outcome to the worker (:meth:`Worker._ran`)."""
        self.worker._ran(self, outcome)

    @property
    def slot(self) -> _Slot | None:
        """The ordering slot of a task that keeps its key's records in order."""
        if CHORD_BODY in self.msg.options:
            # duplicates of one body record run one after another, so the second
            # finds the first's final row and is skipped
            return (self.record.tp, "\0body:" + self.msg.id)
        if self.task.options.ordered and self.msg.key is not None:
            return (self.record.tp, self.msg.key)
        return None


def _freeze_startup_objects() -> None:
    """Move what start-up built (modules, clients, settings) out of the collector's way.

    A worker allocates a few container objects per record; those surviving a young
    collection reach the oldest generation, and each full collection then walked every
    object start-up built too: the modules, and the clients' metadata (the Cassandra
    driver's schema model alone is many thousands). ``gc.freeze()`` after a collection,
    once the clients are connected, leaves those to the permanent generation. Freezing
    before start (modules only), as the CLI did, against after: drain A/B median CPU per
    task 82 -> 71 us (``bench/ab_drain.py``, 3 rounds); raising the young threshold on
    top measured no better. Not for a worker running inside another program (tests):
    that program's garbage would be frozen too.
    """
    gc.collect()
    gc.freeze()


class Worker:
    """Consumes queues as one member of each queue's consumer group and runs their tasks.

    Args:
        app: the app whose registered tasks run here.
        queues: the queues to consume.
        concurrency: tasks running at once (default: the ``concurrency`` setting).
        max_in_flight: records held before partitions are paused.
        name: this worker's name in result rows (default ``host:pid``).
        observer: told about tasks finished, dead letters, commits (metrics).
        beat: fire the app's periodic tasks from a thread of this worker (each due time
            is claimed once across all workers, see ``docs/control.md``).
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        *,
        concurrency: int | None = None,
        max_in_flight: int | None = None,
        name: str | None = None,
        observer: WorkerObserver | None = None,
        beat: bool = True,
    ) -> None:
        self.app = app
        self.beat = beat
        self.observer: WorkerObserver = observer or NullObserver()
        self.settings = app.settings
        self.queues = list(dict.fromkeys(queues))
        for q in self.queues:
            self.settings.topology.check_queue(q)
        self.concurrency = concurrency or self.settings.concurrency
        self.max_in_flight = max(max_in_flight or self.settings.max_in_flight, self.concurrency)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._topic_queue = {self.settings.topic(q): q for q in self.queues}
        self.effects = EffectRunner()
        self.runtimes = [
            PartitionRuntime(
                app.broker, self.settings.group_id(q), [self.settings.topic(q)], self,
                commit_interval_s=self.settings.commit_interval_s,
                grace_s=self.settings.shutdown_grace_s, eager=True, service=self._service,
                observer=self.observer,
            )
            for q in self.queues
        ]
        self.flows = FollowUps(app, self.name)
        self.progress = ProgressWriter(app.backend, self.name,
                                       self.settings.track_started_after_ms / 1000,
                                       self.settings.track_started)
        self.executor = Executor(self.concurrency,
                                 inline_max_s=self.settings.inline_max_ms / 1000)
        #: Runs tasks' hooks off this loop (a slow hook holds up no result or commit).
        self.hooks = HookRunner()
        #: Task ids revoked (read from the control topic by :attr:`control`).
        self.revoked = RevokedIds()
        self.control = ControlListener(app, self.revoked, on_terminate=self.executor.terminate)
        self.rates: RateGate[_Job] = rate_gate(app, self.queues)
        #: Errors raised by tasks here, newest last (kept for :meth:`App.drain`).
        self.task_errors: list[BaseException] = []
        #: Forwards this worker's delayed records when due (``run_delayer``), or None.
        self.delayer: DelayForwarder | None = None
        #: Exit code of :meth:`run`: non-zero when the worker could not keep running whole.
        self.exit_code = 0
        self._outcomes: queue.SimpleQueue[tuple[_Job, Outcome | None]] = queue.SimpleQueue()
        self._full = False
        self._full_since: float | None = None
        #: This thread completes the backend's writes (:meth:`ResultBackend.own_writes`).
        self._owns_writes = False
        self._waiting: dict[_Slot, deque[_Job]] = {}
        self._stop = threading.Event()
        #: The logger of the outcome lines, bound once per batch (:meth:`_carry_out_outcomes`).
        self._log: Any = log
        self.stats = {"received": 0, "succeeded": 0, "failed": 0, "retried": 0,
                      "dead_lettered": 0, "dropped": 0}

    @property
    def group_ids(self) -> list[str]:
        """The consumer groups this worker is a member of (one per queue)."""
        return [rt.group_id for rt in self.runtimes]

    @property
    def group_id(self) -> str:
        """The consumer group of the worker's first queue (see :attr:`group_ids`)."""
        return self.runtimes[0].group_id

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Check the result schema, create the queues' topics (when allowed), join the groups.

        Raises:
            BrokerError: no Kafka broker answered (a wrong or dead address); a worker
                waiting for ever would look alive to its supervisor and do nothing.
            ConfigError: the result store lacks schema migrations (run ``streamtasks
                migrate``): every result write would fail.
        """
        # First, and whatever create_topics says: a worker with no broker must end.
        # A result store down is tolerated (_check_schema): writes are retried.
        self.app.broker.check_reachable()
        self._check_schema()
        check_worker_start(self.app.settings, self.app.broker, self.app.backend,
                           [self.app.settings.topic(q) for q in self.queues])
        for q in self.queues:
            self.app.ensure_queue(q)
        # revokes made before this worker started are known before its first task
        self.control.start()
        for rt in self.runtimes:
            rt.start()
        if self.settings.run_delayer and self.delayer is None:
            self.delayer = DelayForwarder(self.app, self.queues, observer=self.observer)
            self.delayer.start()
        log.info("worker started", worker=self.name, queues=self.queues, groups=self.group_ids,
                 concurrency=self.concurrency, max_in_flight=self.max_in_flight)

    def _check_schema(self) -> None:
        """Refuse to start on a result store without its tables; tolerate one down.

        A store that is down now may come back (writes are retried until it does); a
        store that answers without the tables would fail every write for ever.
        """
        try:
            pending = self.app.backend.pending_migrations()
        except BackendError as err:
            log.warning("cannot check the result schema now; starting anyway",
                        error=error_text(err))
            return
        if pending:
            raise ConfigError(
                f"the result store lacks {len(pending)} schema migration(s) "
                f"({', '.join(pending)}): run `streamtasks migrate` first"
            )

    def run(self, install_signals: bool = True, freeze_startup: bool = False) -> int:
        """Run until :meth:`stop` or SIGTERM / SIGINT, drain, and return the exit code.

        The exit code is 0 after a drain, 1 when the delay forwarder could not be kept
        running. A second signal exits at once (code 1) without draining. With
        ``freeze_startup`` (a process that is the worker: the CLI's), what start-up built
        is frozen out of the garbage collector's way once the groups are joined (see
        :func:`_freeze_startup_objects`).
        """
        if install_signals:
            self._install_signals()
        self.start()
        forwarder_stop = threading.Event()
        forwarder_thread = None
        if self.delayer is not None:
            # Its own consumer groups and thread: waiting records are not this group's lag.
            forwarder_thread = threading.Thread(
                target=self._supervise_forwarder, args=(forwarder_stop,),
                name="streamtasks-delayer", daemon=True,
            )
            forwarder_thread.start()
        scheduler = self._start_scheduler()
        if freeze_startup:
            _freeze_startup_objects()
        # The loop's thread completes its own writes: no second thread wakes for each
        # acknowledgement and contends for the GIL with it (docs/decisions.md).
        self._owns_writes = self.app.backend.own_writes()
        try:
            while not self._stop.is_set():
                self._step(self._poll_timeout())
        finally:
            if scheduler is not None:
                scheduler.stop()
            forwarder_stop.set()
            self._drain(self.settings.shutdown_grace_s)
            if forwarder_thread is not None:
                forwarder_thread.join(self.settings.shutdown_grace_s + 5)
            if self._owns_writes:  # before close: what closes may wait for a write
                self._owns_writes = False
                self.app.backend.release_writes()
            self.close()
        return self.exit_code

    def _start_scheduler(self) -> SchedulerThread | None:
        if not (self.beat and self.app.schedules):
            return None
        thread = SchedulerThread(Scheduler(self.app, self.name, observer=self.observer))
        thread.start()
        return thread

    def _supervise_forwarder(self, stop: threading.Event) -> None:
        """Run the delay forwarder; restart it after an error, or stop the worker (exit 1).

        Without its forwarder a worker would run on while countdowns, ETAs and retries
        stop: better to exit and be restarted.
        """
        restarts = 0
        delay_s = 1.0
        while not stop.is_set():
            forwarder = self.delayer
            assert forwarder is not None
            began = time.monotonic()
            try:
                forwarder.run(stop)
                return
            except Exception as err:
                if time.monotonic() - began > _FORWARDER_HEALTHY_S:
                    restarts, delay_s = 0, 1.0
                restarts += 1
                log.error("delay forwarder failed; restarting it", restarts=restarts,
                          retry_in_s=delay_s, error=f"{type(err).__name__}: {error_text(err)}",
                          exc_info=True)
                if restarts > _FORWARDER_RESTARTS:
                    log.critical("delay forwarder keeps failing: the worker stops",
                                 restarts=restarts)
                    self.exit_code = 1
                    self.stop()
                    return
                forwarder.abandon()
                if stop.wait(delay_s):
                    return
                delay_s = min(delay_s * 2, 30.0)
                self.delayer = DelayForwarder(self.app, self.queues, observer=self.observer)
                self.delayer.start()

    def run_until_idle(self, timeout_s: float) -> None:
        """Run until every record of the queues is done and committed (tests, scripts).

        Raises:
            ResultTimeout: not idle within ``timeout_s``.
        """
        if not self.runtimes[0].started:
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
        """Leave the groups and stop the executor (does not wait for running tasks)."""
        if self.delayer is not None:
            self.delayer.close()  # a no-op when its own run() closed it
        for rt in self.runtimes:
            rt.close()
        self.control.close()
        self.rates.close()
        self.executor.shutdown(wait=False)
        self.hooks.close(self.settings.shutdown_grace_s)
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
    def outstanding(self) -> int:
        """Records taken in whose effects are not yet durable."""
        return sum(rt.outstanding for rt in self.runtimes)

    def _poll_timeout(self) -> float:
        return 0.005 if self.outstanding else 0.1

    def _step(self, timeout_s: float) -> None:
        self.executor.new_turn()
        share = timeout_s / len(self.runtimes)
        for rt in self.runtimes:
            # Take no more than the room left: pausing (which drops what librdkafka
            # fetched ahead, and costs a new fetch on resume) is kept for a lasting stall.
            room = self.max_in_flight - self.outstanding
            if room > 0 or self._full:
                rt.poll(share, room)  # paused while full: a poll serves the group only
            elif self._outcomes.empty():
                # Full, not paused yet: a poll would take a record each turn (thousands
                # a second beyond max_in_flight while the first writes warm up). Wait
                # for a record to become durable instead; outcomes waiting are served
                # at once (their writes are what frees room).
                if self._owns_writes:
                    self.app.backend.pump_writes(share)  # its acknowledgements end leases
                else:
                    rt.wait_ended(share)
        self._service()
        for rt in self.runtimes:
            rt.maybe_commit()
        self._apply_pauses()
        self.observer.loop_turned("worker")

    def _service(self) -> None:
        """Serve delivery reports, due effect steps, outcomes, and ended leases."""
        self.app.broker.poll(0)
        for job in self.rates.release():
            self._run(job)
        self.effects.run_due()
        self._carry_out_outcomes()
        self.progress.write_due()
        if self._owns_writes:
            self.app.backend.pump_writes()  # sends what was stored, ends what is written
        for rt in self.runtimes:
            rt.collect()

    # -- taking records in (PartitionHandler) --------------------------------------

    def take(self, record: Record, runtime: PartitionRuntime) -> None:
        """A polled record: decode, check, and queue it to run (or end it at once)."""
        lease = runtime.track(record)
        self.stats["received"] += 1
        msg: TaskMessage | None = None
        try:
            if record.value is None:
                raise DecodeError("record has no value (a tombstone?)")
            msg = self.app.codec.decode_task(record.value)
            task = self.app.get_task(msg.name)
            if self.revoked.match(msg) is not None:
                self._record_effects(lease, self._revoked_steps(record, msg),
                                     f"revoke of {msg.id}")
                return
            now = now_ms()
            if msg.expires_ms is not None and now > msg.expires_ms:
                self._expired(record, lease, runtime.group_id, msg)
                return
            if msg.eta_ms is not None and msg.eta_ms > now:
                self._postpone(record, lease, msg, now)
                return
            args, kwargs = _bind(task, msg)
        except MessageError as err:
            self._dead_letter(record, lease, runtime.group_id, msg, err)
            return
        job = _Job(self, record, lease, runtime.group_id, msg, task, args, kwargs)
        job.progress = self.progress.track(msg, task.options.track_started, lease.current)
        slot = job.slot
        if slot is not None:
            if slot in self._waiting:
                self._waiting[slot].append(job)
                self.progress.waiting(job.progress)  # RECEIVED if it waits long
                return
            self._waiting[slot] = deque()
        self._submit(job)

    def released(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions left: forget the records of their ordered keys still waiting."""
        gone = set(partitions)
        for slot in [s for s in self._waiting if s[0] in gone]:
            for job in self._waiting.pop(slot):
                job.lease.drop()
        for job in self.rates.drop(gone):
            job.lease.drop()

    def holds(self) -> set[TopicPartition]:
        """Partitions with a slow head holding too many records, or with rate-limited ones."""
        cap = self.max_in_flight * _SLOW_HEAD_FACTOR
        return {tp for rt in self.runtimes for tp in rt.assigned
                if rt.tracker.in_flight(tp) > cap} | self.rates.held()

    def _submit(self, job: _Job) -> None:
        if not self.rates.admit(job.task.name, job.record.tp, job):
            self.observer.rate_limited(job.msg.queue, job.msg.name)
            self.progress.waiting(job.progress)  # RECEIVED if it waits long for a token
            return
        self._run(job)

    def _run(self, job: _Job) -> None:
        record, msg = job.record, job.msg
        job.context = {"task_id": msg.id, "queue": msg.queue, "attempt": msg.attempt,
                       "partition": record.partition, "offset": record.offset,
                       "traceparent": record_traceparent(record.headers, msg.traceparent)}
        job.running = Running(job.task, msg, record.partition, record.offset, self.name)
        self.executor.submit(job)

    def _ran(self, job: _Job, outcome: Outcome | None) -> None:
        """In the thread that ran the task: hand the outcome to the worker's thread."""
        if job.progress is not None:
            job.progress.finished = True
        if outcome is not None and outcome.traceparent:
            # follow-ups (retry, chain step, callbacks, chord body) inherit the message's
            # traceparent: from here on it is the run's span, their parent
            job.msg.traceparent = outcome.traceparent
        self._outcomes.put((job, outcome))

    def _may_start(self, job: _Job) -> bool:
        """In the thread about to run the task: may it run?

        Not when its partition was revoked or lost while it was queued (the next owner
        runs it), nor when it is a chord body whose row is already final (a duplicate
        record sent by a member that carried out the chord's decision again).
        """
        if not job.lease.start():
            return False
        if self.revoked.match(job.msg) is not None:
            job.revoked = True
            return False
        if CHORD_BODY in job.msg.options:
            try:
                meta = self.app.backend.fetch(job.msg.id)
            except Exception as err:  # cannot tell: run it (at least once)
                log.warning("cannot read a chord body's row; running it", id=job.msg.id,
                            error=f"{type(err).__name__}: {error_text(err)}")
                return True
            if meta is not None and meta.ready:
                job.skipped = True
                return False
        self.progress.started(job.progress)
        return True

    # -- carrying outcomes out (the loop thread) -----------------------------------

    def _carry_out_outcomes(self) -> None:
        """Carry out the outcomes that came back; plain successes are written as one batch."""
        plain: list[tuple[_Job, TaskMeta]] = []
        bound = False
        while True:
            try:
                job, outcome = self._outcomes.get_nowait()
            except queue.Empty:
                break
            if not bound:  # one logger for the batch's lines: the proxy binds at each use
                self._log, bound = log.bind(), True
            try:
                self._carry_out(job, outcome, plain)
            except Exception as err:
                # Never a frozen record: whatever went wrong, the task ends visibly.
                log.error("carrying out an outcome failed; the task fails",
                          id=job.msg.id, error=f"{type(err).__name__}: {error_text(err)}",
                          exc_info=True)
                self._give_up(job, err, fallback=False)
        if plain:
            self._store_batch(plain)

    def _store_batch(self, batch: list[tuple[_Job, TaskMeta]]) -> None:
        """Write the rows of tasks that succeeded with nothing to follow, as one batch.

        One effect for the batch (``store_many``: rows as single-row writes, listing
        entries batched per partition); each job's lease is done when all are durable.
        Rows of partitions released meanwhile are left out at each try. A permanent
        error splits the batch: each task then goes its own way (a result that cannot be
        encoded fails that task alone).
        """
        backend = self.app.backend

        def step(done: StepDone) -> None:
            live = [meta for job, meta in batch if job.lease.current()]
            backend.store_many(live).add_done_callback(lambda f: done(f.exception()))

        def all_done() -> None:
            for job, _ in batch:
                self._job_done(job)

        def split(_error: BaseException) -> None:
            for job, meta in batch:
                self._effects(job, [store_step(backend, meta)],
                              f"result of {job.msg.name} {job.msg.id}")

        self.effects.run([step], all_done, f"results of {len(batch)} tasks", on_failed=split,
                         guard=lambda: any(job.lease.current() for job, _ in batch))

    def _carry_out(
        self, job: _Job, outcome: Outcome | None, plain: list[tuple[_Job, TaskMeta]]
    ) -> None:
        """Make a run's outcome durable, as :func:`decide` says, then end its lease."""
        if job.skipped:
            log.info("chord body already ran: duplicate record skipped", id=job.msg.id,
                     group=job.msg.options.get(CHORD_BODY))
            self._job_done(job)
            return
        if job.revoked or (outcome is not None and outcome.state == states.REVOKED
                           and job.lease.current()):
            job.effects_started = time.monotonic()
            self._effects(job, self._revoked_steps(job.record, job.msg, outcome),
                          f"revoke of {job.msg.id}")
            return
        if outcome is None or not job.lease.current():
            # Not run (its partition left while it was queued), or it ran but the
            # partition is no longer ours: the owner runs it; write nothing over its row.
            self.stats["dropped"] += 1
            job.ended = True
            job.lease.drop()
            if job.lease.current():  # refused during a revoke: the key's next may start
                self._start_next_of_key(job.slot)
            return
        msg, error = job.msg, outcome.error
        if error is None:
            try:
                follow_ups = self.flows.after_success(msg, outcome.result,
                                                      claimer_of(job.record))
            except FOLLOW_UP_ERRORS as err:
                error = err  # what follows cannot be sent (and never will): fail visibly
                outcome = dataclasses.replace(outcome, state=states.FAILURE, result=None,
                                              error=err, traceback=None)
            else:
                self.stats["succeeded"] += 1
                self._finished(job, outcome, states.SUCCESS)
                self.hooks.succeeded(job.running, outcome.result)
                meta = self._meta(msg, outcome)
                if follow_ups:
                    self._effects(job, [store_step(self.app.backend, meta), *follow_ups],
                                  f"result of {msg.name} {msg.id}")
                else:
                    plain.append((job, meta))
                return
        decision = decide(job.task.options.retry, msg.options, msg.attempt, error, now_ms())
        if decision.note is not None:
            log.warning("retry policy", id=msg.id, note=decision.note)
        if decision.kind == RETRY:
            assert decision.delay_s is not None
            self.stats["retried"] += 1
            self._finished(job, outcome, states.RETRY, error)
            self.hooks.retrying(job.running, error, outcome.traceback)
            self._effects(job, self._retry_steps(job, outcome, decision.delay_s),
                          f"retry of {msg.name} {msg.id}")
            return
        assert decision.kind == FAIL and decision.reason is not None
        error = final_error(error)
        if error is not outcome.error:
            outcome = dataclasses.replace(outcome, error=error)
        self._fail(job, outcome, error, decision.reason)

    def _finished(
        self, job: _Job, outcome: Outcome, state: str, error: BaseException | None = None
    ) -> None:
        job.effects_started = time.monotonic()
        duration_s = max(0, outcome.finished_ms - outcome.started_ms) / 1000
        self.observer.task_finished(job.msg.queue, job.msg.name, state, duration_s)
        msg = job.msg  # one line per outcome: what an operator greps for first
        if error is None:
            self._log.info("task finished", task=msg.name, id=msg.id, queue=msg.queue,
                           attempt=msg.attempt, state=state, duration_s=duration_s)
        else:
            self._log.info("task finished", task=msg.name, id=msg.id, queue=msg.queue,
                           attempt=msg.attempt, state=state, duration_s=duration_s,
                           error=f"{type(error).__name__}: {error_text(error)}")

    def _fail(self, job: _Job, outcome: Outcome, error: BaseException, reason: str) -> None:
        self.stats["failed"] += 1
        self._finished(job, outcome, states.FAILURE, error)
        if len(self.task_errors) < _MAX_KEPT_ERRORS:
            self.task_errors.append(error)
        msg = job.msg
        self.hooks.failed(job.running, error, outcome.traceback, self.app.failure_handlers)
        self._effects(
            job,
            [store_step(self.app.backend, self._meta(msg, outcome)),
             self._dead_letter_step(job.record, job.group_id, reason, error),
             *self.flows.after_failure(msg, error, claimer_of(job.record),
                                       outcome.traceback)],
            f"failure of {msg.name} {msg.id}",
        )

    def _effects(self, job: _Job, steps: list[Step], what: str) -> None:
        """Run ``steps``; a permanent error in one of them fails the task visibly."""
        self.effects.run(steps, lambda: self._job_done(job), what,
                         on_failed=lambda err: self._give_up(job, err, fallback=True),
                         guard=job.lease.current)

    def _job_done(self, job: _Job) -> None:
        if job.ended:
            return
        job.ended = True
        job.lease.done()
        if job.effects_started:
            self.observer.result_written(time.monotonic() - job.effects_started)
        self._start_next_of_key(job.slot)

    def _give_up(self, job: _Job, error: BaseException, *, fallback: bool) -> None:
        """The outcome could not be carried out: FAILURE row and dead letter, sanitised.

        Used once per record: if even this fails for good, the record is let go with an
        error line rather than holding its partition for ever.
        """
        msg = job.msg

        def let_go(err: BaseException) -> None:
            log.error("the failure of a task could not be recorded; the record is let go",
                      id=msg.id, topic=job.record.topic, partition=job.record.partition,
                      offset=job.record.offset, error=f"{type(err).__name__}: {error_text(err)}")
            self._job_done(job)

        now = now_ms()
        failed = Outcome(states.FAILURE, None, error, None, now, now)
        steps: list[Step] = []
        builders: list[Callable[[], list[Step]]] = [
            lambda: [store_step(self.app.backend, self._meta(msg, failed))],
            lambda: [self._dead_letter_step(job.record, job.group_id, "effect-failed", error)],
        ]
        if fallback:
            builders.append(lambda: self.flows.after_failure(msg, error, claimer_of(job.record)))
        for build in builders:  # each part that can be built is recorded
            try:
                steps += build()
            except Exception as err:
                log.error("part of a task's failure cannot be recorded", id=msg.id,
                          error=f"{type(err).__name__}: {error_text(err)}")
        if not steps:
            let_go(error)
            return
        self.stats["failed"] += 1
        self.effects.run(steps, lambda: self._job_done(job), f"failure of {msg.name} {msg.id}",
                         on_failed=let_go, guard=job.lease.current)

    def _start_next_of_key(self, slot: _Slot | None) -> None:
        """An ordered task ended: start the next record of its key, if one waits."""
        if slot is None or slot not in self._waiting:
            return
        waiting = self._waiting[slot]
        if waiting:
            self._submit(waiting.popleft())
        else:
            del self._waiting[slot]

    def _retry_steps(self, job: _Job, outcome: Outcome, delay_s: float) -> list[Step]:
        """RETRY row with the last error, then the next attempt into the delay tier."""
        meta = self._meta(job.msg, outcome)
        meta.state = states.RETRY
        now = now_ms()
        options = job.msg.options
        if isinstance(outcome.error, Retry) and outcome.error.max_retries is not None:
            # self.retry(max_retries=N): the limit of the attempts after (their request's
            # max_retries and retries_left read it), as apply_async(max_retries=N) is
            options = {**options, "max_retries": str(outcome.error.max_retries)}
        again = dataclasses.replace(
            job.msg, attempt=job.msg.attempt + 1, eta_ms=now + int(delay_s * 1000),
            options=options,
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
            error_message=error_text(err) if err is not None else None,
            traceback=safe_text(outcome.traceback, 32_000) if outcome.traceback else None,
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

    def _dead_letter_step(
        self, record: Record, group_id: str, reason: str, error: BaseException
    ) -> Step:
        """Send the record's original bytes to its queue's DLQ, with the reason."""
        queue_name = self._topic_queue.get(record.topic, record.topic)
        headers = dead_letter_headers(record, reason, error, group_id)
        self.stats["dead_lettered"] += 1
        self.observer.dead_lettered(queue_name, reason)
        log.warning("dead-lettered", topic=record.topic, partition=record.partition,
                    offset=record.offset, reason=reason, error=error_text(error))
        return send_step(self.app.broker, self.settings.dlq_topic(queue_name),
                         record.value or b"", record.key, headers, record.partition)

    def _record_effects(self, lease: Lease, steps: list[Step], what: str,
                        on_failed: Callable[[BaseException], None] | None = None) -> None:
        """Effects of a record that never runs as a task (dead letter, expiry, postpone)."""
        if not lease.start():
            return
        self.effects.run(steps, lease.done, what, on_failed=on_failed, guard=lease.current)

    def _dead_letter(
        self, record: Record, lease: Lease, group_id: str, msg: TaskMessage | None,
        err: MessageError,
    ) -> None:
        """Send a record that can never run to the DLQ; write FAILURE when its id is known."""
        steps = [self._dead_letter_step(record, group_id, err.reason, err)]
        if msg is not None:
            failed = Outcome(states.FAILURE, None, err, None, now_ms(), now_ms())
            steps.insert(0, store_step(self.app.backend, self._meta(msg, failed)))
            steps += self.flows.after_failure(msg, err, claimer_of(record))

        def let_go(error: BaseException) -> None:
            log.error("a dead letter could not be recorded; the record is let go",
                      topic=record.topic, partition=record.partition, offset=record.offset,
                      error=f"{type(error).__name__}: {error_text(error)}")
            lease.done()

        self._record_effects(lease, steps,
                             f"dead letter of {record.topic}/{record.partition}@{record.offset}",
                             on_failed=let_go)

    def _postpone(self, record: Record, lease: Lease, msg: TaskMessage, now: int) -> None:
        """A task not yet due (sent or replayed straight to the queue): to its delay tier."""
        step = send_step(self.app.broker, self.app.topic_for(msg, now), record.value or b"",
                         record.key, record.headers, record.partition)
        self._record_effects(lease, [step], f"postponing {msg.id}")

    def _expired(self, record: Record, lease: Lease, group_id: str, msg: TaskMessage) -> None:
        expired = TaskExpired(f"task {msg.id} expired at {msg.expires_ms} ms before it ran")
        steps = self._unrun_steps(record, msg, expired, "Expired",
                                  f"expired at {msg.expires_ms} ms")
        self._record_effects(lease, steps, f"expiry of {msg.id}")

    def _revoked_steps(self, record: Record, msg: TaskMessage,
                       outcome: Outcome | None = None) -> list[Step]:
        """A revoked task: REVOKED row; its workflow stops (error callbacks, chord fails)."""
        self.observer.revoked(msg.queue, msg.name)
        ran = outcome is not None and outcome.state == states.REVOKED
        text = "terminated while running" if ran else "revoked before it ran"
        log.info("task revoked", task=msg.name, id=msg.id, terminated=ran)
        return self._unrun_steps(record, msg, TaskRevoked(f"task {msg.id} {text}"),
                                 "Revoked", text, outcome if ran else None)

    def _unrun_steps(self, record: Record, msg: TaskMessage, error: TaskRevoked,
                     error_type: str, message: str, outcome: Outcome | None = None,
                     ) -> list[Step]:
        """REVOKED row (expired or revoked), then what follows a failure of the task."""
        outcome = outcome or Outcome(states.REVOKED, None, None, None, now_ms(), now_ms())
        meta = self._meta(msg, dataclasses.replace(outcome, error=None))
        meta.error_type, meta.error_message = error_type, message
        self.observer.task_finished(msg.queue, msg.name, states.REVOKED, 0.0)
        return [store_step(self.app.backend, meta),
                *self.flows.after_failure(msg, error, claimer_of(record))]

    # -- pauses --------------------------------------------------------------------

    def _apply_pauses(self) -> None:
        """Pause every partition while full for a while, or draining; else the slow ones.

        Everything is paused while full for a while (until half the room is free) or
        draining; otherwise only partitions whose slow head holds too many records
        behind it. While full, nothing is polled; a stall that lasts
        (``_FULL_PAUSE_AFTER_S``: results not becoming durable, e.g. Cassandra down)
        pauses everything, and the paused consumers are polled again (a rebalance
        waits at most that long), so memory stays flat and the group membership stays
        alive.
        """
        outstanding = self.outstanding
        now = time.monotonic()
        if outstanding >= self.max_in_flight:
            if self._full_since is None:
                self._full_since = now
            if now - self._full_since >= _FULL_PAUSE_AFTER_S:
                self._full = True
        elif outstanding <= self.max_in_flight // 2:
            self._full, self._full_since = False, None
        elif not self._full:
            self._full_since = None
        pause_all = self._stop.is_set() or self._full
        for rt in self.runtimes:
            rt.apply_pauses(pause_all)

    # -- draining ----------------------------------------------------------------

    def _drain(self, grace_s: float) -> None:
        """Stop taking records, let started tasks finish within ``grace_s``, commit."""
        if not self.runtimes[0].started:
            return
        self._stop.set()
        self._apply_pauses()
        deadline = time.monotonic() + grace_s
        for rt in self.runtimes:
            rt.begin_drain()
        # The consumers keep being polled: a rebalance during the drain is served, so
        # the final commit carries the group's current generation.
        while time.monotonic() < deadline and any(rt.drain_busy() for rt in self.runtimes):
            for rt in self.runtimes:
                rt.poll(0.002)
            self._service()
            self._apply_pauses()
        for rt in self.runtimes:
            rt.finish_drain()
        log.info("worker drained", worker=self.name, left=self.outstanding, **self.stats)

    def _idle(self) -> bool:
        self._service()
        if self.effects.active or not self.hooks.idle():
            return False
        return all(rt.idle() for rt in self.runtimes)
