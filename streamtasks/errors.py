"""The exception tree of streamtasks.

Every error raised by the library derives from :class:`StreamTasksError`. Each
sub-tree names where the problem lies: configuration, the broker (Kafka), the
result backend (Cassandra), a message that can never run (poison), or a task.
"""

from __future__ import annotations

from collections.abc import Sequence


class StreamTasksError(Exception):
    """Root of every streamtasks error."""


class ConfigError(StreamTasksError):
    """A setting is missing or malformed; the message names it and the accepted form."""


class BrokerError(StreamTasksError):
    """The broker (Kafka) failed or refused an operation."""


class SendError(BrokerError):
    """One or more queued tasks could not be confirmed by the broker.

    Attributes:
        failures: ``(task_id, reason)`` for every send that failed.
    """

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = list(failures)
        shown = ", ".join(f"{tid}: {why}" for tid, why in self.failures[:5])
        more = f" (and {len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} task(s) not confirmed by the broker: {shown}{more}")


class MessageTooLargeError(BrokerError):
    """A task's encoded size exceeds the broker's limit; nothing was sent."""


class BackendError(StreamTasksError):
    """The result backend (Cassandra) failed an operation."""


class WorkflowError(ConfigError):
    """What follows a task in a workflow cannot be built (a malformed node or option).

    The task that finished is failed for good with this error: retrying it would give
    the same.
    """


class MessageError(StreamTasksError):
    """A message that can never run as sent; the worker dead-letters it.

    Retrying cannot help, so these go straight to the dead-letter topic.
    """

    reason = "invalid-message"


class EncodeError(MessageError):
    """A value cannot be encoded (an unsupported type); the message names where."""

    reason = "encode-error"


class DecodeError(MessageError):
    """Bytes that are not a streamtasks message of a known schema."""

    reason = "decode-error"


class ArgumentError(MessageError):
    """Arguments that do not fit the task's signature or type hints."""

    reason = "bad-arguments"


class UnknownTaskError(MessageError):
    """A task name that no registered task has."""

    reason = "unknown-task"


class TaskError(StreamTasksError):
    """Base of errors about a task's outcome, as seen by a caller."""


class TaskFailed(TaskError):
    """The task ended in FAILURE; carries the remote error type, message and traceback."""

    def __init__(self, task_id: str, error_type: str, message: str, traceback: str = "") -> None:
        self.task_id = task_id
        self.error_type = error_type
        self.error_message = message
        self.remote_traceback = traceback
        super().__init__(f"task {task_id} failed: {error_type}: {message}")


class TaskRevoked(TaskError):
    """The task was revoked or expired before it ran."""


class TaskExpired(TaskRevoked):
    """The task expired (``expires_s``) before a worker ran it."""


class ResultTimeout(TaskError, TimeoutError):
    """The result was not final within the time asked for."""


class Retry(StreamTasksError):
    """Raise inside a task to ask for another attempt later (as Celery's ``Retry``).

    Args:
        countdown: seconds to wait before the next attempt (default: the task's
            backoff). ``countdown_s`` is the older spelling, still accepted.
        exc: the error that caused the retry; its type and message become the reason
            (and the task's error if no retry is left).
        max_retries: the retries this task may have, instead of its own ``max_retries``.
        reason: why, kept in the result row while the task waits.

    Raises:
        ConfigError: both ``countdown`` and ``countdown_s``, or a negative
            ``max_retries``.
    """

    def __init__(
        self,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
        *,
        reason: str = "",
        countdown_s: float | None = None,
    ) -> None:
        if countdown is not None and countdown_s is not None:
            raise ConfigError("Retry: give countdown or countdown_s, not both")
        if max_retries is not None and max_retries < 0:
            raise ConfigError(f"Retry: max_retries must not be negative, got {max_retries}")
        self.countdown_s = countdown if countdown is not None else countdown_s
        self.exc = exc
        self.max_retries = max_retries
        self.reason = reason or ("" if exc is None else f"{type(exc).__name__}: {exc}")
        super().__init__(self.reason or f"retry requested (countdown {self.countdown_s}s)")
