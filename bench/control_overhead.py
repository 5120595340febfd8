"""What revoke and rate-limit checks cost a worker per task and per loop turn.

    python bench/control_overhead.py

Prints nanoseconds per call of the checks the worker makes: ``RevokedIds.match`` (twice
per task: when taken in and before it starts), ``RateGate.admit`` (once per task) and
``RateGate.release`` + ``held`` (once per loop turn), with no limit declared.
"""

from __future__ import annotations

import timeit

from streamtasks.broker.base import TopicPartition
from streamtasks.control import RevokedIds, RevokeNotice
from streamtasks.message import TaskMessage
from streamtasks.ratelimit import RateGate

CALLS = 1_000_000


def per_call_ns(fn: object) -> float:
    """Nanoseconds per call of ``fn`` over :data:`CALLS` calls."""
    return timeit.timeit(fn, number=CALLS) / CALLS * 1e9  # type: ignore[arg-type]


def main() -> None:
    """Measure and print."""
    msg = TaskMessage(id="a", name="t", queue="q", args=[], kwargs={}, created_ms=0)
    revoked = RevokedIds()
    gate: RateGate[int] = RateGate(lambda group: 1)
    tp = TopicPartition("x", 0)
    print(f"baseline (an empty call): {per_call_ns(lambda: None):.0f} ns")
    print(f"RevokedIds.match, nothing revoked: {per_call_ns(lambda: revoked.match(msg)):.0f} ns")
    revoked.add(RevokeNotice("other", False, 10**15))
    print(f"RevokedIds.match, one id revoked: {per_call_ns(lambda: revoked.match(msg)):.0f} ns")
    print(f"RateGate.admit, no limit: {per_call_ns(lambda: gate.admit('t', tp, 1)):.0f} ns")
    print(f"RateGate.release + held, no limit: "
          f"{per_call_ns(lambda: (gate.release(), gate.held())):.0f} ns")


if __name__ == "__main__":
    main()
