"""Settings that cannot keep the delivery promise on the cluster a worker runs on.

"Nothing is lost" rests on replication: a confirmed task record is on ``min.insync.replicas``
brokers, a result row on a quorum of Cassandra replicas. :func:`check_durability` is a pure
function of the settings and what was seen of the clusters (:class:`ClusterView`): it
raises :class:`ConfigError` for a setting that loses work when one node fails, and returns
warnings for one that is weaker than the production defaults (``docs/operations.md``,
"Cluster"). :func:`check_worker_start` looks at the clusters and applies it when a worker
starts; a cluster that cannot be seen then is not checked (it may be down for a moment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from streamtasks.backend.base import Replication
from streamtasks.errors import ConfigError, StreamTasksError
from streamtasks.replicas import (
    AUTO,
    PRODUCTION_REPLICAS,
    auto_replicas,
    describe_factor,
    topic_replication,
)
from streamtasks.settings import Settings, parse_url

if TYPE_CHECKING:
    from streamtasks.backend.base import ResultBackend
    from streamtasks.broker.base import Broker

log = structlog.get_logger("streamtasks.durability")

@dataclass(frozen=True, slots=True)
class ClusterView:
    """What a worker saw of its clusters at start; None where it could not look.

    Attributes:
        brokers: Kafka brokers in the cluster metadata (live ones).
        store: how the result store replicates (nodes, keyspace, replication, levels).
        topic_replicas: the fewest replicas of any partition, per existing topic the
            worker consumes (a topic created earlier keeps the replication it got then).
    """

    brokers: int | None = None
    store: Replication | None = None
    topic_replicas: Mapping[str, int] = field(default_factory=dict)


def check_durability(settings: Settings, view: ClusterView) -> list[str]:
    """Refuse settings that lose work when a node of the cluster fails; warn about weak ones.

    Args:
        settings: the worker's settings (broker URL options, replication, consistency).
        view: what was seen of the clusters; unknown parts are not checked.

    Returns:
        Warnings, each naming the setting to change.

    Raises:
        ConfigError: naming the setting: a producer ``acks`` below ``all`` or idempotence
            turned off in the broker URL, topics with one replica on a cluster of several
            brokers, a keyspace with one replica on several nodes, or a consistency under
            which group joins miss each other's writes.

    """
    warnings = _check_producer(settings)
    if view.brokers is not None:
        warnings += _check_topics(settings, view.brokers)
        warnings += _check_existing_topics(settings, view.brokers, view.topic_replicas)
    if view.store is not None:
        warnings += _check_keyspace(view.store)
    return warnings


def _check_producer(settings: Settings) -> list[str]:
    options = parse_url(settings.broker, "broker").options
    acks = options.get("acks", options.get("request.required.acks"))
    if acks is not None and acks.strip().lower() not in ("all", "-1"):
        raise ConfigError(
            f"broker URL option acks={acks}: a record confirmed by fewer than the in-sync "
            "replicas is lost with the broker that had it; remove the option (the producer "
            "uses acks=all)"
        )
    idempotence = options.get("enable.idempotence")
    if idempotence is not None and idempotence.strip().lower() in ("false", "0", "no", "off"):
        raise ConfigError(
            "broker URL option enable.idempotence=false: a produce retried after a leader "
            "moved could write a task twice or out of order; remove the option"
        )
    return []


def _check_topics(settings: Settings, brokers: int) -> list[str]:
    configured = settings.replication_factor
    if brokers > 1 and configured == 1:
        raise ConfigError(
            f"setting replication_factor is 1 on a Kafka cluster of {brokers} brokers: the "
            "tasks of a partition are lost with its broker; set replication_factor="
            f"{min(brokers, PRODUCTION_REPLICAS)} or auto (STREAMTASKS_REPLICATION_FACTOR)"
        )
    # what a topic created now gets (auto: min(3, brokers), never above the brokers)
    replicas, insync = topic_replication(configured, settings.min_insync_replicas, brokers)
    factor = f"replication_factor={describe_factor(configured, brokers)}"
    warnings = []
    if replicas > brokers:
        warnings.append(
            f"setting {factor} but {brokers} broker(s) are up: new topics cannot be created "
            "until the others are back"
        )
    if brokers >= PRODUCTION_REPLICAS and replicas < PRODUCTION_REPLICAS:
        warnings.append(
            f"setting {factor} on {brokers} brokers: one broker down stops writes to its "
            f"partitions; production uses {PRODUCTION_REPLICAS} (or auto)"
        )
    if replicas >= 2 and insync < 2:
        warnings.append(
            f"setting min_insync_replicas={insync} with {factor}: a record confirmed by one "
            "broker is lost if that broker fails before the others copy it; use 2 (or 0, "
            "automatic, with 3 replicas)"
        )
    return warnings


def _check_existing_topics(settings: Settings, brokers: int,
                           topic_replicas: Mapping[str, int]) -> list[str]:
    configured = settings.replication_factor
    # auto: what the topic would get now, so one created while a broker was down is seen
    wanted = configured if configured != AUTO else auto_replicas(brokers)
    warnings = []
    for topic, replicas in sorted(topic_replicas.items()):
        if brokers > 1 and replicas == 1:
            raise ConfigError(
                f"topic {topic} has one replica on a Kafka cluster of {brokers} brokers (it "
                "was created so, whatever setting replication_factor says now): its tasks are"
                " lost with its broker; add replicas (kafka-reassign-partitions) or use a new "
                "namespace"
            )
        if replicas < wanted:
            warnings.append(
                f"topic {topic} has {replicas} replicas, fewer than setting "
                f"replication_factor={describe_factor(configured, brokers)} (it was created "
                "before, or while brokers were down; add replicas with "
                "kafka-reassign-partitions)"
            )
    return warnings


def _check_keyspace(store: Replication) -> list[str]:
    from streamtasks.backend.cassandra.consistency import check_group_consistency, replicas

    total = sum(replicas(store.replication).values())
    if store.nodes > 1 and total == 1:
        raise ConfigError(
            f"keyspace {store.keyspace} keeps one replica on a Cassandra cluster of "
            f"{store.nodes} nodes: results and chord joins are lost or stuck with "
            f"the node that holds them; replicate it {PRODUCTION_REPLICAS} times (ALTER "
            "KEYSPACE; `streamtasks migrate` gives a new keyspace that many when the backend"
            " URL option replication_factor is left out)"
        )
    # ONE and the like: a member's join may miss another's write, so the chord never fires
    return check_group_consistency(store.consistency, store.serial_consistency,
                                   store.replication, store.keyspace)


def observe(broker: Broker, backend: ResultBackend, topics: Sequence[str] = ()) -> ClusterView:
    """Look at the clusters: brokers, Cassandra nodes, keyspace and ``topics`` replication.

    A cluster that cannot be reached now is left unknown (None); a missing topic is left out.
    """
    replicas = {t: n for t in topics if (n := broker.topic_replicas(t)) is not None}
    return ClusterView(broker.cluster_size(), backend.replication(), replicas)


def check_worker_start(settings: Settings, broker: Broker, backend: ResultBackend,
                       topics: Sequence[str] = ()) -> None:
    """Apply :func:`check_durability` to what a starting worker sees; log the warnings.

    ``topics`` are those the worker consumes; the ones that exist are checked too.

    Raises:
        ConfigError: a setting that loses work on this cluster (the worker must not start).

    """
    try:
        view = observe(broker, backend, topics)
    except StreamTasksError as err:
        log.warning("cannot check durability settings now; starting anyway", error=str(err))
        view = ClusterView()
    for warning in check_durability(settings, view):
        log.warning("weak durability setting", detail=warning)
