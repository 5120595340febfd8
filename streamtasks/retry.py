"""Retry policies: how many attempts, how long between them, on which errors.

Backoffs, for attempt ``n`` (1 for the first retry), with ``base_s`` and ``max_s``:
- ``fixed``: ``base_s`` every time;
- ``exponential``: "full jitter", uniform in ``[0, min(max_s, base_s * 2**(n-1))]``;
- ``fibonacci``: ``base_s`` times 1, 2, 3, 5, 8, ... (Machinery's), capped at ``max_s``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from streamtasks.errors import ConfigError, Retry

BACKOFFS = ("fixed", "exponential", "fibonacci")

#: Retries a task that raises ``Retry`` gets when its ``max_retries`` is 0 (as in Celery).
RETRY_REQUEST_LIMIT = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a failed task is tried again.

    Attributes:
        max_retries: retries after the first attempt (0: never retried).
        backoff: ``fixed``, ``exponential`` (full jitter) or ``fibonacci``.
        backoff_s: the base delay in seconds.
        backoff_max_s: the longest delay in seconds.
        retry_on: exception types that are retried (None: any ``Exception``).
            ``Retry`` raised by the task is always retried while retries remain.
        deadline_ms: no attempt is scheduled after this time (ms since the epoch).
    """

    max_retries: int = 0
    backoff: str = "exponential"
    backoff_s: float = 1.0
    backoff_max_s: float = 600.0
    retry_on: tuple[type[BaseException], ...] | None = None
    deadline_ms: int | None = None

    def __post_init__(self) -> None:
        if self.backoff not in BACKOFFS:
            raise ConfigError(f"backoff must be one of {', '.join(BACKOFFS)}, got {self.backoff!r}")
        if self.max_retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ConfigError("max_retries, backoff_s and backoff_max_s must not be negative")

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Return the delay before retry number ``retry`` (1 for the first)."""
        if self.backoff == "fixed":
            return min(self.backoff_s, self.backoff_max_s)
        if self.backoff == "fibonacci":
            a, b = 1, 2
            for _ in range(retry - 1):
                a, b = b, a + b
            return min(self.backoff_s * a, self.backoff_max_s)
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** min(retry - 1, 62))
        return (rng or random).uniform(0, ceiling)

    def retryable(self, error: BaseException) -> bool:
        """Whether ``error`` is one this policy retries (retries left aside)."""
        if isinstance(error, Retry):
            return True
        if self.max_retries == 0:
            return False
        return isinstance(error, self.retry_on or (Exception,))

    def allows(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt`` that failed with ``error`` is tried again."""
        if not self.retryable(error):
            return False
        limit = self.max_retries
        if isinstance(error, Retry) and error.max_retries is not None:
            limit = error.max_retries  # Celery's Retry(max_retries=...): this call's limit
        elif limit == 0 and isinstance(error, Retry):
            limit = RETRY_REQUEST_LIMIT
        return attempt <= limit

    def with_options(self, options: Mapping[str, str]) -> RetryPolicy:
        """Return the policy with a call's overrides (``TaskMessage.options``) applied."""
        changes: dict[str, object] = {}
        if "max_retries" in options:
            changes["max_retries"] = int(options["max_retries"])
        if "backoff" in options:
            changes["backoff"] = options["backoff"]
        if "backoff_s" in options:
            changes["backoff_s"] = float(options["backoff_s"])
        if "deadline_ms" in options:
            changes["deadline_ms"] = int(options["deadline_ms"])
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]


def call_options(
    max_retries: int | None, backoff: str | None, backoff_s: float | None,
    deadline_ms: int | None,
) -> dict[str, str]:
    """Encode a call's retry overrides as message options (strings).

    Raises:
        ConfigError: an unknown backoff or a negative number.
    """
    if max_retries is None and backoff is None and backoff_s is None and deadline_ms is None:
        return {}  # the common call: no override
    if backoff is not None and backoff not in BACKOFFS:
        raise ConfigError(f"backoff must be one of {', '.join(BACKOFFS)}, got {backoff!r}")
    pairs = {"max_retries": max_retries, "backoff": backoff, "backoff_s": backoff_s,
             "deadline_ms": deadline_ms}
    for name in ("max_retries", "backoff_s"):
        value = pairs[name]
        if isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    return {k: str(v) for k, v in pairs.items() if v is not None}
