"""Periodic tasks: schedules declared in code, fired exactly once per due time by any worker.

A :class:`Schedule` names a task, its arguments and when it is due: a cron expression in
a time zone (parsed by ``cronsim``; daylight-saving changes as cronsim defines them: a
local time skipped by a spring-forward change fires at the first time after it, a time
repeated by a fall-back change fires once), or a fixed period (``every``) counted from
the Unix epoch, so that every process computes the same due times.

A :class:`Scheduler` runs in every worker (a thread) or alone (``streamtasks beat``).
Each due time is claimed by a lightweight transaction on ``(schedule, due time)`` in the
result backend; only the winner sends the task, whose id is derived from the schedule
and the due time (:meth:`Schedule.task_id`): two firings of one due time cannot make two
tasks. A claim whose send was never confirmed (its claimer died in between) is taken
over by another scheduler after :data:`STALE_CLAIM_S` (the same task id again).

After downtime a schedule catches up by its policy (``docs/control.md``):

- ``latest`` (default): of the due times missed, only the newest fires;
- ``all``: every missed due time fires (at most :data:`CATCH_UP_MAX`, the newest);
- ``none``: missed due times are skipped.

A due time is *missed* when it is more than :data:`ON_TIME_S` old at the scheduler's
turn; due times on time always fire.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from streamtasks.errors import BackendError, ConfigError, StreamTasksError

if TYPE_CHECKING:
    from streamtasks.app import App
    from streamtasks.worker.observe import WorkerObserver

log = structlog.get_logger("streamtasks.schedules")

CATCH_UP_POLICIES = ("latest", "all", "none")
#: A due time older than this at the scheduler's turn counts as missed (catch-up policy).
ON_TIME_S = 5.0
#: The most due times one schedule fires when catching up with ``all``.
CATCH_UP_MAX = 1000
#: A turn at most this long after the scheduler's previous one is a slow turn of a live
#: scheduler (a starved thread): every due time since fires. After a longer gap (the
#: process was suspended) the catch-up policy decides, as after a downtime.
SLOW_TURN_S = 60.0
#: A claim not marked sent after this long is taken over by another scheduler.
STALE_CLAIM_S = 10.0
#: Claim rows live at least this long (longer for long periods, see :meth:`Schedule.ttl_s`).
CLAIM_TTL_S = 7 * 86400

_ID_NAMESPACE = uuid.UUID("6f1d3c52-3d7e-5b8a-9c41-2f0e8b7a1d55")


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a task is sent by itself: a cron expression in a time zone, or a period.

    Attributes:
        name: the schedule's name (unique in the app; the claim rows' key).
        task: the registered task name it sends.
        queue: the queue the task goes to.
        cron: a five-field cron expression (``*/5 * * * *``), or None.
        tz: the time zone the cron expression is read in (IANA name).
        every_s: the period in seconds (due times at multiples of it since the epoch).
        args: positional arguments of every firing.
        kwargs: keyword arguments of every firing.
        catch_up: ``latest``, ``all`` or ``none`` (see the module docstring).
        scope: the namespace it fires in: apps of other namespaces sharing the keyspace
            have their own claims and task ids (:attr:`key`).
    """

    name: str
    task: str
    queue: str
    cron: str | None = None
    tz: str = "UTC"
    every_s: float | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    catch_up: str = "latest"
    scope: str = ""

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        if (self.cron is None) == (self.every_s is None):
            raise ConfigError(f"{where}: give cron= or every=, exactly one")
        if self.every_s is not None and self.every_s < 1:
            raise ConfigError(f"{where}: every= must be at least 1 second, got {self.every_s}s")
        if self.catch_up not in CATCH_UP_POLICIES:
            raise ConfigError(f"{where}: catch_up must be one of {', '.join(CATCH_UP_POLICIES)}"
                              f", got {self.catch_up!r}")
        self.zone()  # a bad zone or expression is refused when declared, not when due
        if self.cron is not None:
            self._cron_after(0)

    @property
    def key(self) -> str:
        """The schedule's key in the claim rows and task ids: ``{scope}/{name}``."""
        return f"{self.scope}/{self.name}"

    @property
    def spec(self) -> str:
        """When it is due, as text (``cron */5 * * * * Europe/Berlin``, ``every 30s``)."""
        if self.cron is not None:
            return f"cron {self.cron} {self.tz}"
        return f"every {self.every_s:g}s"

    def zone(self) -> Any:
        """Return the schedule's time zone (a ``zoneinfo.ZoneInfo``).

        Raises:
            ConfigError: the name is not a known IANA time zone.
        """
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ConfigError(f"schedule {self.name!r}: unknown time zone {self.tz!r} "
                              "(an IANA name such as Europe/Berlin)") from err

    def next_due_ms(self, after_ms: int) -> int:
        """Return the first due time strictly after ``after_ms`` (epoch ms)."""
        if self.every_s is not None:
            period = int(self.every_s * 1000)
            return (after_ms // period + 1) * period
        return self._cron_after(after_ms)

    def _cron_after(self, after_ms: int) -> int:
        from cronsim import CronSim, CronSimError

        assert self.cron is not None
        start = datetime.fromtimestamp(after_ms / 1000, tz=UTC).astimezone(self.zone())
        try:
            moment = next(CronSim(self.cron, start))
        except CronSimError as err:
            raise ConfigError(f"schedule {self.name!r}: bad cron expression {self.cron!r}: "
                              f"{err}") from err
        except StopIteration as err:
            raise ConfigError(f"schedule {self.name!r}: cron expression {self.cron!r} is "
                              "never due") from err
        due = int(moment.timestamp() * 1000)
        return due if due > after_ms else self._cron_after(after_ms + 1000)

    def dues(self, after_ms: int, until_ms: int, limit: int = CATCH_UP_MAX) -> list[int]:
        """Return the due times in ``(after_ms, until_ms]``, oldest first; the newest ``limit``."""
        found: list[int] = []
        due = self.next_due_ms(after_ms)
        if self.every_s is not None and due <= until_ms:
            period = int(self.every_s * 1000)
            last = until_ms // period * period
            first = max(due, last - (limit - 1) * period)
            return list(range(first, last + 1, period))
        while due <= until_ms:
            found.append(due)
            due = self.next_due_ms(due)
        return found[-limit:]

    def task_id(self, due_ms: int) -> str:
        """Return the id of the task fired for ``due_ms``: the same in every process."""
        return str(uuid.uuid5(_ID_NAMESPACE, f"{self.key}@{due_ms}"))

    def ttl_s(self) -> int:
        """How long claim rows live: a week, or three periods when that is longer."""
        first = self.next_due_ms(0)
        return max(CLAIM_TTL_S, 3 * (self.next_due_ms(first) - first) // 1000)

    def to_fire(self, after_ms: int, now_ms: int) -> list[int]:
        """Return the due times to fire now, after ``after_ms`` was handled, by the policy."""
        dues = self.dues(after_ms, now_ms)
        on_time = [d for d in dues if now_ms - d <= ON_TIME_S * 1000]
        missed = dues[: len(dues) - len(on_time)]
        if self.catch_up == "all":
            return dues
        if self.catch_up == "latest" and missed and not on_time:
            return missed[-1:]
        return on_time


def scoped(app: App, schedules: Iterable[Schedule]) -> list[Schedule]:
    """Return ``schedules`` scoped to the app's namespace as it is now.

    Read when a scheduler starts, not when a schedule is declared: the command line may
    change the namespace of an imported app (``--namespace``).
    """
    namespace = app.settings.namespace
    return [dataclasses.replace(s, scope=namespace) for s in schedules]


def every_seconds(every: timedelta | float | None) -> float | None:
    """Return a period given as a timedelta or seconds, in seconds (None stays None)."""
    if isinstance(every, timedelta):
        return every.total_seconds()
    return None if every is None else float(every)


@dataclass(slots=True)
class _Unsettled:
    schedule: Schedule
    due_ms: int
    check_at: float


class Scheduler:
    """Fires an app's schedules when due, claiming each due time first.

    Args:
        app: the app whose schedules fire (:attr:`App.schedules`) and whose backend
            holds the claims.
        claimer: this scheduler's name in the claim rows (the worker's name).
        schedules: the schedules (default: all of the app's).
        observer: told about each firing (metrics).
    """

    def __init__(
        self,
        app: App,
        claimer: str,
        schedules: Sequence[Schedule] | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.app = app
        self.claimer = claimer
        self.schedules = scoped(app, app.schedules.values() if schedules is None else schedules)
        self.observer = observer
        #: Due times handled, per schedule name (fired here, or claimed elsewhere).
        self._cursor: dict[str, int] = {}
        self._unsettled: list[_Unsettled] = []
        #: Due times chosen to fire whose claim failed (backend errors), per schedule.
        self._owed: dict[str, list[int]] = {}
        #: Schedules whose cursor is this scheduler's own previous turn.
        self._turned: set[str] = set()
        #: Task ids this scheduler sent (tests, logs).
        self.fired: list[str] = []

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Turn every ``interval_s`` until ``stop``; an error is logged and retried."""
        while not stop.is_set():
            try:
                self.tick()
            except StreamTasksError as err:
                log.warning("scheduler turn failed; trying again", error=str(err))
            except Exception:
                log.exception("scheduler turn failed; trying again")
            stop.wait(interval_s)

    def tick(self, now_ms: int | None = None) -> list[str]:
        """Fire what is due now; return the ids of the tasks sent by this turn.

        Raises:
            BackendError: the claims cannot be read or written (after every schedule
                was tried; nothing is skipped: the due times that could not be claimed
                are owed, and the next turns fire them however late, as they were due
                while this scheduler lived, not missed in a downtime).
        """
        now = int(time.time() * 1000) if now_ms is None else now_ms
        sent: list[str] = []
        failed: BackendError | None = None
        for schedule in self.schedules:
            try:
                sent += self._tick_one(schedule, now)
            except BackendError as err:
                failed = failed or err
        sent += self._settle(now)
        if failed is not None:
            raise failed
        return sent

    def _tick_one(self, schedule: Schedule, now: int) -> list[str]:
        cursor = self._cursor.get(schedule.name)
        if cursor is None:
            last = self.app.backend.last_fire(schedule.key)
            cursor = now if last is None else last
            if last is not None:
                self._resume(schedule, last)
            self._cursor[schedule.name] = cursor
        if schedule.name in self._turned and now - cursor <= SLOW_TURN_S * 1000:
            dues = schedule.dues(cursor, now)  # a slow turn of a live scheduler: not missed
        else:
            dues = schedule.to_fire(cursor, now)
        owed = self._owed.pop(schedule.name, []) + dues
        self._cursor[schedule.name] = max(cursor, now)
        self._turned.add(schedule.name)
        sent: list[str] = []
        for index, due in enumerate(owed):
            try:
                sent += self._fire(schedule, due, now)
            except BackendError:
                self._owed[schedule.name] = owed[index:][-CATCH_UP_MAX:]
                raise
        return sent

    def _resume(self, schedule: Schedule, last_ms: int) -> None:
        """Check the newest claimed due time when starting from it, as a claim of another.

        Its send may never have been confirmed (its claimer died, or Kafka refused it
        before a restart): taken over and sent when still unsent after
        :data:`STALE_CLAIM_S`.
        """
        claim = self.app.backend.fire_claim(schedule.key, last_ms)
        if claim is not None and not claim.sent:
            self._unsettled.append(_Unsettled(schedule, last_ms,
                                              time.monotonic() + STALE_CLAIM_S))

    def _fire(self, schedule: Schedule, due_ms: int, now_ms: int) -> list[str]:
        claim = self.app.backend.claim_fire(schedule.key, due_ms, self.claimer,
                                            schedule.ttl_s())
        if claim.sent:
            return []
        if claim.claimer != self.claimer:
            # another scheduler won: check later that its send was confirmed
            self._unsettled.append(_Unsettled(schedule, due_ms,
                                              time.monotonic() + STALE_CLAIM_S))
            return []
        return self._send(schedule, due_ms, now_ms)

    def _send(self, schedule: Schedule, due_ms: int, now_ms: int) -> list[str]:
        """Send the task of a due time this scheduler holds; mark the claim sent."""
        task_id = schedule.task_id(due_ms)
        try:
            self.app.send(schedule.task, schedule.args, dict(schedule.kwargs),
                          queue=schedule.queue, task_id=task_id, confirm=True)
            self.app.backend.fire_sent(schedule.key, due_ms, schedule.ttl_s())
        except StreamTasksError as err:
            log.warning("a schedule's task could not be sent; trying again", error=str(err),
                        schedule=schedule.name, due_ms=due_ms)
            self._unsettled.append(_Unsettled(schedule, due_ms, time.monotonic() + 1.0))
            return []
        log.info("schedule fired", schedule=schedule.name, task=schedule.task, id=task_id,
                 due_ms=due_ms, late_ms=now_ms - due_ms)
        if self.observer is not None:
            self.observer.schedule_fired(schedule.name)
        self.fired.append(task_id)
        return [task_id]

    def _settle(self, now_ms: int) -> list[str]:
        """Claims of others not marked sent in time (or own sends that failed): take over."""
        sent: list[str] = []
        now = time.monotonic()
        waiting = []
        pending, self._unsettled = self._unsettled, []
        for entry in pending:
            if entry.check_at > now:
                waiting.append(entry)
                continue
            name, due = entry.schedule.key, entry.due_ms
            try:
                claim = self.app.backend.fire_claim(name, due)
                if claim is None or claim.sent:
                    continue
                if claim.claimer != self.claimer and not self.app.backend.take_over_fire(
                    name, due, self.claimer, claim.claimer, entry.schedule.ttl_s()
                ):
                    entry.check_at = now + STALE_CLAIM_S
                    waiting.append(entry)
                    continue
            except BackendError as err:
                log.warning("cannot check a schedule's claim; trying again", error=str(err))
                entry.check_at = now + 1.0
                waiting.append(entry)
                continue
            log.warning("a claimed due time was never sent; sending it", schedule=name,
                        due_ms=due, claimer=claim.claimer)
            sent += self._send(entry.schedule, due, now_ms)
        self._unsettled += waiting
        return sent


def next_due_times(schedule: Schedule, count: int, after_ms: int | None = None) -> list[int]:
    """Return the next ``count`` due times of ``schedule`` after ``after_ms`` (default now)."""
    due = int(time.time() * 1000) if after_ms is None else after_ms
    found = []
    for _ in range(count):
        due = schedule.next_due_ms(due)
        found.append(due)
    return found


class SchedulerThread:
    """A :class:`Scheduler` turning in a daemon thread (one per worker process).

    Args:
        scheduler: the scheduler to run.
        interval_s: how often it turns.
    """

    def __init__(self, scheduler: Scheduler, interval_s: float = 0.5) -> None:
        self.scheduler = scheduler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=scheduler.run, args=(self._stop, interval_s),
                                        name="streamtasks-scheduler", daemon=True)

    def start(self) -> None:
        """Start turning."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop turning; wait up to ``timeout_s`` for a turn under way to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
