"""The task message: what travels on a queue's topic, independent of encoding."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_task_id() -> str:
    """Return a fresh random task id (a UUID4 string, 122 bits from ``os.urandom``).

    The text ``str(uuid.uuid4())`` would give, built without a ``UUID`` object (whose
    checks cost more than the random bytes): the version nibble is 4 and the variant's
    two high bits are ``10`` (RFC 4122).
    """
    h = os.urandom(16).hex()
    return (f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGITS[int(h[16], 16) & 3]}{h[17:20]}-"
            f"{h[20:]}")


# The first hex digit of the fourth group: the RFC 4122 variant (binary 10xx).
_VARIANT_DIGITS = "89ab"


def derived_task_id(parent_id: str, role: str) -> str:
    """Return the id of a follow-up task, derived from its parent's id.

    A parent that runs twice derives the same ids, so its follow-ups are written and
    sent idempotently (a repeat overwrites, never forks).
    """
    return str(uuid.uuid5(uuid.UUID(int=0), f"{parent_id}/{role}"))


def now_ms() -> int:
    """Return the wall-clock time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class TaskMessage:
    """One task to run.

    Attributes:
        id: the task id (also the result row's key).
        name: the registered task name.
        queue: the queue (topic) it was sent to.
        args: positional arguments (plain values: see ``streamtasks.codec``).
        kwargs: keyword arguments.
        attempt: 1 for the first run, incremented on each retry.
        created_ms: when the caller sent it.
        eta_ms: not to run before this time (ms since epoch), or None.
        expires_ms: not to run after this time, or None.
        key: the partition key (records with one key share a partition), or None.
        parent_id, root_id, group_id: workflow links.
        group_index, group_size: position of a group member.
        link, link_error, chain: follow-up signatures as plain dicts (workflows).
        options: free-form string options (retry policy overrides and the like).
        traceparent: W3C trace context, or None.
    """

    id: str
    name: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    created_ms: int = field(default_factory=now_ms)
    eta_ms: int | None = None
    expires_ms: int | None = None
    key: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    group_index: int | None = None
    group_size: int | None = None
    link: list[dict[str, Any]] = field(default_factory=list)
    link_error: list[dict[str, Any]] = field(default_factory=list)
    chain: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    traceparent: str | None = None
