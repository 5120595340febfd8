"""The broker contract on the real Kafka (STREAMTASKS_BROKER, default kafka://127.0.0.1:9092).

These tests fail, never skip, when Kafka cannot be reached.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import confluent_kafka as ck
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource

from streamtasks.broker import broker_from_url
from streamtasks.broker.base import Broker, TopicPartition, TopicSpec
from streamtasks.broker.kafka import KafkaBroker, redact
from streamtasks.errors import BrokerError
from streamtasks.settings import Settings
from tests.contracts.broker_contract import BrokerContract

pytestmark = pytest.mark.integration

BROKER_URL = os.environ.get("STREAMTASKS_BROKER") or "kafka://127.0.0.1:9092"


@pytest.fixture(scope="module", autouse=True)
def kafka_reachable() -> None:
    broker = KafkaBroker(BROKER_URL, Settings())
    try:
        broker.partition_count(f"reachability.{uuid.uuid4().hex}")
    except BrokerError as err:
        if "does not exist" not in str(err):
            pytest.fail(f"Kafka at {BROKER_URL} is not reachable: {err}")
    finally:
        broker.close()


class TestKafkaBroker(BrokerContract):
    timeout_s = 45.0

    def make_broker(self, settings: Settings) -> Broker:
        return broker_from_url(BROKER_URL, settings)

    def topic_name(self) -> str:
        return f"it.broker.{uuid.uuid4().hex[:12]}"

    def test_records_larger_than_a_fetch_come_whole_between_small_ones(self) -> None:
        # Given a limit four times a consumer's whole fetch (1 MiB) and three partitions,
        # each holding small records on both sides of a record at that limit
        limit = 4 * 1024 * 1024
        broker = self.make_broker(Settings(max_message_bytes=limit))
        self._members = []
        try:
            topic = self.new_topic(broker, 3, {"max.message.bytes": str(2 * limit)})
            sent = {p: [os.urandom(200) for _ in range(2_000)] + [os.urandom(limit)]
                    + [os.urandom(200) for _ in range(2_000)] for p in range(3)}
            self.send_all(broker, topic, [{"value": v, "partition": p}
                                          for p, values in sent.items() for v in values])
            # When one group member reads them all
            member = self.join(broker, self.group(), [topic])
            self.poll_until([member], lambda: len(member.records) >= 3 * 4_001,
                            "12,003 records")
            # Then every record comes once, in its partition's order, the large ones whole
            for p, values in sent.items():
                got = [r for r in member.records if r.partition == p]
                assert [r.offset for r in got] == list(range(4_001))
                assert [r.value for r in got] == values
        finally:
            for m in self._members:
                m.consumer.close()
            broker.close()

    def test_prefetch_is_bounded_whatever_the_backlog(self, broker: Broker) -> None:
        # Given a backlog of 60,000 records (incompressible, 100 bytes) on 6 partitions,
        # sent in batches as small as a stream of tasks makes them
        topic = self.new_topic(broker, 6)
        sender = KafkaBroker(BROKER_URL + "?batch.size=16384", Settings())
        try:
            self.send_all(sender, topic, [{"value": os.urandom(100), "partition": i % 6}
                                          for i in range(60_000)])
        finally:
            sender.close()
        # When a consumer with the worker's configuration reads them slowly (~10,000 a
        # second), librdkafka's statistics reporting its queue every 100 ms
        assert isinstance(broker, KafkaBroker)
        queued: list[int] = []

        def stats(text: str) -> None:
            partitions = json.loads(text)["topics"].get(topic, {}).get("partitions", {})
            # every partition reports the consumer's one queue, which they all feed
            queued.append(max((p["fetchq_cnt"] for p in partitions.values()), default=0))

        config = {**broker.consumer_config(self.group()), "statistics.interval.ms": 100,
                  "stats_cb": stats}
        consumer = ck.Consumer(config)
        try:
            consumer.subscribe([topic])
            taken = 0
            deadline = time.monotonic() + self.timeout_s
            while taken < 60_000 and time.monotonic() < deadline:
                taken += len(consumer.consume(200, 0.5))
                time.sleep(0.02)
            assert taken == 60_000
            # Then librdkafka held a few thousand records at a time, never the backlog: a
            # fetch is at most 64 KiB a partition (~2,300 of these records from 6
            # partitions), the next one only when fewer than 2,000 wait
            assert len(queued) >= 10, "too few statistics came"
            assert 0 < max(queued) <= 8_000, queued
        finally:
            consumer.close()

@pytest.fixture
def kafka() -> Iterator[KafkaBroker]:
    broker = KafkaBroker(BROKER_URL, Settings(max_message_bytes=1_000_000))
    yield broker
    broker.close()


def test_offsets_for_times(kafka: KafkaBroker) -> None:
    topic = f"it.broker.{uuid.uuid4().hex[:12]}"
    kafka.create_topics([TopicSpec(topic, 2)])
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    for _ in range(3):
        kafka.send(topic, b"old", partition=0)
    assert kafka.flush(30) == 0
    time.sleep(0.05)
    middle_ms = int(time.time() * 1000)
    time.sleep(0.05)
    kafka.send(topic, b"new", partition=0)
    assert kafka.flush(30) == 0

    assert kafka.offsets_for_times(topic, 0) == {tp0: 0, tp1: 0}
    assert kafka.offsets_for_times(topic, middle_ms) == {tp0: 3, tp1: 0}
    assert kafka.offsets_for_times(topic, middle_ms + 3_600_000) == {tp0: 4, tp1: 0}
    assert kafka.watermarks(tp0) == (0, 4)


def test_url_options_reach_the_clients_and_secrets_are_redacted() -> None:
    url = BROKER_URL + "?client.rack=r1&sasl.password=hunter2&ssl.key.password=k"
    broker = KafkaBroker(url, Settings())
    config = broker.consumer_config("g")
    assert config["client.rack"] == "r1"
    assert config["sasl.password"] == "hunter2"
    assert config["enable.auto.commit"] is False
    assert broker.producer_config()["enable.idempotence"] is True
    shown = redact(config)
    assert shown["sasl.password"] == "***"
    assert shown["ssl.key.password"] == "***"
    assert "hunter2" not in repr(shown)


def test_url_cannot_turn_off_the_delivery_guarantees() -> None:
    url = BROKER_URL + "?enable.auto.commit=true&acks=1&partition.assignment.strategy=range"
    broker = KafkaBroker(url, Settings())
    assert broker.consumer_config("g")["enable.auto.commit"] is False
    assert broker.consumer_config("g")["partition.assignment.strategy"] == "cooperative-sticky"
    assert broker.producer_config()["acks"] == "all"


def test_delivery_failure_is_reported_to_the_callback(kafka: KafkaBroker) -> None:
    topic = f"it.broker.{uuid.uuid4().hex[:12]}"
    kafka.create_topics([TopicSpec(topic, 1)])
    reports: list[str | None] = []
    try:
        kafka.send(topic, b"v", partition=9, on_delivery=reports.append)
    except BrokerError:
        reports.append("refused at once")  # when the producer already knew the topic
    assert kafka.flush(30) == 0
    assert len(reports) == 1 and reports[0] is not None
    # A record larger than the topic allows is refused by Kafka, reported, not lost silently.
    small = f"it.broker.{uuid.uuid4().hex[:12]}"
    kafka.create_topics([TopicSpec(small, 1, 1, {"max.message.bytes": "2000"})])
    reports.clear()
    kafka.send(small, os.urandom(50_000), on_delivery=reports.append)
    assert kafka.flush(30) == 0
    assert len(reports) == 1 and reports[0] is not None


def test_a_queues_topics_are_created_with_the_topology_configs() -> None:
    settings = Settings(broker=BROKER_URL, namespace=f"it-topo-{uuid.uuid4().hex[:8]}",
                        partitions=2, retention_ms=3_600_000, max_message_bytes=1_000_000)
    broker = KafkaBroker(BROKER_URL, settings)
    specs = settings.topology.topic_specs("q")
    try:
        assert sorted(broker.create_topics(specs)) == sorted(s.name for s in specs)
        admin = AdminClient({"bootstrap.servers": BROKER_URL.split("://", 1)[1]})
        resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
        for resource, future in admin.describe_configs(resources).items():
            entries = future.result(timeout=30)
            # Set on the topic itself (not the broker default that happens to be the same).
            for name, value in (("min.insync.replicas", "1"), ("retention.ms", "3600000"),
                                ("max.message.bytes", str(1_000_000 + 64 * 1024))):
                entry = entries[name]
                assert entry.value == value, (resource.name, name)
                assert entry.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value, (resource, name)
            assert broker.partition_count(resource.name) == 2
    finally:
        broker.close()
