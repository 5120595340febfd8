"""Brokers: the :class:`Broker` seam, the Kafka broker and the in-memory one."""

from __future__ import annotations

from streamtasks.broker.base import (
    Broker,
    Consumer,
    DeliveryCallback,
    RebalanceListener,
    Record,
    TopicPartition,
    TopicSpec,
)
from streamtasks.broker.memory import MemoryBroker, MemoryConsumer
from streamtasks.errors import ConfigError
from streamtasks.settings import Settings, parse_url, safe_url

__all__ = [
    "Broker",
    "Consumer",
    "DeliveryCallback",
    "MemoryBroker",
    "MemoryConsumer",
    "RebalanceListener",
    "Record",
    "TopicPartition",
    "TopicSpec",
    "broker_from_url",
]


def broker_from_url(url: str, settings: Settings) -> Broker:
    """Return the broker a URL names: ``kafka://host:9092[,...][?option=value]`` or ``memory://``.

    The Kafka client is imported only when a ``kafka://`` URL asks for it.

    Raises:
        ConfigError: the URL is malformed or names another scheme.

    """
    scheme = parse_url(url, "broker").scheme
    if scheme == "memory":
        return MemoryBroker(settings)
    if scheme == "kafka":
        from streamtasks.broker.kafka import KafkaBroker

        return KafkaBroker(url, settings)
    raise ConfigError(f"broker URL {safe_url(url)!r}: use kafka://host:9092 or memory://, not {scheme}://")
