"""Carry committed offsets from an old consumer group over to the groups of today.

Workers used to join one group per *set* of queues (``{ns}.a+b``, and
``{ns}.a+b.delayer`` for the forwarder); now every queue has its own groups
(``{ns}.a``, ``{ns}.a.delayer``). A worker of the new version starting on a queue
whose new group has no committed offset would read the topic from its start and run
every task still retained again. :func:`migrate_group` copies the old group's offsets
into each queue's new group first, partition by partition, only where the new group
has none of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from streamtasks.app import App
from streamtasks.broker.base import TopicPartition
from streamtasks.errors import StreamTasksError

log = structlog.get_logger("streamtasks.ops")


class GroupBusyError(StreamTasksError):
    """A group that offsets would be copied into has active members."""


@dataclass(frozen=True, slots=True)
class OffsetCopy:
    """One partition's offset, from the old group to a new one.

    Attributes:
        tp: the partition.
        offset: the old group's committed offset (the next record to read).
        to_group: the queue's new group.
        existing: the new group's own offset there; when set, nothing is copied.
    """

    tp: TopicPartition
    offset: int
    to_group: str
    existing: int | None = None

    @property
    def copies(self) -> bool:
        """Whether this offset is (or, in a dry run, would be) copied."""
        return self.existing is None


@dataclass(slots=True)
class GroupMigration:
    """What :func:`migrate_group` found and did.

    Attributes:
        from_group: the old group.
        offsets: every offset of the old group on a topic of the queues, in order.
        ignored: topics the old group committed on that were left alone, with why: no
            group of the queues reads them (another queue's topics, a dead-letter topic),
            or their group is the old group itself (a one-queue set kept its name).
        old_members: active members of the old group when the copy was made.
        dry_run: nothing was written.
    """

    from_group: str
    offsets: list[OffsetCopy] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    old_members: int = 0
    dry_run: bool = False

    @property
    def copied(self) -> list[OffsetCopy]:
        """The offsets copied (or, in a dry run, to copy)."""
        return [o for o in self.offsets if o.copies]


def migrate_group(
    app: App, from_group: str, queues: Sequence[str], *, dry_run: bool = False
) -> GroupMigration:
    """Copy ``from_group``'s committed offsets to the per-queue groups of ``queues``.

    An offset on a queue's task topic goes to its worker group (``{ns}.{queue}``), one on
    a delay tier topic to its forwarder group (``{ns}.{queue}.delayer``); so an old worker
    group and an old forwarder group are both migrated by naming them. A partition where
    the new group already has an offset keeps it.

    Args:
        app: the app whose broker and settings (namespace, tiers) are used.
        from_group: the old group, e.g. ``streamtasks.a+b``.
        queues: the queues the old group served.
        dry_run: find what would be copied, write nothing.

    Raises:
        GroupBusyError: a group to copy into has active members (stop its workers
            first); nothing was copied.
        BrokerError: the broker did not answer or refused an offset.
    """
    topology = app.settings.topology
    roles = topology.roles(queues)
    report = GroupMigration(from_group, dry_run=dry_run)
    planned: dict[str, dict[TopicPartition, int]] = {}
    for tp, offset in sorted(app.broker.group_offsets(from_group).items()):
        role = roles.get(tp.topic)
        target = None if role is None else topology.group_of(role)
        if target is None:
            report.ignored[tp.topic] = "no group of these queues reads it"
            continue
        if target == from_group:
            report.ignored[tp.topic] = f"its group is {from_group} already"
            continue
        planned.setdefault(target, {})[tp] = offset
    # Check every target before writing any: a refusal leaves everything as it was.
    busy = {g: n for g in planned if (n := app.broker.group_member_count(g))}
    if busy:
        shown = ", ".join(f"{g} ({n} member(s))" for g, n in sorted(busy.items()))
        raise GroupBusyError(
            f"cannot copy offsets into groups with active members: {shown}; stop the "
            "workers of the new version (and their forwarders) first, then run this again"
        )
    report.old_members = app.broker.group_member_count(from_group)
    for target, offsets in sorted(planned.items()):
        existing = app.broker.group_offsets(target)
        copies = [OffsetCopy(tp, off, target, existing.get(tp)) for tp, off in offsets.items()]
        report.offsets.extend(copies)
        to_copy = {c.tp: c.offset for c in copies if c.copies}
        if to_copy and not dry_run:
            app.broker.set_group_offsets(target, to_copy)
            log.info("group offsets copied", from_group=from_group, to_group=target,
                     partitions=len(to_copy))
    return report
