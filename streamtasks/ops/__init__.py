"""Operator tools: the dead-letter topic (list, requeue, purge) and replay of a range."""

from __future__ import annotations

from streamtasks.ops.dlq import DeadLetter, list_dead_letters, purge, requeue
from streamtasks.ops.replay import REPLAY_OF, RangeError, ReplayReport, replay

__all__ = [
    "REPLAY_OF",
    "DeadLetter",
    "RangeError",
    "ReplayReport",
    "list_dead_letters",
    "purge",
    "replay",
    "requeue",
]
