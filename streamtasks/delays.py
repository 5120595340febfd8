"""Delay tiers: fixed-delay topics where delayed and retried tasks wait.

Every record in tier ``T`` of a queue waits exactly ``T`` after it was written, so the
due times in a tier partition rise with its offsets and a consumer only has to look at
the head. A delay is travelled as hops: the largest tier that fits the time still to
wait, again and again; what is left below the smallest tier waits one smallest tier,
so a task is never forwarded early and is late by less than the smallest tier.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from streamtasks.errors import ConfigError

#: Default tiers, in milliseconds: 1s, 5s, 30s, 2m, 10m, 1h.
DEFAULT_TIERS = "1s,5s,30s,2m,10m,1h"

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_TIER = re.compile(r"^(\d+)(ms|s|m|h|d)$")


@dataclass(frozen=True, slots=True)
class DelayTier:
    """One tier: its name in topic names (``5s``) and its delay."""

    name: str
    delay_ms: int


@functools.lru_cache(maxsize=32)
def parse_tiers(text: str) -> tuple[DelayTier, ...]:
    """Parse ``"1s,5s,30s,2m"`` into tiers sorted by delay.

    Raises:
        ConfigError: an empty list, a malformed or repeated tier.
    """
    tiers: dict[int, DelayTier] = {}
    for raw in (part.strip() for part in text.split(",")):
        match = _TIER.match(raw)
        if not match or int(match.group(1)) == 0:
            raise ConfigError(
                f"delay tier {raw!r} is malformed; use a positive number and a unit "
                f"(ms, s, m, h, d), comma-separated, e.g. {DEFAULT_TIERS}"
            )
        delay = int(match.group(1)) * _UNITS_MS[match.group(2)]
        if delay in tiers:
            raise ConfigError(f"delay tiers {tiers[delay].name} and {raw} are the same delay")
        tiers[delay] = DelayTier(raw, delay)
    if not tiers:
        raise ConfigError("at least one delay tier is needed")
    return tuple(sorted(tiers.values(), key=lambda t: t.delay_ms))


def next_hop(tiers: Sequence[DelayTier], wait_ms: int) -> DelayTier | None:
    """Return the tier to wait in next for ``wait_ms`` still to wait, or None when due.

    The largest tier not longer than the wait; below the smallest tier, the smallest
    (late by less than it, never early). A wait beyond the largest tier takes the
    largest, and goes round again when it comes out.
    """
    if wait_ms <= 0:
        return None
    chosen = tiers[0]
    for tier in tiers:
        if tier.delay_ms <= wait_ms:
            chosen = tier
    return chosen


def tier_of_topic(topic: str, tiers: Sequence[DelayTier]) -> DelayTier | None:
    """Return the tier a topic name belongs to, or None for a topic that is not a tier."""
    _, sep, name = topic.rpartition(".delay.")
    if not sep:
        return None
    return next((t for t in tiers if t.name == name), None)
