"""Rate limits of tasks: per worker process (Celery's ``rate_limit``) and group-wide.

``@app.task(rate_limit="100/s")`` (also ``/m``, ``/h``; a bare number is per second, as
in Celery) lets each worker process start at most that many runs of the task per unit.
``@app.task(group_rate_limit="100/s")`` is a limit for the whole consumer group of the
task's queue: each member takes ``rate / members``, the members counted from Kafka every
:data:`MEMBERS_REFRESH_S` (``docs/control.md``). Both may be given: the lower applies.

A run waiting for its token never blocks the worker's loop: the :class:`RateGate` keeps
the job, the worker keeps polling (other tasks, other queues go on) and pauses the
partitions that hold waiting jobs until they are released.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

from streamtasks.broker.base import TopicPartition
from streamtasks.errors import ConfigError

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.worker")

_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
#: How often the members of a queue's group are counted (group-wide limits).
MEMBERS_REFRESH_S = 2.0
#: Burst allowed above the rate, in seconds of it (at least one run).
BURST_S = 0.05

J = TypeVar("J")


def parse_rate(text: str | float | None, what: str = "rate_limit") -> float | None:
    """Return a rate (``"100/s"``, ``"10/m"``, ``"5/h"``, a number per second) in runs/s.

    Raises:
        ConfigError: not a positive rate in one of those forms.
    """
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        rate = float(text)
    else:
        match = _RATE.match(str(text))
        if match is None:
            raise ConfigError(f"{what} {text!r} is not a rate such as '100/s', '10/m' or "
                              "'5/h'")
        rate = float(match.group(1)) / _UNITS_S[match.group(2) or "s"]
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{what} must be a finite rate above 0, got {text!r}")
    return rate


class TokenBucket:
    """Tokens added at ``rate`` per second, up to a small burst; a run takes one.

    The bucket starts empty: the first run waits ``1 / rate``, so N runs take at least
    N / rate seconds from the bucket's making.
    """

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = now

    def set_rate(self, rate: float) -> None:
        """Change the rate (tokens already earned are kept)."""
        self.rate = rate

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        burst = max(1.0, self.rate * BURST_S)
        self._tokens = min(burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0 - 1e-9:  # sums of small steps fall short of 1 by a hair
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class Limit:
    """The limits of one task: per process and group-wide (runs per second, or None)."""

    per_process: float | None
    group: float | None
    group_id: str


class RateGate(Generic[J]):
    """Holds jobs of rate-limited tasks until their token is there.

    Args:
        member_count: returns how many members a consumer group has now (Kafka).
        clock: monotonic seconds.
    """

    def __init__(self, member_count: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._member_count = member_count
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._waiting: dict[str, deque[tuple[TopicPartition, J]]] = {}
        self._limits: dict[str, Limit] = {}
        self._members: dict[str, int] = {}
        self._held: Counter[TopicPartition] = Counter()
        self._counting: threading.Thread | None = None
        self._stop = threading.Event()

    def limit(self, name: str, limit: Limit) -> None:
        """Declare the limit of a task (once, before its first job)."""
        self._limits[name] = limit
        if limit.group is not None:
            self._members.setdefault(limit.group_id, 1)
            if self._counting is None:
                self._count_members()
                self._counting = threading.Thread(target=self._keep_counting, daemon=True,
                                                  name="streamtasks-ratelimit")
                self._counting.start()

    def rate_of(self, name: str) -> float | None:
        """The runs per second this process may start of task ``name`` now (None: no limit)."""
        limit = self._limits.get(name)
        if limit is None:
            return None
        rates = [] if limit.per_process is None else [limit.per_process]
        if limit.group is not None:
            rates.append(limit.group / max(1, self._members.get(limit.group_id, 1)))
        return min(rates) if rates else None

    def admit(self, name: str, tp: TopicPartition, job: J) -> bool:
        """True: the job may start now; False: it is kept until :meth:`release` gives it."""
        rate = self.rate_of(name)
        if rate is None:
            return True
        waiting = self._waiting.setdefault(name, deque())
        if not waiting and self._bucket(name, rate).take(self._clock()):
            return True
        waiting.append((tp, job))
        self._held[tp] += 1
        return False

    def release(self) -> list[J]:
        """Return the kept jobs whose token is there now, oldest first per task."""
        now = self._clock()
        ready: list[J] = []
        for name, waiting in self._waiting.items():
            rate = self.rate_of(name)
            if rate is None:
                continue
            bucket = self._bucket(name, rate)
            while waiting and bucket.take(now):
                tp, job = waiting.popleft()
                ready.append(job)
                self._held[tp] -= 1
                if not self._held[tp]:
                    del self._held[tp]
        return ready

    def held(self) -> set[TopicPartition]:
        """Partitions with jobs waiting for a token (the worker pauses them)."""
        return set(self._held)

    def drop(self, partitions: Iterable[TopicPartition]) -> list[J]:
        """Forget and return the kept jobs of ``partitions`` (they left this worker)."""
        gone = set(partitions)
        dropped: list[J] = []
        for name, waiting in self._waiting.items():
            kept = deque(item for item in waiting if item[0] not in gone)
            dropped += [job for tp, job in waiting if tp in gone]
            self._waiting[name] = kept
        for tp in gone:
            self._held.pop(tp, None)
        return dropped

    @property
    def waiting(self) -> int:
        """How many jobs wait for a token."""
        return sum(len(w) for w in self._waiting.values())

    def close(self) -> None:
        """Stop counting group members."""
        self._stop.set()

    def _bucket(self, name: str, rate: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(rate, self._clock())
        elif bucket.rate != rate:
            bucket.set_rate(rate)
        return bucket

    def _count_members(self) -> None:
        for group in list(self._members):
            try:
                count = self._member_count(group)
            except Exception as err:  # keep the last count: a limit never stops working
                log.warning("cannot count group members for a group-wide rate limit",
                            group=group, error=str(err))
                continue
            if count >= 1 and count != self._members.get(group):
                log.info("group-wide rate limits divided anew", group=group, members=count)
                self._members[group] = count

    def _keep_counting(self) -> None:
        while not self._stop.wait(MEMBERS_REFRESH_S):
            self._count_members()


def rate_gate(app: App, queues: Sequence[str]) -> RateGate[Any]:
    """Return a worker's gate with the limits of the app's tasks.

    A group-wide limit is divided among the members of the group of the task's own
    queue (every worker serving that queue is a member).
    """
    gate: RateGate[Any] = RateGate(app.broker.group_member_count)
    for task in app.tasks.values():
        options = task.options
        if options.rate_limit is None and options.group_rate_limit is None:
            continue
        group = app.settings.group_id(options.queue)
        gate.limit(task.name, Limit(options.rate_limit, options.group_rate_limit, group))
    return gate
