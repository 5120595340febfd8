"""Smoke tests for the local services: Kafka and Cassandra answer, and keep data over a restart.

Run after `make up` (or `deploy/local/services.sh up`):
    python -m pytest integration/test_smoke_services.py -x -q
The restart parts stop and start the local JVMs through services.sh; they are skipped only
when STREAMTASKS_BROKER / STREAMTASKS_BACKEND point at an external cluster.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from integration._services import (
    SERVICES_SH,
    cassandra_backend,
    kafka_bootstrap,
    require_restartable,
    restart,
)

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "record",
    "name": "SmokeTask",
    "namespace": "streamtasks.smoke",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "seq", "type": "int"},
        {"name": "payload", "type": "bytes"},
    ],
}
N_RECORDS = 60
PARTITIONS = 3


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- Kafka


def _create_topic(topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    fut = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    fut[topic].result(timeout=30)
    # wait until the metadata shows all partitions with a leader
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=10).topics[topic]
        if (
            md.error is None
            and len(md.partitions) == PARTITIONS
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"topic {topic} has no leaders after 30s")


def _retry_while_coordinator_loads(call: Any, timeout_s: float = 60) -> Any:
    """Call ``call`` again while the group coordinator is still moving in after a restart."""
    from confluent_kafka import KafkaError, KafkaException

    transient = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                 KafkaError.COORDINATOR_NOT_AVAILABLE}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as err:
            if err.args[0].code() not in transient or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _committed(topic: str, group: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap(),
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    try:
        tps = _retry_while_coordinator_loads(
            lambda: consumer.committed(
                [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=60
            )
        )
        for tp in tps:
            assert tp.error is None, tp.error
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


@pytest.mark.timeout(300)
def test_kafka_avro_roundtrip_commit_survives_restart() -> None:
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
    from fastavro import parse_schema, schemaless_reader, schemaless_writer

    schema = parse_schema(SCHEMA)
    topic = _unique("streamtasks.smoke.")
    group = _unique("streamtasks.smoke.group.")
    _create_topic(topic)

    # produce Avro records, each partition gets some
    sent = {}
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap(), "enable.idempotence": True, "acks": "all"}
    )
    for i in range(N_RECORDS):
        rec = {"id": uuid.uuid4().hex, "seq": i, "payload": bytes([i % 256]) * (i * 100)}
        buf = io.BytesIO()
        schemaless_writer(buf, schema, rec)
        producer.produce(
            topic,
            key=rec["id"].encode(),
            value=buf.getvalue(),
            partition=i % PARTITIONS,
            on_delivery=on_delivery,
        )
        sent[rec["id"]] = rec
    assert producer.flush(30) == 0
    assert not errors, errors

    # consume with manual offset store + synchronous commit
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap(),
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    received = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < N_RECORDS and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            rec = schemaless_reader(io.BytesIO(msg.value()), schema, schema)
            assert msg.key() == rec["id"].encode()
            received[rec["id"]] = rec
            consumer.store_offsets(message=msg)
        assert received == sent, f"got {len(received)}/{N_RECORDS} records"
        consumer.commit(asynchronous=False)

        ends = {}
        for p in range(PARTITIONS):
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
        committed = {
            tp.partition: tp.offset
            for tp in consumer.committed(
                [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30
            )
        }
    finally:
        consumer.close()
    assert sum(ends.values()) == N_RECORDS
    assert committed == ends

    require_restartable("kafka")
    restart("kafka")
    assert _committed(topic, group) == ends


# --------------------------------------------------------------------------- Cassandra


def _session():  # type: ignore[no-untyped-def]
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy

    b = cassandra_backend()
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(), request_timeout=30)
    cluster = Cluster(
        [b.host],
        port=b.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=10,
    )
    return cluster, cluster.connect()


@pytest.mark.timeout(300)
def test_cassandra_roundtrip_survives_restart() -> None:
    keyspace = _unique("smoke_")
    table = f"{keyspace}.results"
    task_id = uuid.uuid4()
    payload = b"\x00\x01" * 50_000

    cluster, session = _session()
    try:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(f"CREATE TABLE {table} (task_id uuid PRIMARY KEY, state text, result blob)")
        insert = session.prepare(f"INSERT INTO {table} (task_id, state, result) VALUES (?, ?, ?)")
        session.execute(insert, (task_id, "SUCCESS", payload))
        select = session.prepare(f"SELECT state, result FROM {table} WHERE task_id = ?")
        row = session.execute(select, (task_id,)).one()
        assert row is not None and row.state == "SUCCESS" and row.result == payload
    finally:
        cluster.shutdown()

    require_restartable("cassandra")
    restart("cassandra")

    cluster, session = _session()
    try:
        select = session.prepare(f"SELECT state, result FROM {table} WHERE task_id = ?")
        row = session.execute(select, (task_id,)).one()
        assert row is not None, "row lost over a Cassandra restart"
        assert row.state == "SUCCESS" and row.result == payload
        session.execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()
    # services.sh starts the JVM with a 1 ms timer slack (CASSANDRA_TIMERSLACK_NS): its
    # idle request threads' timed wake-ups are batched instead of spinning a core away.
    pid = int((SERVICES_SH.parent / ".data" / "cassandra.pid").read_text())
    assert "-Dstreamtasks.service=cassandra@" in Path(f"/proc/{pid}/cmdline").read_text()
    assert Path(f"/proc/{pid}/timerslack_ns").read_text().strip() == "1000000"
