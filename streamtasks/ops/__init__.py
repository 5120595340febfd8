"""Operator tools: dead letters (list, requeue, purge), replay, group offset migration."""

from __future__ import annotations

from streamtasks.ops.dlq import DeadLetter, list_dead_letters, purge, requeue
from streamtasks.ops.groups import GroupBusyError, GroupMigration, OffsetCopy, migrate_group
from streamtasks.ops.replay import REPLAY_OF, RangeError, ReplayItem, ReplayReport, replay

__all__ = [
    "REPLAY_OF",
    "DeadLetter",
    "GroupBusyError",
    "GroupMigration",
    "OffsetCopy",
    "RangeError",
    "ReplayItem",
    "ReplayReport",
    "list_dead_letters",
    "migrate_group",
    "purge",
    "replay",
    "requeue",
]
