"""Points in time as milliseconds since the epoch; a naive datetime means UTC, everywhere.

The API (``apply_async(eta=...)``) and the command line (``--since``, ``--until``) both
turn times into epoch milliseconds here, so one written time means one instant whatever
the ``TZ`` of the process that reads it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

#: Units of a relative time (``-30m``), in seconds.
RELATIVE_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_RELATIVE = re.compile(r"^-(\d+)([smhd])$")


def as_utc(moment: datetime) -> datetime:
    """Return ``moment`` as an aware datetime: a naive one is taken as UTC, not local time."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def epoch_ms(moment: datetime) -> int:
    """Return ``moment`` in milliseconds since the epoch (a naive datetime is UTC)."""
    return int(as_utc(moment).timestamp() * 1000)


def is_relative(text: str) -> bool:
    """Return whether ``text`` is a relative time such as ``-30m`` or ``-2h``."""
    return _RELATIVE.match(text) is not None


def parse_time_ms(text: str, now_ms: int | None = None) -> int:
    """Parse an ISO-8601 time or a relative ``-30m`` / ``-2h`` / ``-1d`` into epoch ms.

    An ISO time without an offset (``2026-11-24T16:00``, ``2026-11-24``) is UTC.

    Args:
        text: the time as written.
        now_ms: what a relative time counts back from (default: the clock now).

    Raises:
        ValueError: ``text`` is neither; the message says what is accepted.
    """
    relative = _RELATIVE.match(text)
    if relative:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - int(relative.group(1)) * RELATIVE_UNITS_S[relative.group(2)] * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expected an ISO-8601 time (2026-11-24T16:00:00Z; without an offset it is UTC) "
            f"or -30m / -2h / -1d, got {text!r}"
        ) from None
    return epoch_ms(moment)
