"""A Kafka message becomes a Record: its headers as bytes, its topic partition built once."""

from __future__ import annotations

from streamtasks.broker.base import TopicPartition
from streamtasks.broker.kafka import _headers


def test_headers_come_as_a_dict_of_bytes_and_a_header_without_value_is_empty() -> None:
    raw = [("st-id", b"abc"), ("traceparent", None), ("st-name", b"x")]
    assert _headers(raw) == {"st-id": b"abc", "traceparent": b"", "st-name": b"x"}
    assert _headers([("st-id", b"abc")]) == {"st-id": b"abc"}
    assert _headers(None) == {} and _headers([]) == {}


def test_a_repeated_header_keeps_its_last_value() -> None:
    assert _headers([("k", b"1"), ("k", b"2")]) == {"k": b"2"}


def test_topic_partitions_are_equal_hashable_and_ordered_by_topic_then_partition() -> None:
    a, b = TopicPartition("q", 1), TopicPartition(topic="q", partition=1)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert sorted([TopicPartition("r", 0), TopicPartition("q", 2), a]) == [
        a, TopicPartition("q", 2), TopicPartition("r", 0)]
    assert (a.topic, a.partition) == ("q", 1)
