"""The broker contract on the in-memory broker, plus what only the memory broker has."""

from __future__ import annotations

import threading

import pytest

from streamtasks.broker import MemoryBroker, broker_from_url
from streamtasks.broker.base import Broker, TopicPartition
from streamtasks.errors import BrokerError, ConfigError
from streamtasks.settings import Settings
from tests.contracts.broker_contract import BrokerContract, Listener


class TestMemoryBroker(BrokerContract):
    timeout_s = 5.0

    def make_broker(self, settings: Settings) -> Broker:
        return MemoryBroker(settings)


def test_broker_from_url_picks_memory() -> None:
    assert isinstance(broker_from_url("memory://", Settings()), MemoryBroker)
    with pytest.raises(ConfigError):
        broker_from_url("redis://localhost", Settings())


def test_send_auto_creates_topic_with_settings_partitions() -> None:
    broker = MemoryBroker(Settings(partitions=5))
    broker.send("auto", b"v")
    assert broker.partition_count("auto") == 5
    assert MemoryBroker().default_partitions == 3


def test_keyless_records_go_round_robin() -> None:
    broker = MemoryBroker()
    for _ in range(6):
        broker.send("rr", b"v")
    assert [r.partition for r in broker.records("rr")] == [0, 0, 1, 1, 2, 2]


def test_unknown_partition_is_refused() -> None:
    broker = MemoryBroker()
    with pytest.raises(BrokerError, match="no partition 7"):
        broker.send("t", b"v", partition=7)


def test_simulated_delivery_failures_are_reported_and_not_stored() -> None:
    broker = MemoryBroker()
    reports: list[str | None] = []
    broker.fail_next_sends(2, "boom")
    for _ in range(3):
        broker.send("t", b"v", on_delivery=reports.append)
    assert reports == []  # served only by poll / flush
    assert broker.poll() == 3
    assert reports == ["boom", "boom", None]
    assert len(broker.records("t")) == 1


def test_poll_blocks_until_a_record_arrives() -> None:
    broker = MemoryBroker()
    broker.send("t", b"first", partition=0)
    consumer = broker.consumer("g", ["t"], Listener())
    assert len(consumer.poll(1.0, 10)) == 1
    timer = threading.Timer(0.2, lambda: broker.send("t", b"late", partition=1))
    timer.start()
    try:
        got = consumer.poll(5.0, 10)
    finally:
        timer.join()
    assert [r.value for r in got] == [b"late"]


def test_offsets_for_times_and_watermarks() -> None:
    broker = MemoryBroker()
    for _ in range(3):
        broker.send("t", b"v", partition=0)
    tp = TopicPartition("t", 0)
    assert broker.watermarks(tp) == (0, 3)
    assert broker.offsets_for_times("t", 0)[tp] == 0
    assert broker.offsets_for_times("t", 2**62)[tp] == 3


def test_seek_of_unassigned_partition_is_refused() -> None:
    broker = MemoryBroker()
    consumer = broker.consumer("g", ["t"], Listener())
    with pytest.raises(BrokerError):
        consumer.seek(TopicPartition("t", 0), 0)


def test_closed_consumer_refuses_poll() -> None:
    broker = MemoryBroker()
    consumer = broker.consumer("g", ["t"], Listener())
    consumer.close()
    with pytest.raises(BrokerError):
        consumer.poll(0, 1)
