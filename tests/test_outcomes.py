"""decide(): what a run comes to, as a pure function; safe_text() / error_text()."""

from __future__ import annotations

import pytest

from streamtasks.errors import ConfigError, EncodeError, MessageTooLargeError, Retry
from streamtasks.retry import RETRY_REQUEST_LIMIT, RetryPolicy
from streamtasks.worker.outcomes import (
    FAIL,
    FOLLOW_UP_ERRORS,
    MAX_ERROR_CHARS,
    RETRY,
    SUCCESS,
    decide,
    error_text,
    safe_text,
)

NOW = 1_700_000_000_000
FIXED = RetryPolicy(max_retries=2, backoff="fixed", backoff_s=1.5)


def test_no_error_is_a_success() -> None:
    decision = decide(FIXED, {}, 1, None, NOW)
    assert decision.kind == SUCCESS
    assert decision.delay_s is None and decision.reason is None and decision.note is None


def test_a_retryable_error_is_retried_while_retries_remain() -> None:
    for attempt in (1, 2):
        decision = decide(FIXED, {}, attempt, ValueError("x"), NOW)
        assert decision.kind == RETRY
        assert decision.delay_s == 1.5
        assert decision.note is None
    exhausted = decide(FIXED, {}, 3, ValueError("x"), NOW)
    assert exhausted.kind == FAIL
    assert exhausted.reason == "retries-exhausted"


def test_a_first_attempt_that_is_not_retried_is_task_failed() -> None:
    decision = decide(RetryPolicy(), {}, 1, ValueError("x"), NOW)
    assert decision.kind == FAIL
    assert decision.reason == "task-failed"
    assert decision.delay_s is None


def test_backoffs_give_the_documented_delays() -> None:
    fib = RetryPolicy(max_retries=5, backoff="fibonacci", backoff_s=2.0)
    delays = [decide(fib, {}, a, OSError(), NOW).delay_s for a in range(1, 6)]
    assert delays == [2.0, 4.0, 6.0, 10.0, 16.0]
    expo = RetryPolicy(max_retries=5, backoff="exponential", backoff_s=1.0, backoff_max_s=3.0)
    for attempt in range(1, 6):
        delay = decide(expo, {}, attempt, OSError(), NOW).delay_s
        assert delay is not None
        assert 0.0 <= delay <= min(3.0, 2 ** (attempt - 1))


def test_retry_with_a_countdown_waits_that_long_whatever_the_backoff() -> None:
    decision = decide(FIXED, {}, 1, Retry(countdown_s=7.25), NOW)
    assert decision.kind == RETRY
    assert decision.delay_s == 7.25
    # A negative countdown is "now", never a negative wait.
    assert decide(FIXED, {}, 1, Retry(countdown_s=-3), NOW).delay_s == 0.0
    # No countdown: the task's backoff.
    assert decide(FIXED, {}, 1, Retry(), NOW).delay_s == 1.5


def test_retry_without_max_retries_gets_three_retries_then_fails() -> None:
    policy = RetryPolicy(max_retries=0, backoff="fixed", backoff_s=0.5)
    assert RETRY_REQUEST_LIMIT == 3
    kinds = [decide(policy, {}, a, Retry(countdown_s=1), NOW).kind for a in range(1, 5)]
    assert kinds == [RETRY, RETRY, RETRY, FAIL]
    assert decide(policy, {}, 4, Retry(countdown_s=1), NOW).reason == "retries-exhausted"
    # Any other error of that task is not retried at all.
    assert decide(policy, {}, 1, ValueError("x"), NOW).kind == FAIL


def test_retry_is_retried_even_when_retry_on_does_not_name_it() -> None:
    policy = RetryPolicy(max_retries=2, backoff="fixed", backoff_s=1, retry_on=(KeyError,))
    assert decide(policy, {}, 1, Retry(countdown_s=2), NOW).kind == RETRY


def test_an_error_retry_on_does_not_match_fails_at_once() -> None:
    policy = RetryPolicy(max_retries=5, backoff="fixed", backoff_s=1, retry_on=(KeyError,))
    decision = decide(policy, {}, 1, ValueError("not a KeyError"), NOW)
    assert decision.kind == FAIL
    assert decision.reason == "task-failed"
    # A subclass of a listed type matches.
    class Missing(KeyError):
        pass

    assert decide(policy, {}, 1, Missing("k"), NOW).kind == RETRY


