"""Prometheus metrics of a worker or a delay forwarder.

Two halves, so that nothing slow runs on the worker's hot path:

- :class:`WorkerMetrics` is the worker's observer (``streamtasks.worker.observe``): it
  counts tasks, retries, dead letters and observes durations as they happen — each call
  is a counter increment or a histogram observation.
- :class:`StateCollector` is asked at scrape time for what is read off the worker and
  the broker: records in flight, partitions assigned, and consumer lag (high watermark
  minus committed offset) of the worker's and the forwarder's groups. Broker look-ups
  are cached (:class:`CachedProbe`, ~2 s) and run in a thread of their own with a
  bounded wait, so a scrape stays cheap and a slow Kafka cannot hang it.

Every metric lives in the :class:`~prometheus_client.CollectorRegistry` of one
:class:`WorkerMetrics` (never the global one), so several workers in one process (tests)
do not collide. Labels are bounded: queues, registered task names, states, reasons,
groups, tiers, partitions — never task ids. ``docs/metrics.md`` lists every metric.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamtasks import states
from streamtasks.broker.base import Broker, TopicPartition

if TYPE_CHECKING:
    from streamtasks.worker.consumer import Worker
    from streamtasks.worker.delayer import DelayForwarder
    from streamtasks.worker.runtime import PartitionRuntime

log = structlog.get_logger("streamtasks.metrics")

T = TypeVar("T")

#: How long a broker look-up made for a scrape (lag) or a probe (readiness) is reused.
CACHE_TTL_S = 2.0
#: How long a scrape or probe waits for a look-up before answering with what it has.
CACHE_WAIT_S = 2.0

_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 900.0, 3600.0)
_IO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0, 30.0)
_LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


# -- the observer: events counted as they happen ---------------------------------------


class WorkerMetrics:
    """A :class:`~streamtasks.worker.observe.WorkerObserver` keeping Prometheus metrics.

    Pass it as ``observer=`` to a ``Worker`` or ``DelayForwarder``, then
    :meth:`watch_worker` / :meth:`watch_forwarder` to add the scrape-time gauges.

    Args:
        registry: where the metrics are registered (default: a new registry of its own).
        clock: monotonic seconds (tests pass a fake one); used for loop liveness.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        #: When these metrics were made (monotonic s): the loops' liveness counts from here.
        self.created = clock()
        self._turns: dict[str, float] = {}
        reg = self.registry
        self.tasks = Counter(
            "streamtasks_tasks", "Tasks whose outcome was decided, by queue, name and state "
            "(SUCCESS, FAILURE, RETRY, REVOKED).", ["queue", "name", "state"], registry=reg)
        self.task_duration = Histogram(
            "streamtasks_task_duration_seconds", "Run time of a task (each attempt).",
            ["queue", "name"], buckets=_TASK_BUCKETS, registry=reg)
        self.retries = Counter(
            "streamtasks_retries", "Attempts that ended in RETRY (a next attempt was "
            "scheduled).", ["queue", "name"], registry=reg)
        self.dead_letters = Counter(
            "streamtasks_dead_letters", "Records sent to a queue's dead-letter topic, by "
            "reason.", ["queue", "reason"], registry=reg)
        self.commit_seconds = Histogram(
            "streamtasks_commit_seconds", "Duration of synchronous offset commits.",
            ["group"], buckets=_IO_BUCKETS, registry=reg)
        self.commit_failures = Counter(
            "streamtasks_commit_failures", "Synchronous offset commits that failed.",
            ["group"], registry=reg)
        self.result_write_seconds = Histogram(
            "streamtasks_result_write_seconds", "Time from a task's outcome to its effects "
            "(result row, follow-ups, dead letter) being durable.", buckets=_IO_BUCKETS,
            registry=reg)
        self.forward_lateness = Histogram(
            "streamtasks_forward_lateness_seconds", "How long after its due time a delayed "
            "record was forwarded.", ["queue", "tier"], buckets=_LATENESS_BUCKETS,
            registry=reg)
        self.schedules_fired = Counter(
            "streamtasks_schedules_fired", "Due times of periodic tasks whose task this "
            "process sent (it won the due time's claim).", ["schedule"], registry=reg)
        self.revoked_tasks = Counter(
            "streamtasks_revoked", "Revoked tasks that ended REVOKED here (not run, or "
            "terminated).", ["queue", "name"], registry=reg)
        self.rate_limited_tasks = Counter(
            "streamtasks_rate_limited", "Tasks that waited for their rate limit before "
            "starting.", ["queue", "name"], registry=reg)

    # -- WorkerObserver ----------------------------------------------------------------

    def task_finished(self, queue: str, name: str, state: str, duration_s: float) -> None:
        """Count a decided outcome; observe its run time (an expiry never ran: not timed)."""
        self.tasks.labels(queue, name, state).inc()
        if state == states.RETRY:
            self.retries.labels(queue, name).inc()
        if state != states.REVOKED:
            self.task_duration.labels(queue, name).observe(duration_s)

    def dead_lettered(self, queue: str, reason: str) -> None:
        """Count a dead letter."""
        self.dead_letters.labels(queue, reason).inc()

    def result_written(self, seconds: float) -> None:
        """Observe how long a task's effects took to become durable."""
        self.result_write_seconds.observe(seconds)

    def committed(self, group: str, seconds: float, ok: bool) -> None:
        """Observe a synchronous commit; count it when it failed."""
        self.commit_seconds.labels(group).observe(seconds)
        if not ok:
            self.commit_failures.labels(group).inc()

    def forwarded(self, queue: str, tier: str, lateness_s: float) -> None:
        """Observe how late a forward was."""
        self.forward_lateness.labels(queue, tier).observe(lateness_s)

    def loop_turned(self, loop: str) -> None:
        """Remember when ``loop`` last turned (one dict store: called every loop turn)."""
        self._turns[loop] = self.clock()

    def schedule_fired(self, schedule: str) -> None:
        """Count a due time fired by this process."""
        self.schedules_fired.labels(schedule).inc()

    def revoked(self, queue: str, name: str) -> None:
        """Count a revoked task honoured here."""
        self.revoked_tasks.labels(queue, name).inc()

    def rate_limited(self, queue: str, name: str) -> None:
        """Count a task held back by its rate limit."""
        self.rate_limited_tasks.labels(queue, name).inc()

    # -- read by health checks and the collector ------------------------------------------

    def since_turn(self, loop: str) -> float:
        """Seconds since ``loop`` last turned (since these metrics were made, if never)."""
        return self.clock() - self._turns.get(loop, self.created)

    def turned(self, loop: str) -> bool:
        """Whether ``loop`` turned at least once."""
        return loop in self._turns

    def watch_worker(self, worker: Worker) -> StateCollector:
        """Add the scrape-time gauges of ``worker`` (and of its forwarder, when it runs one)."""
        def runtimes() -> list[Membership]:
            found = [Membership(rt, q) for q, rt in zip(worker.queues, worker.runtimes,
                                                         strict=True)]
            forwarder = worker.delayer  # replaced when restarted: read at each scrape
            if forwarder is not None:
                found += [Membership(rt, q, forwarder=True)
                          for q, rt in zip(forwarder.queues, forwarder.runtimes, strict=True)]
            return found

        return self._watch(worker.app.broker, runtimes, loops=("worker", "forwarder"))

    def watch_forwarder(self, forwarder: DelayForwarder) -> StateCollector:
        """Add the scrape-time gauges of a delay forwarder running alone."""
        def runtimes() -> list[Membership]:
            return [Membership(rt, q, forwarder=True)
                    for q, rt in zip(forwarder.queues, forwarder.runtimes, strict=True)]

        return self._watch(forwarder.app.broker, runtimes, loops=("forwarder",))

    def _watch(self, broker: Broker, memberships: Callable[[], list[Membership]],
               loops: Sequence[str]) -> StateCollector:
        collector = StateCollector(broker, memberships, self, loops)
        self.registry.register(collector)
        return collector


