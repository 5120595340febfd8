"""Every topic and consumer group name, and the configs of the topics: one home.

A queue ``q`` in namespace ``ns`` owns these topics::

    ns.q                 the tasks (kind ``task``)
    ns.q.delay.{tier}    one per delay tier (kind ``delay``)
    ns.q.dlq             the dead letters (kind ``dlq``)

one control topic per namespace, ``ns._control`` (revokes, compacted; queue names
beginning with ``_`` are reserved for it), and these consumer groups, one per queue
whatever set of queues a worker serves::

    ns.q                 the workers taking its tasks
    ns.q.delayer         the forwarder of its delay tiers

Names are only ever built here; a topic name is mapped back to its queue through
:meth:`Topology.roles` (built from the settings and the queues), never parsed.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from streamtasks.broker.base import TopicSpec
from streamtasks.delays import DelayTier, parse_tiers
from streamtasks.errors import ConfigError
from streamtasks.replicas import AUTO, check_min_insync_replicas

if TYPE_CHECKING:
    from streamtasks.settings import Settings

#: Room above ``max_message_bytes`` in a topic's ``max.message.bytes`` (key, headers,
#: record batch framing).
TOPIC_OVERHEAD_BYTES = 64 * 1024


class TopicKind(StrEnum):
    """What a topic of a queue holds."""

    TASK = "task"
    DELAY = "delay"
    DLQ = "dlq"


@dataclass(frozen=True, slots=True)
class TopicRole:
    """What a topic is: the queue it belongs to, its kind, and its tier (delay topics)."""

    queue: str
    kind: TopicKind
    tier: DelayTier | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    """The names and topic specs of the queues of one namespace.

    Build it with :meth:`from_settings`; it holds no queue list, so one topology serves
    any queue.

    Attributes:
        namespace: prefix of every topic and group name.
        tiers: the delay tiers, shortest first.
        partitions: partitions of created topics.
        replication_factor: replication factor of created topics (0: automatic, chosen
            from the brokers when a topic is created; see :mod:`streamtasks.replicas`).
        min_insync_replicas: ``min.insync.replicas`` of created topics (0: automatic).
        retention_ms: ``retention.ms`` of created topics.
        max_message_bytes: the largest task record.
    """

    namespace: str
    tiers: tuple[DelayTier, ...]
    partitions: int = 6
    replication_factor: int = AUTO
    min_insync_replicas: int = AUTO
    retention_ms: int = 7 * 24 * 3600 * 1000
    max_message_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        """Return the topology the settings describe (one instance per distinct values).

        Raises:
            ConfigError: the delay tiers are malformed.
        """
        return _topology(settings.namespace, settings.delay_tiers, settings.partitions,
                         settings.replication_factor, settings.min_insync_replicas,
                         settings.retention_ms, settings.max_message_bytes)

    # -- topics --------------------------------------------------------------------

    def topic(self, queue: str) -> str:
        """Return the task topic of ``queue``: ``{ns}.{queue}``."""
        return f"{self.namespace}.{queue}"

    def tier_topic(self, queue: str, tier: DelayTier) -> str:
        """Return the topic of one delay tier of ``queue``: ``{ns}.{queue}.delay.{tier}``."""
        return f"{self.namespace}.{queue}.delay.{tier.name}"

    def tier_topics(self, queue: str) -> list[str]:
        """Return the delay tier topics of ``queue``, shortest tier first."""
        return [self.tier_topic(queue, tier) for tier in self.tiers]

    def dlq_topic(self, queue: str) -> str:
        """Return the dead-letter topic of ``queue``: ``{ns}.{queue}.dlq``."""
        return f"{self.namespace}.{queue}.dlq"

    def topics(self, queue: str) -> list[str]:
        """Return every topic of ``queue``: the task topic, the dead letters, the tiers."""
        return [self.topic(queue), self.dlq_topic(queue), *self.tier_topics(queue)]

    def control_topic(self) -> str:
        """Return the namespace's control topic (revokes): ``{ns}._control``."""
        return f"{self.namespace}._control"

    # -- consumer groups -------------------------------------------------------------

    def group_id(self, queue: str) -> str:
        """Return the worker group of ``queue``: ``{ns}.{queue}``, one per queue."""
        return f"{self.namespace}.{queue}"

    def delayer_group_id(self, queue: str) -> str:
        """Return the group forwarding the delay tiers of ``queue``: ``{ns}.{queue}.delayer``."""
        return f"{self.namespace}.{queue}.delayer"

    def legacy_group_ids(self, queues: Sequence[str]) -> tuple[str, str]:
        """Return the (worker, forwarder) groups older versions used for a queue *set*.

        A worker serving ``a`` and ``b`` joined ``{ns}.a+b`` and ``{ns}.a+b.delayer``
        (queues sorted); ``streamtasks groups migrate`` carries their offsets over.
        """
        joined = "+".join(sorted(queues))
        return f"{self.namespace}.{joined}", f"{self.namespace}.{joined}.delayer"

    def lookup_group_id(self) -> str:
        """Return the ``group.id`` of a client that only looks offsets up (never joins)."""
        return f"{self.namespace}.lookup"

    def read_group_id(self) -> str:
        """Return a fresh throwaway ``group.id`` for a plain range read (never joins)."""
        return f"{self.namespace}.read.{uuid.uuid4().hex}"

    def group_of(self, role: TopicRole) -> str | None:
        """Return the group that consumes a topic of ``role`` (None: no group, the DLQ)."""
        if role.kind is TopicKind.TASK:
            return self.group_id(role.queue)
        if role.kind is TopicKind.DELAY:
            return self.delayer_group_id(role.queue)
        return None

    # -- the way back: topic name to role ---------------------------------------------

    def roles(self, queues: Iterable[str]) -> dict[str, TopicRole]:
        """Return, for every topic of ``queues``, what it is (built from names, not parsed)."""
        found: dict[str, TopicRole] = {}
        for queue in queues:
            found[self.topic(queue)] = TopicRole(queue, TopicKind.TASK)
            found[self.dlq_topic(queue)] = TopicRole(queue, TopicKind.DLQ)
            for tier in self.tiers:
                found[self.tier_topic(queue, tier)] = TopicRole(queue, TopicKind.DELAY, tier)
        return found

    def role_of(self, topic: str, queues: Iterable[str]) -> TopicRole | None:
        """Return what ``topic`` is among the topics of ``queues`` (None: not one of them)."""
        return self.roles(queues).get(topic)

    # -- topic specs -------------------------------------------------------------------

    def check_queue(self, queue: str) -> None:
        """Refuse a queue name that cannot name its topics and groups safely.

        A queue name is 1 or more of ``A-Z a-z 0-9 . _ -`` (Kafka's topic characters),
        does not begin with ``_`` (the control topic's), does not end in ``.dlq`` or
        ``.delayer`` nor contain ``.delay.`` (those name another queue's dead letters,
        forwarder group and tiers), and is short enough that its longest topic fits
        Kafka's 249 characters.

        Raises:
            ConfigError: saying what is wrong with the name.
        """
        if not queue:
            raise ConfigError("a queue name cannot be empty")
        bad = sorted({c for c in queue if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if bad:
            raise ConfigError(
                f"queue name {queue!r} has characters Kafka refuses in topic names "
                f"({''.join(bad)!r}); use letters, digits, '.', '_' and '-'"
            )
        if queue.startswith("_"):
            raise ConfigError(
                f"queue name {queue!r} is reserved: names beginning with '_' name "
                "streamtasks' own topics (the control topic)"
            )
        if queue.endswith((".dlq", ".delayer")) or ".delay." in queue:
            raise ConfigError(
                f"queue name {queue!r} is reserved: '.dlq', '.delayer' and '.delay.' name "
                "the dead letters, forwarder group and delay tiers of another queue"
            )
        longest = max((self.tier_topic(queue, t) for t in self.tiers), key=len,
                      default=self.dlq_topic(queue))
        longest = max(longest, self.dlq_topic(queue), key=len)
        if len(longest) > 249:
            room = len(queue) - (len(longest) - 249)
            raise ConfigError(
                f"queue name {queue[:40]!r}... is {len(queue)} characters: its topic "
                f"{longest[:60]!r}... would pass Kafka's 249; use at most {room}"
            )

    def topic_config(self) -> dict[str, str]:
        """Return the configs every topic of a queue is created with.

        ``min.insync.replicas`` is added when a topic is created, once its replication
        factor is known (:meth:`~streamtasks.broker.base.TopicSpec.on_cluster`).
        """
        return {
            "max.message.bytes": str(self.max_message_bytes + TOPIC_OVERHEAD_BYTES),
            "retention.ms": str(self.retention_ms),
        }

    def topic_specs(self, queue: str, partitions: int | None = None) -> list[TopicSpec]:
        """Return the topics ``queue`` needs: task topic, dead letters, delay tiers.

        Every one has the same partition count (a forwarded or dead-lettered record keeps
        its partition number), ``partitions`` or the configured one.

        Raises:
            ConfigError: ``min_insync_replicas`` is above ``replication_factor``.
        """
        check_min_insync_replicas(self.replication_factor, self.min_insync_replicas)
        self.check_queue(queue)
        count = partitions or self.partitions
        return [
            TopicSpec(name, count, self.replication_factor, self.topic_config(),
                      self.min_insync_replicas)
            for name in self.topics(queue)
        ]


@functools.lru_cache(maxsize=64)
def _topology(namespace: str, delay_tiers: str, partitions: int, replication_factor: int,
              min_insync_replicas: int, retention_ms: int, max_message_bytes: int) -> Topology:
    """Return the topology of these values, built once per distinct values.

    Building one cost ~2 us, and every send names its topic through it; a Topology is
    frozen, so one instance serves every caller.
    """
    return Topology(namespace=namespace, tiers=parse_tiers(delay_tiers), partitions=partitions,
                    replication_factor=replication_factor,
                    min_insync_replicas=min_insync_replicas, retention_ms=retention_ms,
                    max_message_bytes=max_message_bytes)
