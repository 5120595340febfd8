"""Side effects that must become durable before an offset may advance.

A task's effects (its result row, its follow-up records) are a chain of
asynchronous steps. A step that fails for an infrastructure reason — Cassandra down
or timing out, a produce unconfirmed — is retried with capped backoff, for as long as
it takes: such errors never advance an offset and never lose a task. Any other error
(:func:`is_transient` says which) can only repeat itself: the chain stops and its
``on_failed`` decides what the record comes to, so no record waits for ever.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamtasks import states
from streamtasks.backend.base import ResultBackend, TaskMeta
from streamtasks.broker.base import Broker
from streamtasks.errors import BackendError, BrokerError, EncodeError, MessageTooLargeError
from streamtasks.fanin import FanIn
from streamtasks.logs import get_logger
from streamtasks.worker.outcomes import safe_text

if TYPE_CHECKING:
    from streamtasks.app import Outgoing

log = get_logger("streamtasks.worker")

#: Reports a step's end: None when it is durable, else the error.
StepDone = Callable[[BaseException | None], None]
#: Starts one asynchronous step; calls its ``StepDone`` exactly once.
Step = Callable[[StepDone], None]


#: Errors whose text says a produce can never succeed as it is (the topic is gone).
_PERMANENT_SEND_ERRORS = ("UNKNOWN_TOPIC", "Unknown topic", "TOPIC_AUTHORIZATION",
                          "INVALID_RECORD", "RECORD_LIST_TOO_LARGE", "MSG_SIZE_TOO_LARGE")
#: Cassandra driver errors that are the request's fault, not the cluster's.
_PERMANENT_BACKEND_CAUSES = ("InvalidRequest", "SyntaxException", "ConfigurationException",
                             "Unauthorized", "ProtocolException")
#: Failures of a step with a permanent-looking send error before it is given up.
_PERMANENT_SEND_TRIES = 5


def is_transient(error: BaseException, failures: int = 1) -> bool:
    """Whether a failed step may succeed if tried again (an infrastructure error).

    Args:
        error: what the step failed with.
        failures: how often the step failed so far (a missing topic is given a few
            tries: it may be being created).
    """
    if isinstance(error, EncodeError | MessageTooLargeError | UnicodeError):
        return False
    if isinstance(error, BrokerError):
        text = str(error)
        return not (any(mark in text for mark in _PERMANENT_SEND_ERRORS)
                    and failures >= _PERMANENT_SEND_TRIES)
    if isinstance(error, BackendError):
        cause = error.__cause__
        return cause is None or type(cause).__name__ not in _PERMANENT_BACKEND_CAUSES
    return isinstance(error, OSError | TimeoutError)


@dataclass(slots=True)
class _Chain:
    steps: Sequence[Step]
    on_done: Callable[[], None]
    what: str
    on_failed: Callable[[BaseException], None] | None = None
    guard: Callable[[], bool] | None = None
    failures: int = 0
    index: int = field(default=0)
    error: BaseException | None = None


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

    def run(
        self,
        steps: Sequence[Step],
        on_done: Callable[[], None],
        what: str,
        *,
        on_failed: Callable[[BaseException], None] | None = None,
        guard: Callable[[], bool] | None = None,
    ) -> None:
        """Start a chain; ``on_done`` is called once every step is durable.

        Args:
            steps: the steps, started one after another.
            on_done: called (in the loop thread) when the last step is durable.
            what: what the chain does, for log lines.
            on_failed: called (in the loop thread) instead of ``on_done`` when a step
                fails with an error that retrying cannot mend; None retries every error.
            guard: checked before each step starts; when it turns False (the record's
                partition was released) the chain is abandoned without calling either.
        """
        with self._lock:
            self._active += 1
        self._start(_Chain(steps, on_done, what, on_failed, guard))

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
        if chain.error is not None or chain.index >= len(chain.steps) or (
            chain.guard is not None and not chain.guard()
        ):
            with self._lock:
                self._active -= 1
            if chain.guard is not None and not chain.guard():
                log.info("side effects abandoned: the partition was released", what=chain.what)
            elif chain.error is not None and chain.on_failed is not None:
                chain.on_failed(chain.error)
            else:
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
        if chain.on_failed is not None and not is_transient(error, chain.failures):
            log.error("side effect failed for good", what=chain.what, step=chain.index,
                      error=f"{type(error).__name__}: {safe_text(str(error))}")
            chain.error = error
            with self._lock:
                self._ready.append(chain)
            return
        delay = min(self.first_backoff_s * 2 ** (chain.failures - 1), self.max_backoff_s)
        if getattr(error, "expected_wait", False):
            # a wait the step asked for (another member is settling a chord): not news
            log.debug("side effect waits", what=chain.what, step=chain.index,
                      retry_in_s=round(delay, 2), reason=safe_text(str(error)))
        elif chain.failures == 1 or chain.failures % 10 == 0:
            log.warning(
                "side effect failed, will retry",
                what=chain.what,
                step=chain.index,
                failures=chain.failures,
                retry_in_s=round(delay, 2),
                error=f"{type(error).__name__}: {safe_text(str(error))}",
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