# -- scrape time: gauges read off the worker and the broker -----------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """One consumer group membership of a process: its runtime and the queue it serves."""

    runtime: PartitionRuntime
    queue: str
    forwarder: bool = False


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """Records of one partition not yet committed by a group."""

    group: str
    tp: TopicPartition
    lag: int


def group_lag(broker: Broker, group: str, partitions: Iterable[TopicPartition]) -> list[
        PartitionLag]:
    """Return ``group``'s lag on ``partitions``: high watermark minus committed offset.

    A partition with no committed offset (or one below the low watermark, its records
    deleted) is read from the low watermark, as the consumer would.

    Raises:
        BrokerError: the broker did not answer.
    """
    parts = sorted(partitions)
    if not parts:
        return []
    committed = broker.group_offsets(group)
    found = []
    for tp in parts:
        low, high = broker.watermarks(tp)
        position = max(committed.get(tp, low), low)
        found.append(PartitionLag(group, tp, max(0, high - position)))
    return found


class StateCollector(Collector):
    """Gauges computed at scrape time from a worker's runtimes and the broker.

    Args:
        broker: where watermarks and committed offsets are looked up.
        memberships: returns the process's group memberships now.
        metrics: the observer whose loop turns are reported.
        loops: the loops whose time since their last turn is reported.
        ttl_s: how long lag look-ups are reused.
        wait_s: how long a scrape waits for a lag look-up before serving the last one.
    """

    def __init__(
        self,
        broker: Broker,
        memberships: Callable[[], list[Membership]],
        metrics: WorkerMetrics,
        loops: Sequence[str],
        *,
        ttl_s: float = CACHE_TTL_S,
        wait_s: float = CACHE_WAIT_S,
    ) -> None:
        self.broker = broker
        self.memberships = memberships
        self.metrics = metrics
        self.loops = tuple(loops)
        self.lag = CachedProbe(self._lags, ttl_s=ttl_s, wait_s=wait_s, name="consumer-lag")

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not call :meth:`collect` to learn names."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield in-flight records, assigned partitions, consumer lag and loop ages."""
        members = self.memberships()
        in_flight = GaugeMetricFamily(
            "streamtasks_tasks_in_flight", "Records taken in by the worker whose effects are "
            "not yet durable (running, queued, or being written).", labels=["queue"])
        assigned = GaugeMetricFamily(
            "streamtasks_assigned_partitions", "Partitions this process owns, per group.",
            labels=["group"])
        for member in members:
            if not member.forwarder:
                in_flight.add_metric([member.queue], _outstanding(member.runtime))
            assigned.add_metric([member.runtime.group_id], len(member.runtime.assigned))
        yield in_flight
        yield assigned
        yield self._lag_family()
        ages = GaugeMetricFamily(
            "streamtasks_loop_seconds_since_turn", "Seconds since the loop last completed a "
            "turn (what /healthz checks).", labels=["loop"])
        for loop in self.loops:
            if loop == "forwarder" and not any(m.forwarder for m in members):
                continue
            ages.add_metric([loop], self.metrics.since_turn(loop))
        yield ages

    def _lag_family(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "streamtasks_consumer_lag", "Records not yet committed by the group (high "
            "watermark minus committed offset), per partition this process owns.",
            labels=["group", "topic", "partition"])
        probed = self.lag.get()
        for item in probed.value or []:
            family.add_metric([item.group, item.tp.topic, str(item.tp.partition)], item.lag)
        return family

    def _lags(self) -> list[PartitionLag]:
        found: list[PartitionLag] = []
        for member in self.memberships():
            rt = member.runtime
            try:
                found += group_lag(self.broker, rt.group_id, rt.assigned)
            except Exception as err:  # one group's failure leaves the others' lag
                log.warning("consumer lag not available", group=rt.group_id,
                            error=f"{type(err).__name__}: {err}")
        return found


