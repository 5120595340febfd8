"""Revoking tasks: recorded in the result backend, broadcast to every worker.

:func:`revoke` writes each id to the backend (with a TTL, ``revoked_tasks``) and sends
one record per id to the control topic ``{ns}._control`` (:meth:`Topology.control_topic`,
compacted: the newest record per id is kept until the revoke expires). Every worker
reads that topic from its start, in a thread of its own, into a :class:`RevokedIds`:
it reads the topic to its end before joining the task groups, so a worker never runs a
task revoked before it started, and learns of later revokes within the poll interval.

A revoked id matches a task whose id, workflow root id or group id is revoked: revoking
a chain's or a group's result revokes every part not yet run. The worker checks when it
takes a record in and again just before the task starts; a revoked task ends REVOKED
without running (a delayed or retried one when it comes back from its delay tier).
``terminate=True`` also stops it while it runs: an ``async def`` task is cancelled, a task
running in a child process (``pool="process"``) has its process killed. A sync task in a
thread cannot be stopped: it runs to its end and its outcome is kept.

The control record's value is a small JSON object (``{"terminate": bool, "expires_ms":
int}``); nothing else is ever read from it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog

from streamtasks.broker.base import Record, TopicPartition, TopicSpec
from streamtasks.errors import ConfigError, SendError

if TYPE_CHECKING:
    from streamtasks.app import App
    from streamtasks.broker.base import Consumer
    from streamtasks.message import TaskMessage

log = structlog.get_logger("streamtasks.control")

#: How long a revoke is kept (Celery keeps revokes 3 hours by default, too).
REVOKE_EXPIRES_S = 3 * 3600
#: The longest a revoke may be kept: the control topic keeps records this long.
REVOKE_MAX_EXPIRES_S = 7 * 86400
#: The longest a worker waits at start to read the revokes made before it.
CATCH_UP_S = 30.0


@dataclass(frozen=True, slots=True)
class RevokeNotice:
    """One revoke as read from the control topic."""

    task_id: str
    terminate: bool
    expires_ms: int


def encode_notice(terminate: bool, expires_ms: int) -> bytes:
    """Return the control record value of a revoke."""
    return json.dumps({"terminate": terminate, "expires_ms": expires_ms}).encode()


def decode_notice(record: Record) -> RevokeNotice | None:
    """Return the revoke a control record carries, or None for anything else."""
    if record.key is None or record.value is None:
        return None
    try:
        body = json.loads(record.value)
        return RevokeNotice(record.key.decode(), bool(body["terminate"]),
                            int(body["expires_ms"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        log.warning("unreadable control record skipped", offset=record.offset)
        return None


def control_topic_spec(app: App) -> TopicSpec:
    """Return the control topic's spec: one partition, compacted, deleted after expiry."""
    topology = app.settings.topology
    config = {
        **topology.topic_config(),
        "cleanup.policy": "compact,delete",
        "retention.ms": str(REVOKE_MAX_EXPIRES_S * 1000),
    }
    return TopicSpec(topology.control_topic(), 1, topology.replication_factor, config,
                     topology.min_insync_replicas)


def ensure_control_topic(app: App) -> None:
    """Create the control topic when allowed and missing."""
    if app.settings.create_topics:
        app.broker.create_topics([control_topic_spec(app)])


def revoke(app: App, task_ids: Sequence[str], terminate: bool = False,
           expires_s: float = REVOKE_EXPIRES_S) -> None:
    """Revoke tasks: record them, tell every worker; return when Kafka confirmed it.

    Raises:
        ConfigError: no id given, or ``expires_s`` not positive.
        BackendError: the backend did not record them.
        SendError: Kafka did not confirm the broadcast.
    """
    ids = list(dict.fromkeys(str(t) for t in task_ids))
    if not ids:
        raise ConfigError("revoke: give at least one task id")
    if not 0 < expires_s <= REVOKE_MAX_EXPIRES_S:
        raise ConfigError(f"revoke: expires_s must be above 0 and at most "
                          f"{REVOKE_MAX_EXPIRES_S} (7 days, the control topic's retention), "
                          f"got {expires_s}")
    app.backend.store_revoked(ids, terminate, int(expires_s))
    ensure_control_topic(app)
    expires_ms = int((time.time() + expires_s) * 1000)
    value = encode_notice(terminate, expires_ms)
    confirmed: dict[str, str | None] = {}

    def delivered(task_id: str, error: str | None) -> None:
        confirmed[task_id] = error

    for task_id in ids:
        app.broker.send(app.settings.topology.control_topic(), value, key=task_id.encode(),
                        on_delivery=partial(delivered, task_id))
    app.broker.flush(30.0)
    failures = [(t, confirmed.get(t) or "not confirmed within 30s") for t in ids
                if t not in confirmed or confirmed[t] is not None]
    if failures:
        raise SendError(failures)
    log.info("revoked", ids=len(ids), terminate=terminate)


