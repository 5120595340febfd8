"""``streamtasks inspect``: per queue, who consumes it and how much waits where.

For each queue: the worker group ``{ns}.{queue}`` (state, members: client id, host,
partitions), its lag per partition (high watermark minus committed offset), the depth
of each delay tier (records its forwarder group ``{ns}.{queue}.delayer`` has not
forwarded yet), the dead-letter depth (high minus low watermark of ``{ns}.{queue}.dlq``)
and the total waiting (lag plus delay-tier depth). Records in flight inside a worker are
not visible from outside: they count as lag until committed (the worker's own
``streamtasks_tasks_in_flight`` metric shows them).

Offsets and watermarks are read through the :class:`~streamtasks.broker.base.Broker`
seam; only group members need Kafka's admin API (:func:`describe_groups`), whose client
is built from the broker URL like the broker's own (SASL / TLS options pass through).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from streamtasks.broker.base import Broker, TopicPartition
from streamtasks.broker.kafka import librdkafka_logger
from streamtasks.errors import BrokerError
from streamtasks.settings import Settings, parse_url

if TYPE_CHECKING:
    from streamtasks.app import App

log = structlog.get_logger("streamtasks.inspect")

#: Timeout of an admin request (group descriptions, topic listing).
ADMIN_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Member:
    """One member of a consumer group."""

    client_id: str
    host: str
    member_id: str
    #: The partitions it owns: topic -> partition numbers.
    partitions: dict[str, list[int]] = field(default_factory=dict)


@dataclass(slots=True)
class GroupInfo:
    """A consumer group's state and members (``members`` None: the broker cannot tell)."""

    group: str
    state: str
    members: list[Member] | None
    count: int = 0


@dataclass(slots=True)
class PartitionLag:
    """A group's position on one partition."""

    partition: int
    committed: int | None
    high: int
    lag: int


