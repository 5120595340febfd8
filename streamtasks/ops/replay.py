"""Replay: send the tasks of a range of a queue's topic again, to reprocess them once.

The range is a time window (records stamped in ``[since, until)``, found through the
broker's offsets-for-times look-up) or an offset range per partition. Tasks are
filtered by name from the ``st-name`` header, so records that are not picked are never
decoded.

A topic holds more than the tasks producers started: every retry attempt and every
workflow step, callback, chord body or child a task sent is a record too, and the
replayed task produces those again itself. So by default only *origin* records are
replayed: attempt 1 (the ``st-attempt`` header) and no parent task (``parent_id``, set on
everything a worker sends), each task id once; a copy sent by an earlier replay counts as
its original (``st-replay-of``), so the first one read of the two is sent and the other
is not. ``include_derived`` replays every record.

A replayed task gets a new id (its ``options["replay_of"]`` names the original), and so
does every task and group its workflow will produce (chain steps, callbacks, chord
members and bodies: one renaming per replay, so the members of a group replayed together
still meet in one chord), so no row of the original run is ever overwritten. With
``same_ids`` the ids are kept and the rows overwritten. Every replayed record carries the
header ``st-replay-of``; it runs now, from attempt 1 (an expiry time it carries still
applies).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from streamtasks.app import App
from streamtasks.broker.base import Record, TopicPartition
from streamtasks.errors import MessageError
from streamtasks.headers import ATTEMPT, TASK_NAME, header_text
from streamtasks.message import TaskMessage
from streamtasks.ops._common import Progress, Resender, read_ranges, run_again
from streamtasks.workflow import JOIN, renamed_ids

log = structlog.get_logger("streamtasks.ops")

#: Header of a replayed record: the id of the task it replays.
REPLAY_OF = "st-replay-of"
#: Option of a replayed task with a new id: the id of the task it replays.
REPLAY_OF_OPTION = "replay_of"


class RangeError(ValueError):
    """A replay range that names nothing sensible (reversed, mixed, unknown partition)."""


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One task a replay sends (or, dry, would send): where it was read and what it is."""

    partition: int
    offset: int
    task_id: str
    name: str


@dataclass(slots=True)
class ReplayReport:
    """What a replay did.

    Attributes:
        read: records read from the range.
        matched: records that passed the filters (name, time window) and are replayed
            (or would be, dry).
        sent: tasks sent again (0 for a dry run).
        skipped: records that could not be decoded, so were not sent.
        derived: records left out as not starting a task (a retry attempt, or sent by a
            task: a workflow step, callback or child); 0 with ``include_derived``.
        repeated: records left out because their task id was replayed already.
        by_name: replayed (or would-be) tasks per name.
        partial_chords: chords only some of whose members were in the range, by group
            id: (members replayed, members in the chord). Their bodies will not run
            (the members not replayed never join the new group).
    """

    read: int = 0
    matched: int = 0
    sent: int = 0
    skipped: int = 0
    derived: int = 0
    repeated: int = 0
    by_name: Counter[str] = field(default_factory=Counter)
    partial_chords: dict[str, tuple[int, int]] = field(default_factory=dict)


def replay(
    app: App,
    queue: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    from_offsets: Mapping[int, int] | None = None,
    to_offsets: Mapping[int, int] | None = None,
    name: str | None = None,
    into: str | None = None,
    dry_run: bool = False,
    same_ids: bool = False,
    include_derived: bool = False,
    progress: Progress | None = None,
    listing: Callable[[ReplayItem], None] | None = None,
) -> ReplayReport:
    """Send the tasks of a range of ``queue``'s topic again.

    Give a time window (``since_ms``, optional ``until_ms``) or offsets
    (``from_offsets`` and ``to_offsets``), not both.

    Args:
        app: the app (its broker, codec and settings).
        queue: the queue whose topic is read.
        since_ms: the window's start: records stamped at or after it (ms since epoch).
        until_ms: the window's end: records stamped before it (default: up to the end).
        from_offsets: per partition number, the first offset to read.
        to_offsets: per partition number, the last offset to read (inclusive); the
            same partitions as ``from_offsets``.
        name: replay only tasks of this name.
        into: send to this queue (default: ``queue`` itself).
        dry_run: count what would be sent, send nothing.
        same_ids: keep the task ids (their result rows are overwritten); by default
            each replayed task, and every task its workflow produces, gets a new id.
        include_derived: replay retry attempts and what tasks sent (workflow steps,
            callbacks, children) too; by default only the records that started a task.
        progress: told (records read, records to read) every 1000 records and at the end.
        listing: told each task replayed (or, dry, that would be), in reading order.

    Returns:
        The counts of records read, matched and sent.

    Raises:
        RangeError: the range is reversed, mixed, or names a partition that does not exist.
        BrokerError: the topic does not exist or the broker failed.
        SendError: some replayed tasks were not confirmed (naming them).
    """
    topic = app.settings.topic(queue)
    ranges = _ranges(app, topic, since_ms, until_ms, from_offsets, to_offsets)
    target = into or queue
    report = ReplayReport()
    sender = Resender(app)
    rename = _identity if same_ids else _renaming()
    seen: set[str] = set()
    chords = _ChordMembers()
    for record in read_ranges(app, ranges, progress):
        report.read += 1
        if not _matches(record, name, since_ms, until_ms):
            continue
        if not include_derived and _attempt(record) > 1:  # known from the header alone
            report.derived += 1
            continue
        msg = _decode(app, record)
        if msg is None:
            report.skipped += 1
            continue
        if not include_derived and msg.parent_id is not None:
            report.derived += 1
            continue
        origin = _origin_id(record, msg)
        if origin in seen:  # a producer's retry, a re-sent task or an earlier replay's copy
            report.repeated += 1
            continue
        seen.add(origin)
        report.matched += 1
        report.by_name[msg.name] += 1
        chords.add(msg)
        if listing is not None:
            listing(ReplayItem(record.partition, record.offset, msg.id, msg.name))
        if not dry_run:
            _resend(sender, record, msg, origin, target, rename)
    if not dry_run:
        # Confirm before reporting: a replay that Kafka did not take must not look done.
        sender.flush()
        report.sent = sender.sent
    if report.skipped:
        log.warning("undecodable records not replayed", topic=topic, skipped=report.skipped)
    report.partial_chords = chords.partial()
    if report.partial_chords:
        log.warning("chords only partly in the range: their bodies will not run",
                    topic=topic, chords=len(report.partial_chords),
                    groups=sorted(report.partial_chords)[:10])
    log.info("replayed", topic=topic, into=app.settings.topic(target), read=report.read,
             matched=report.matched, sent=report.sent, derived=report.derived,
             repeated=report.repeated, dry_run=dry_run)
    return report


