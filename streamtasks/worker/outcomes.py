"""What a task's run comes to: a pure decision, carried out by the worker.

:func:`decide` maps a run (its error or none, the task's retry policy, the message's
attempt and options, the time) to one :class:`Decision`: success, a retry after a delay,
or a final failure with the dead-letter reason. Nothing here does I/O, so every rule is
tested on its own (``tests/test_outcomes.py``); the worker only carries the decision out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from streamtasks.errors import ConfigError, EncodeError, MessageTooLargeError, Retry
from streamtasks.retry import RetryPolicy

SUCCESS: Literal["success"] = "success"
RETRY: Literal["retry"] = "retry"
FAIL: Literal["fail"] = "fail"

#: Errors of a task's follow-ups that no retry can mend (the same input gives the same).
FOLLOW_UP_ERRORS = (ConfigError, EncodeError, MessageTooLargeError)

#: Longest text of an error message kept in a row or a dead letter's header.
MAX_ERROR_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a run's outcome.

    Attributes:
        kind: ``success``, ``retry`` or ``fail``.
        delay_s: for a retry, the wait before the next attempt.
        reason: for a failure, the dead-letter reason (``task-failed``,
            ``retries-exhausted``).
        note: why a retry was not allowed when it could have been (a deadline), or a
            malformed option that was ignored.
    """

    kind: Literal["success", "retry", "fail"]
    delay_s: float | None = None
    reason: str | None = None
    note: str | None = None


def decide(
    policy: RetryPolicy,
    options: Mapping[str, str],
    attempt: int,
    error: BaseException | None,
    now_ms: int,
) -> Decision:
    """Decide what a run of attempt ``attempt`` that ended with ``error`` comes to.

    Args:
        policy: the task's retry policy.
        options: the message's options (a call's overrides of the policy).
        attempt: the attempt that ran (1 for the first).
        error: the task's exception, or None when it succeeded.
        now_ms: the time, ms since the epoch.
    """
    if error is None:
        return Decision(SUCCESS)
    final = Decision(FAIL, reason="retries-exhausted" if attempt > 1 else "task-failed")
    if isinstance(error, FOLLOW_UP_ERRORS):
        return final
    note = None
    try:
        policy = policy.with_options(options)
    except (ValueError, ConfigError) as err:
        note = f"malformed retry options ignored: {err}"
    if not policy.allows(error, attempt):
        return Decision(FAIL, reason=final.reason, note=note)
    if isinstance(error, Retry) and error.countdown_s is not None:
        delay_s = max(0.0, error.countdown_s)
    else:
        delay_s = policy.delay_s(attempt)
    if policy.deadline_ms is not None and now_ms + delay_s * 1000 > policy.deadline_ms:
        return Decision(FAIL, reason=final.reason, note="the next attempt would start after "
                        "the deadline")
    return Decision(RETRY, delay_s=delay_s, note=note)


def final_error(error: BaseException) -> BaseException:
    """Return the error a task failed with for good: a ``Retry``'s ``exc`` when it has one.

    As in Celery, ``self.retry(exc=err)`` with no retry left fails the task with ``err``
    (its type, message and traceback), not with the retry request.
    """
    if isinstance(error, Retry) and error.exc is not None:
        return error.exc
    return error


def safe_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Return ``text`` encodable as UTF-8 (lone surrogates escaped), cut to ``limit``.

    A task's error may hold anything (a ``surrogateescape`` file name); its row and
    dead letter must still be written.
    """
    clean = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def error_text(error: BaseException) -> str:
    """Return ``str(error)`` made safe (never raises, whatever ``__str__`` does)."""
    try:
        text = str(error)
    except Exception as err:  # a broken __str__ must not lose the outcome
        text = f"<str() of {type(error).__name__} failed: {type(err).__name__}>"
    return safe_text(text)
