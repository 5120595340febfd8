"""What a worker reports as it runs: the seam between the worker and its metrics.

The worker and the delay forwarder call a :class:`WorkerObserver` at each event that an
operator counts (a task finished, retried, dead-lettered; a commit; a forward; a turn of
the loop). :class:`NullObserver` does nothing; ``streamtasks.metrics`` implements the
observer with Prometheus counters and histograms. Every call is cheap and never raises
into the worker (an observer that fails is a bug of the observer, logged once).
"""

from __future__ import annotations

from typing import Protocol


class WorkerObserver(Protocol):
    """Told about a worker's events (called from the worker's threads; must be cheap)."""

    def task_finished(self, queue: str, name: str, state: str, duration_s: float) -> None:
        """A task's outcome is decided: ``state`` is SUCCESS, FAILURE, RETRY or REVOKED."""

    def dead_lettered(self, queue: str, reason: str) -> None:
        """A record was sent to the queue's dead-letter topic with ``reason``."""

    def result_written(self, seconds: float) -> None:
        """A task's result row became durable ``seconds`` after its write was issued."""

    def committed(self, group: str, seconds: float, ok: bool) -> None:
        """A synchronous offset commit of ``group`` took ``seconds`` (``ok``: it worked)."""

    def forwarded(self, queue: str, tier: str, lateness_s: float) -> None:
        """The forwarder moved a record of ``tier`` on, ``lateness_s`` after it was due."""

    def loop_turned(self, loop: str) -> None:
        """The ``worker`` or ``forwarder`` loop completed a turn (liveness)."""

    def schedule_fired(self, schedule: str) -> None:
        """This process's scheduler sent the task of one due time of ``schedule``."""

    def revoked(self, queue: str, name: str) -> None:
        """A revoked task ended REVOKED here (not run, or terminated while running)."""

    def rate_limited(self, queue: str, name: str) -> None:
        """A task waited for its rate limit's token before it could start."""


class NullObserver:
    """An observer that records nothing (the default)."""

    def task_finished(self, queue: str, name: str, state: str, duration_s: float) -> None:
        """Record nothing."""

    def dead_lettered(self, queue: str, reason: str) -> None:
        """Record nothing."""

    def result_written(self, seconds: float) -> None:
        """Record nothing."""

    def committed(self, group: str, seconds: float, ok: bool) -> None:
        """Record nothing."""

    def forwarded(self, queue: str, tier: str, lateness_s: float) -> None:
        """Record nothing."""

    def loop_turned(self, loop: str) -> None:
        """Record nothing."""

    def schedule_fired(self, schedule: str) -> None:
        """Record nothing."""

    def revoked(self, queue: str, name: str) -> None:
        """Record nothing."""

    def rate_limited(self, queue: str, name: str) -> None:
        """Record nothing."""