class _ChordMembers:
    """Which members of each chord a replay sends, to tell chords cut by the range."""

    def __init__(self) -> None:
        self._members: dict[str, tuple[int, set[int]]] = {}

    def add(self, msg: TaskMessage) -> None:
        for node in msg.chain:
            if node.get("kind") == JOIN:
                _, indices = self._members.setdefault(str(node["group"]),
                                                      (int(node["size"]), set()))
                indices.add(int(node["index"]))

    def partial(self) -> dict[str, tuple[int, int]]:
        return {group: (len(indices), size)
                for group, (size, indices) in self._members.items() if len(indices) < size}


def _matches(record: Record, name: str | None, since_ms: int | None, until_ms: int | None) -> bool:
    if name is not None and header_text(record.headers, TASK_NAME) != name:
        return False
    # offsets_for_times finds the bounds; a producer's own timestamps may still be
    # slightly out of order inside them, so the window is checked per record too.
    if since_ms is not None and record.timestamp_ms < since_ms:
        return False
    return until_ms is None or record.timestamp_ms < until_ms


def _attempt(record: Record) -> int:
    text = header_text(record.headers, ATTEMPT)
    return int(text) if text is not None and text.isdigit() else 1


def _decode(app: App, record: Record) -> TaskMessage | None:
    try:
        return app.codec.decode_task(record.value or b"")
    except MessageError as err:
        log.warning("cannot decode a record to replay", topic=record.topic,
                    partition=record.partition, offset=record.offset, error=str(err))
        return None


def _origin_id(record: Record, msg: TaskMessage) -> str:
    """Return the id of the task a record runs: the original's, for a replayed copy.

    A range that holds an earlier replay's copies as well as their originals (a window
    reaching past the first replay) then replays each task once, not once per copy.
    """
    replayed = header_text(record.headers, REPLAY_OF)
    return replayed or msg.id


def _identity(task_id: str) -> str:
    return task_id


def _renaming() -> Callable[[str], str]:
    """One replay's renaming: the same old id always gets the same new one."""
    run = uuid.uuid4()
    return lambda task_id: str(uuid.uuid5(run, task_id))


def _resend(
    sender: Resender, record: Record, msg: TaskMessage, original: str, target: str,
    rename: Callable[[str], str],
) -> None:
    if rename is not _identity:
        msg.id = rename(msg.id)
        if msg.group_id is not None:
            msg.group_id = rename(msg.group_id)
        msg.chain = renamed_ids(msg.chain, rename)
        msg.link = renamed_ids(msg.link, rename)
        msg.link_error = renamed_ids(msg.link_error, rename)
        msg.options = {**msg.options, REPLAY_OF_OPTION: original}
    # Runs again now, from attempt 1 (a due time would send it to a delay tier).
    run_again(msg, target)
    # The record key is kept, so tasks sharing a key still share a partition.
    sender.send(msg, key=record.key, headers={REPLAY_OF: original.encode()})


def _ranges(
    app: App,
    topic: str,
    since_ms: int | None,
    until_ms: int | None,
    from_offsets: Mapping[int, int] | None,
    to_offsets: Mapping[int, int] | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Return the ``[start, end)`` offsets to read per partition."""
    by_time = since_ms is not None or until_ms is not None
    by_offset = from_offsets is not None or to_offsets is not None
    if by_time == by_offset:
        raise RangeError("give a time window (since / until) or offsets (from / to), not both")
    count = app.broker.partition_count(topic)
    partitions = [TopicPartition(topic, p) for p in range(count)]
    if by_time:
        if since_ms is None:
            raise RangeError("a time window needs its start (since)")
        if until_ms is not None and since_ms >= until_ms:
            raise RangeError(f"the window's start ({since_ms}) must be before its end "
                             f"({until_ms})")
        starts = app.broker.offsets_for_times(topic, since_ms)
        if until_ms is None:
            ends = {tp: app.broker.watermarks(tp)[1] for tp in partitions}
        else:
            ends = app.broker.offsets_for_times(topic, until_ms)
        return {tp: (starts[tp], ends[tp]) for tp in partitions}
    first, last = dict(from_offsets or {}), dict(to_offsets or {})
    if not first or set(first) != set(last):
        raise RangeError("from and to offsets must name the same partitions")
    ranges: dict[TopicPartition, tuple[int, int]] = {}
    for p, start in sorted(first.items()):
        if not 0 <= p < count:
            raise RangeError(f"topic {topic} has partitions 0..{count - 1}, not {p}")
        if start < 0 or start > last[p]:
            raise RangeError(f"partition {p}: the from offset ({start}) must be at least 0 "
                             f"and not after the to offset ({last[p]})")
        ranges[TopicPartition(topic, p)] = (start, last[p] + 1)
    return ranges