def test_a_base_exception_is_never_retried_by_default() -> None:
    policy = RetryPolicy(max_retries=5, backoff="fixed", backoff_s=1)
    assert decide(policy, {}, 1, KeyboardInterrupt(), NOW).kind == FAIL


def test_call_options_override_the_task_policy() -> None:
    decision = decide(RetryPolicy(), {"max_retries": "1", "backoff": "fixed",
                                      "backoff_s": "0.25"}, 1, ValueError("x"), NOW)
    assert decision.kind == RETRY
    assert decision.delay_s == 0.25
    assert decision.note is None
    assert decide(FIXED, {"max_retries": "0"}, 1, ValueError("x"), NOW).kind == FAIL


def test_no_retry_is_scheduled_after_the_deadline() -> None:
    # Given a deadline 1 s away and a fixed backoff of 1.5 s
    options = {"deadline_ms": str(NOW + 1000)}
    # When the first attempt fails
    decision = decide(FIXED, options, 1, ValueError("x"), NOW)
    # Then the next attempt would start after the deadline: a final failure, with a note
    assert decision.kind == FAIL
    assert decision.reason == "task-failed"
    assert decision.note is not None and "deadline" in decision.note
    # Within the deadline it is retried.
    roomy = decide(FIXED, {"deadline_ms": str(NOW + 2000)}, 1, ValueError("x"), NOW)
    assert roomy.kind == RETRY
    # A deadline already passed also stops a Retry with a countdown.
    late = decide(FIXED, {"deadline_ms": str(NOW - 1)}, 2, Retry(countdown_s=0), NOW)
    assert late.kind == FAIL and late.reason == "retries-exhausted"


@pytest.mark.parametrize(
    "options",
    [{"max_retries": "lots"}, {"backoff": "sideways"}, {"backoff_s": "soon"},
     {"deadline_ms": "tomorrow"}, {"max_retries": "-1"}],
)
def test_malformed_options_are_ignored_with_a_note(options: dict[str, str]) -> None:
    # The task's own policy applies: retried with its fixed 1.5 s.
    decision = decide(FIXED, options, 1, ValueError("x"), NOW)
    assert decision.kind == RETRY
    assert decision.delay_s == 1.5
    assert decision.note is not None and decision.note.startswith("malformed retry options")
    # The note is kept when the task's policy then fails the task.
    failed = decide(RetryPolicy(), options, 1, ValueError("x"), NOW)
    assert failed.kind == FAIL and failed.reason == "task-failed"
    assert failed.note is not None and "malformed" in failed.note


@pytest.mark.parametrize(
    "error",
    [ConfigError("bad workflow node"), EncodeError("set is not a value"),
     MessageTooLargeError("follow-up too large")],
)
def test_follow_up_errors_are_never_retried(error: BaseException) -> None:
    assert isinstance(error, FOLLOW_UP_ERRORS)
    policy = RetryPolicy(max_retries=10, backoff="fixed", backoff_s=0)
    first = decide(policy, {"max_retries": "20"}, 1, error, NOW)
    assert first.kind == FAIL and first.reason == "task-failed"
    later = decide(policy, {}, 3, error, NOW)
    assert later.kind == FAIL and later.reason == "retries-exhausted"


# -- safe_text / error_text ------------------------------------------------------------


def test_safe_text_escapes_lone_surrogates() -> None:
    text = safe_text("bad \udcff name")
    assert text == "bad \\udcff name"
    assert text.encode("utf-8")  # does not raise
    assert safe_text("plain ünïcode ✓") == "plain ünïcode ✓"


def test_safe_text_cuts_to_the_limit() -> None:
    assert safe_text("x" * 10, limit=10) == "x" * 10
    cut = safe_text("x" * 11, limit=10)
    assert len(cut) == 10 and cut.endswith("…")
    long = safe_text("y" * (MAX_ERROR_CHARS * 2))
    assert len(long) == MAX_ERROR_CHARS
    # Escaping happens before the cut, so the result is still within the limit.
    assert len(safe_text("\udcff" * 100, limit=50)) == 50


def test_error_text_of_an_error_with_a_surrogate() -> None:
    text = error_text(ValueError("bad \udcff name"))
    assert text == "bad \\udcff name"
    text.encode("utf-8")


def test_error_text_survives_a_broken_str() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text for you")

    assert error_text(Broken()) == "<str() of Broken failed: RuntimeError>"

    class Surrogates(Exception):
        def __str__(self) -> str:
            return "\ud800" * 3

    error_text(Surrogates()).encode("utf-8")