@dataclass(slots=True)
class QueueReport:
    """What ``streamtasks inspect`` shows of one queue."""

    queue: str
    group: GroupInfo
    lag: list[PartitionLag]
    forwarder: GroupInfo
    delay: dict[str, int]
    dlq: int
    missing_topics: list[str] = field(default_factory=list)

    @property
    def lag_total(self) -> int:
        """Records of the queue's topic not yet committed by its worker group."""
        return sum(p.lag for p in self.lag)

    @property
    def delay_total(self) -> int:
        """Records waiting in the delay tiers."""
        return sum(self.delay.values())

    @property
    def total(self) -> int:
        """Records still to run: lag plus delay-tier depth (dead letters not counted)."""
        return self.lag_total + self.delay_total

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-able data."""
        return {
            "queue": self.queue,
            "group": asdict(self.group),
            "lag": {"total": self.lag_total, "partitions": [asdict(p) for p in self.lag]},
            "delay": {"group": asdict(self.forwarder), "total": self.delay_total,
                      "tiers": self.delay},
            "dlq": self.dlq,
            "total": self.total,
            "missing_topics": self.missing_topics,
        }


def inspect_queues(app: App, queues: Sequence[str]) -> list[QueueReport]:
    """Report on each of ``queues``: group members, lag, delay-tier and DLQ depth.

    Raises:
        BrokerError: the broker did not answer.
    """
    settings, broker = app.settings, app.broker
    groups = [g for q in queues for g in (settings.group_id(q), settings.delayer_group_id(q))]
    described = describe_groups(settings, broker, groups)
    reports = []
    for queue in queues:
        missing: list[str] = []
        group, forwarder = settings.group_id(queue), settings.delayer_group_id(queue)
        lag = _lag(broker, group, settings.topic(queue), missing)
        tier_lag = {tier.name: sum(p.lag for p in _lag(broker, settings.delayer_group_id(queue),
                                                        settings.tier_topic(queue, tier),
                                                        missing))
                    for tier in settings.tiers()}
        reports.append(QueueReport(
            queue=queue, group=described[group], lag=lag, forwarder=described[forwarder],
            delay=tier_lag, dlq=_depth(broker, settings.dlq_topic(queue), missing),
            missing_topics=missing,
        ))
    return reports


def _partitions(broker: Broker, topic: str, missing: list[str]) -> list[TopicPartition]:
    if not broker.topic_exists(topic):
        missing.append(topic)
        return []
    return [TopicPartition(topic, p) for p in range(broker.partition_count(topic))]


def _lag(broker: Broker, group: str, topic: str, missing: list[str]) -> list[PartitionLag]:
    parts = _partitions(broker, topic, missing)
    if not parts:
        return []
    committed = broker.group_offsets(group)
    found = []
    for tp in parts:
        low, high = broker.watermarks(tp)
        offset = committed.get(tp)
        # Nothing committed (or below the records kept): the group starts at the low mark.
        position = low if offset is None else max(offset, low)
        found.append(PartitionLag(tp.partition, offset, high, max(0, high - position)))
    return found


def lag_of_group(broker: Broker, group: str, topic: str) -> list[PartitionLag]:
    """Return ``group``'s lag per partition of ``topic`` (empty when the topic is missing).

    Raises:
        BrokerError: the broker did not answer.
    """
    return _lag(broker, group, topic, [])


def _depth(broker: Broker, topic: str, missing: list[str]) -> int:
    total = 0
    for tp in _partitions(broker, topic, missing):
        low, high = broker.watermarks(tp)
        total += high - low
    return total


# -- what only Kafka's admin API tells ---------------------------------------------------


def kafka_admin_config(settings: Settings) -> dict[str, Any]:
    """Return an admin client configuration for the broker URL of ``settings``.

    The URL's options (``security.protocol``, ``sasl.*``, ``ssl.*``) pass through as the
    broker's own clients take them.

    Raises:
        ConfigError: the broker URL is malformed.
    """
    parsed = parse_url(settings.broker, "broker")
    return {
        "bootstrap.servers": ",".join(f"{h}:{p}" for h, p in parsed.hosts),
        "client.id": "streamtasks-inspect",
        # librdkafka's lines go to logging, not stderr (an unreachable broker is the
        # BrokerError of the request that times out).
        "logger": librdkafka_logger(),
        "error_cb": lambda err: log.debug("kafka client error", error=str(err)),
        **parsed.options,
    }


def describe_groups(settings: Settings, broker: Broker, groups: Sequence[str]) -> dict[
        str, GroupInfo]:
    """Return the state and members of each group.

    On Kafka, through the admin API (DescribeConsumerGroups); on another broker, the
    member count only.

    Raises:
        BrokerError: the broker did not answer.
    """
    if parse_url(settings.broker, "broker").scheme != "kafka":
        return {g: _counted(g, broker.group_member_count(g)) for g in groups}
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_admin_config(settings))
    try:
        futures = admin.describe_consumer_groups(list(groups), request_timeout=ADMIN_TIMEOUT_S)
    except KafkaException as err:
        raise BrokerError(f"cannot describe consumer groups: {err}") from err
    found = {}
    for group, future in futures.items():
        try:
            description = future.result(timeout=ADMIN_TIMEOUT_S * 3)
        except (KafkaException, TimeoutError) as err:
            raise BrokerError(f"cannot describe consumer group {group!r}: {err!r}") from err
        found[group] = _described(group, description)
    return found


def _counted(group: str, count: int) -> GroupInfo:
    return GroupInfo(group, "Stable" if count else "Empty", None, count)


def _described(group: str, description: Any) -> GroupInfo:
    members = []
    for m in description.members or []:
        owned: dict[str, list[int]] = {}
        for tp in getattr(m.assignment, "topic_partitions", None) or []:
            owned.setdefault(tp.topic, []).append(tp.partition)
        members.append(Member(m.client_id, m.host, m.member_id,
                              {t: sorted(ps) for t, ps in sorted(owned.items())}))
    state = getattr(description.state, "name", str(description.state))
    return GroupInfo(group, state.title(), members, len(members))


def list_queues(settings: Settings) -> list[str]:
    """Return the queues of the namespace that have a topic on Kafka.

    A topic ``{ns}.{q}`` is a queue unless it is the dead-letter or a delay-tier topic
    of another queue found.

    Raises:
        BrokerError: Kafka did not answer, or the broker is not Kafka.
    """
    if parse_url(settings.broker, "broker").scheme != "kafka":
        raise BrokerError("queues can be listed only on Kafka; name them with --queues")
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_admin_config(settings))
    try:
        topics = set(admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics)
    except KafkaException as err:
        raise BrokerError(f"cannot list topics: {err}") from err
    return queues_of_topics(settings, topics)


def queues_of_topics(settings: Settings, topics: Iterable[str]) -> list[str]:
    """Return the queues whose topics are among ``topics`` (see :func:`list_queues`)."""
    prefix = settings.namespace + "."
    names = {t[len(prefix):] for t in topics if t.startswith(prefix)}
    derived: set[str] = set()
    for q in names:
        derived.add(f"{q}.dlq")
        derived.update(f"{q}.delay.{tier.name}" for tier in settings.tiers())
    # names beginning with "_" are streamtasks' own topics (the control topic), not queues
    return sorted(q for q in names - derived if not q.startswith("_"))
