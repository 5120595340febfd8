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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

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

    Args:
        first_backoff_s: delay before the first retry of a failed step.
        max_backoff_s: the delay doubles per failure up to this.
    """

    def __init__(self, first_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._due: list[tuple[float, int, _Chain]] = []
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
        """Restart the steps whose backoff has passed (call from the worker loop)."""
        now = time.monotonic()
        ready: list[_Chain] = []
        with self._lock:
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
                self._start(chain)
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