class RevokedIds:
    """The ids revoked and not yet expired, as a worker knows them (thread-safe reads)."""

    #: Expired revokes are forgotten every this many additions.
    PURGE_EVERY = 10_000

    def __init__(self) -> None:
        self._ids: dict[str, RevokeNotice] = {}
        self._added = 0

    def add(self, notice: RevokeNotice) -> None:
        """Remember a revoke (a later one of the same id replaces it)."""
        self._ids[notice.task_id] = notice
        self._added += 1
        if self._added % self.PURGE_EVERY == 0:
            now_ms = time.time() * 1000
            self._ids = {k: n for k, n in self._ids.items() if n.expires_ms >= now_ms}

    def __len__(self) -> int:
        return len(self._ids)

    def match(self, msg: TaskMessage) -> RevokeNotice | None:
        """Return the revoke that applies to a task (its id, or its workflow's), or None.

        An expired revoke of one of them does not hide a live one of another (a step's
        own short revoke, then its whole chain's). Expired revokes are left for
        :meth:`add`'s purge: removing one here could remove a newer revoke of the same
        id the listener thread just added.
        """
        if not self._ids:
            return None
        now_ms = time.time() * 1000
        for key in (msg.id, msg.root_id, msg.group_id):
            notice = None if key is None else self._ids.get(key)
            if notice is not None and notice.expires_ms >= now_ms:
                return notice
        return None


class ControlListener:
    """Reads the control topic into a :class:`RevokedIds`, from the topic's start.

    Joins a consumer group of its own (``{ns}._control.{uuid}``, never committed), so
    every worker reads every revoke.

    Args:
        app: the app whose control topic is read.
        revoked: where revokes go.
        on_terminate: called with each task id revoked with ``terminate=True``.
    """

    def __init__(self, app: App, revoked: RevokedIds,
                 on_terminate: Callable[[str], object] = lambda _id: None) -> None:
        self.app = app
        self.revoked = revoked
        self.on_terminate = on_terminate
        self._topic = app.settings.topology.control_topic()
        self._consumer: Consumer | None = None
        self._assigned: list[TopicPartition] = []
        self._position: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, catch_up_s: float = CATCH_UP_S) -> bool:
        """Join, read every revoke made so far (up to ``catch_up_s``), then keep reading.

        Returns:
            True when the topic was read to its end in time (False: logged as a warning).
        """
        ensure_control_topic(self.app)
        group = f"{self.app.settings.topology.control_topic()}.{uuid.uuid4().hex}"
        self._consumer = self.app.broker.consumer(group, [self._topic], self, eager=True)
        caught_up = self._catch_up(catch_up_s)
        self._thread = threading.Thread(target=self._run, name="streamtasks-control",
                                        daemon=True)
        self._thread.start()
        return caught_up

    def _catch_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        ends: dict[TopicPartition, tuple[int, int]] | None = None
        while time.monotonic() < deadline:
            self.poll(0.1)
            if not self._assigned:
                continue
            if ends is None:
                ends = {tp: self.app.broker.watermarks(tp) for tp in self._assigned}
            # nothing read yet counts from the low watermark: once retention deleted
            # every revoke, the topic is empty although its end is not offset 0
            if all(self._position.get(tp, low) >= high for tp, (low, high) in ends.items()):
                log.info("revokes read", revoked=len(self.revoked))
                return True
        log.warning("the control topic was not read to its end in time; revokes made "
                    "before this worker started may be missed", timeout_s=timeout_s)
        return False

    def poll(self, timeout_s: float) -> int:
        """Read what came; return how many records."""
        assert self._consumer is not None
        records = self._consumer.poll(timeout_s, 500)
        for record in records:
            self._position[record.tp] = record.offset + 1
            notice = decode_notice(record)
            if notice is None:
                continue
            self.revoked.add(notice)
            if notice.terminate:
                self.on_terminate(notice.task_id)
        return len(records)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(0.2)
            except Exception:
                log.exception("reading the control topic failed; trying again")
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop reading and leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # -- rebalance listener: a group of one, nothing to commit --------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Partitions of the control topic assigned (read from their start)."""
        self._assigned = sorted(set(self._assigned) | set(partitions))

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions revoked (only at close)."""
        self._assigned = [tp for tp in self._assigned if tp not in partitions]

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost (only at close)."""
        self.on_revoke(partitions)

    def on_commit(self, committed: object, failed: object, error: str | None) -> None:
        """Never commits: nothing to do."""