def _outstanding(runtime: PartitionRuntime) -> int:
    # Read from the scrape thread while the loop thread may add a partition.
    for _ in range(3):
        try:
            return runtime.outstanding
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return 0


# -- a look-up made in a thread of its own, reused for a while --------------------------


@dataclass(frozen=True, slots=True)
class Probed(Generic[T]):
    """What a :class:`CachedProbe` knows: the last value or error, and whether it is late.

    Attributes:
        value: the last value looked up (None before the first answer, or after an error).
        error: the error of the last look-up, if it failed.
        late: a look-up is running and did not answer within the wait.
        age_s: seconds since the last answer (None before the first).
    """

    value: T | None
    error: BaseException | None
    late: bool
    age_s: float | None


class CachedProbe(Generic[T]):
    """Runs ``fetch`` in a thread of its own at most every ``ttl_s``; waits ``wait_s``.

    Callers from any thread share one look-up at a time. A look-up that takes longer
    than ``wait_s`` goes on in the background; the caller gets the last answer with
    ``late`` set (so a scrape or probe never hangs on a slow broker or database).

    Args:
        fetch: the look-up (may raise).
        ttl_s: how long an answer is reused.
        wait_s: how long :meth:`get` waits for a look-up it started or found running.
        name: the look-up thread's name.
    """

    def __init__(self, fetch: Callable[[], T], *, ttl_s: float = CACHE_TTL_S,
                 wait_s: float = CACHE_WAIT_S, name: str = "probe") -> None:
        self._fetch = fetch
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.name = name
        self._lock = threading.Lock()
        self._done: threading.Event | None = None
        self._value: T | None = None
        self._error: BaseException | None = None
        self._at: float | None = None

    def get(self) -> Probed[T]:
        """Return the last answer, looking up again (bounded wait) when it is too old."""
        with self._lock:
            stale = self._at is None or time.monotonic() - self._at >= self.ttl_s
            if stale and self._done is None:
                self._done = threading.Event()
                threading.Thread(target=self._run, args=(self._done,), daemon=True,
                                 name=f"streamtasks-{self.name}").start()
            running = self._done
        late = running is not None and not running.wait(self.wait_s)
        with self._lock:
            age = None if self._at is None else time.monotonic() - self._at
            return Probed(self._value, self._error, late, age)

    def _run(self, done: threading.Event) -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = self._fetch()
        except Exception as err:
            error = err
        with self._lock:
            self._value, self._error, self._at = value, error, time.monotonic()
            self._done = None
        done.set()
