"""Side effects that must become durable before an offset may advance.

A task's effects (its result row, its follow-up records) are a chain of
asynchronous steps. A step that fails — Cassandra down, a produce refused — is
retried with capped backoff, for as long as it takes: infrastructure errors never
advance an offset and never lose a task.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from streamtasks import states
from streamtasks.backend.base import ResultBackend, TaskMeta
from streamtasks.broker.base import Broker
from streamtasks.errors import BrokerError, EncodeError
from streamtasks.fanin import FanIn

if TYPE_CHECKING:
    from streamtasks.app import Outgoing

log = structlog.get_logger("streamtasks.worker")

#: Reports a step's end: None when it is durable, else the error.
StepDone = Callable[[BaseException | None], None]
#: Starts one asynchronous step; calls its ``StepDone`` exactly once.
Step = Callable[[StepDone], None]


@dataclass(slots=True)
class _Chain:
    steps: Sequence[Step]
    on_done: Callable[[], None]
    what: str
    failures: int = 0
    index: int = field(default=0)


class EffectRunner:
    """Runs chains of steps in order, retrying a failed step after a backoff.

    A chain's first step starts in the caller's thread; every later step (and
    ``on_done``) starts from :meth:`run_due`, in the worker's loop thread. Steps finish
    on other threads (the Cassandra driver's I/O thread, a delivery callback), and a
    step may block for a moment (a first connection, a full queue): started from the
    driver's I/O thread, it would wait for the very thread it blocks.

    Args:
        first_backoff_s: delay before the first retry of a failed step.
        max_backoff_s: the delay doubles per failure up to this.
    """

    def __init__(self, first_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._due: list[tuple[float, int, _Chain]] = []
        self._ready: list[_Chain] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active(self) -> int:
        """Chains started and not yet done (running or waiting to retry)."""
        return self._active

    def run(self, steps: Sequence[Step], on_done: Callable[[], None], what: str) -> None:
        """Start a chain; ``on_done`` is called once every step is durable."""
        with self._lock:
            self._active += 1
        self._start(_Chain(steps, on_done, what))

    def run_due(self) -> None:
        """Start the next steps of chains, and failed steps whose backoff has passed.

        Call it from the worker loop.
        """
        now = time.monotonic()
        with self._lock:
            ready, self._ready = self._ready, []
            while self._due and self._due[0][0] <= now:
                ready.append(heapq.heappop(self._due)[2])
        for chain in ready:
            self._start(chain)

    def _start(self, chain: _Chain) -> None:
        if chain.index >= len(chain.steps):
            with self._lock:
                self._active -= 1
            chain.on_done()
            return
        called = False

        def done(error: BaseException | None) -> None:
            nonlocal called
            if called:
                return
            called = True
            if error is None:
                chain.index += 1
                chain.failures = 0
                with self._lock:
                    self._ready.append(chain)
            else:
                self._retry_later(chain, error)

        try:
            chain.steps[chain.index](done)
        except Exception as err:
            done(err)

    def _retry_later(self, chain: _Chain, error: BaseException) -> None:
        chain.failures += 1
        delay = min(self.first_backoff_s * 2 ** (chain.failures - 1), self.max_backoff_s)
        if chain.failures == 1 or chain.failures % 10 == 0:
            log.warning(
                "side effect failed, will retry",
                what=chain.what,
                step=chain.index,
                failures=chain.failures,
                retry_in_s=round(delay, 2),
                error=f"{type(error).__name__}: {error}",
            )
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._seq), chain))


def store_step(backend: ResultBackend, meta: TaskMeta) -> Step:
    """A step that writes ``meta``; a result that cannot be encoded is stored as FAILURE.

    The task ran, but a result that cannot be stored is the task's failure (retrying
    would give the same), not the backend's.
    """

    def step(done: StepDone) -> None:
        try:
            future = backend.store(meta)  # the codec converts dataclasses / models
        except EncodeError as err:
            meta.state, meta.result = states.FAILURE, None
            meta.error_type, meta.error_message = type(err).__name__, str(err)
            future = backend.store(meta)
        future.add_done_callback(lambda f: done(f.exception()))

    return step


def store_all_step(backend: ResultBackend, metas: Sequence[TaskMeta]) -> Step:
    """A step that writes several rows at once; done when all are durable."""

    def step(done: StepDone) -> None:
        gather = FanIn(len(metas), done)
        for meta in metas:
            backend.store(meta).add_done_callback(lambda f: gather.one(f.exception()))

    return step


def send_step(
    broker: Broker, topic: str, value: bytes, key: bytes | None, headers: Mapping[str, bytes],
    partition: int | None,
) -> Step:
    """A step that sends one record; done when the broker confirmed it."""

    def step(done: StepDone) -> None:
        broker.send(
            topic, value, key=key, headers=headers, partition=partition,
            on_delivery=lambda error: done(None if error is None else BrokerError(error)),
        )

    return step


def send_all_step(broker: Broker, records: Sequence[Outgoing]) -> Step:
    """A step that sends encoded task records; done when the broker confirmed all.

    A retry sends them all again: follow-up ids are fixed, so a repeat is a duplicate
    record of the same task, never a new task.
    """

    def step(done: StepDone) -> None:
        gather = FanIn(len(records), done)
        for out in records:
            broker.send(
                out.topic, out.value, key=out.key, headers=out.headers,
                on_delivery=lambda error: gather.one(None if error is None else BrokerError(error)),
            )

    return step
