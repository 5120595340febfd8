"""The delay-tier forwarder on the memory broker: nothing early, nothing lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from streamtasks import App, Settings
from streamtasks.broker.base import Record, TopicPartition, TopicSpec
from streamtasks.broker.memory import MemoryBroker
from streamtasks.delays import DelayTier, next_hop
from streamtasks.headers import ETA_MS, TASK_ID
from streamtasks.message import now_ms
from streamtasks.worker.delayer import DelayForwarder

QUEUE = "default"
#: Lateness allowed beyond the due time: one smallest tier plus scheduling noise.
SLACK_MS = 600


@pytest.fixture
def app() -> Iterator[App]:
    settings = Settings(broker="memory://", backend="memory://", partitions=3,
                        commit_interval_s=0.0, delay_tiers="100ms,300ms")
    application = App("t", settings=settings)
    application.ensure_queue(QUEUE)
    # Tier topics, in case ensure_queue does not create them (yet).
    application.broker.create_topics(
        [TopicSpec(settings.tier_topic(QUEUE, t), 3) for t in settings.tiers()]
    )
    yield application
    application.close()


@pytest.fixture
def broker(app: App) -> MemoryBroker:
    assert isinstance(app.broker, MemoryBroker)
    return app.broker


@pytest.fixture
def forwarder(app: App) -> Iterator[DelayForwarder]:
    fwd = DelayForwarder(app, [QUEUE])
    fwd.start()
    yield fwd
    fwd.close()


def tier(app: App, name: str) -> DelayTier:
    return next(t for t in app.settings.tiers() if t.name == name)


def put(
    app: App,
    tier_name: str,
    eta_ms: int | None,
    *,
    partition: int = 0,
    key: bytes = b"key",
    value: bytes = b"\x00value",
    headers: dict[str, bytes] | None = None,
) -> Record:
    """Write one record to a tier topic; return it as stored (with its timestamp)."""
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    topic = app.settings.tier_topic(QUEUE, tier(app, tier_name))
    all_headers = dict(headers or {})
    if eta_ms is not None:
        all_headers[ETA_MS] = str(eta_ms).encode()
    broker.send(topic, value, key=key, headers=all_headers, partition=partition)
    return [r for r in broker.records(topic) if r.partition == partition][-1]


def queue_records(app: App) -> list[Record]:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker.records(app.settings.topic(QUEUE))


def run_until(
    forwarders: list[DelayForwarder], done: Callable[[], bool], timeout_s: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        for fwd in forwarders:
            fwd.step(0.01)


def assert_on_time(out: Record, due_ms: int) -> None:
    assert out.timestamp_ms >= due_ms, f"forwarded {due_ms - out.timestamp_ms} ms early"
    assert out.timestamp_ms <= due_ms + SLACK_MS, f"{out.timestamp_ms - due_ms} ms late"


def test_due_record_comes_out_on_the_queue_topic_unchanged(
    app: App, forwarder: DelayForwarder
) -> None:
    eta = now_ms() + 100
    headers = {TASK_ID: b"task-1", "traceparent": b"00-abc-def-01"}
    src = put(app, "100ms", eta, partition=2, key=b"k-1", value=b"\xff\x00bytes", headers=headers)

    run_until([forwarder], lambda: bool(queue_records(app)))

    [out] = queue_records(app)
    assert_on_time(out, max(eta, src.timestamp_ms + 100))
    assert (out.partition, out.key, out.value) == (2, b"k-1", b"\xff\x00bytes")
    assert out.headers == src.headers
    run_until([forwarder], forwarder.idle)


def test_a_wait_longer_than_the_largest_tier_goes_round_again(
    app: App, broker: MemoryBroker, forwarder: DelayForwarder
) -> None:
    tiers = app.settings.tiers()
    eta = now_ms() + 700
    first = next_hop(tiers, eta - now_ms())
    assert first is not None and first.name == "300ms"
    put(app, first.name, eta, partition=1)

    run_until([forwarder], lambda: bool(queue_records(app)))

    [out] = queue_records(app)
    assert_on_time(out, eta)
    hops = [r for t in tiers for r in broker.records(app.settings.tier_topic(QUEUE, t))]
    # the original plus at least one more round in the largest tier
    assert len(broker.records(app.settings.tier_topic(QUEUE, first))) >= 2
    assert {r.partition for r in [*hops, out]} == {1}
    assert forwarder.stats["to_tier"] >= 1 and forwarder.stats["to_queue"] == 1


def test_an_eta_already_past_comes_out_after_one_tier(
    app: App, broker: MemoryBroker, forwarder: DelayForwarder
) -> None:
    src = put(app, "100ms", now_ms() - 5_000)

    run_until([forwarder], lambda: bool(queue_records(app)))

    [out] = queue_records(app)
    assert_on_time(out, src.timestamp_ms + 100)
    assert forwarder.stats["to_tier"] == 0
    assert len(broker.records(src.topic)) == 1


@pytest.mark.parametrize("header", [None, b"soon", b"\xff\xfe"])
def test_a_missing_or_garbled_eta_is_due_when_its_tier_is(
    app: App, forwarder: DelayForwarder, header: bytes | None
) -> None:
    headers = {} if header is None else {ETA_MS: header}
    src = put(app, "300ms", None, headers=headers)

    run_until([forwarder], lambda: bool(queue_records(app)))

    [out] = queue_records(app)
    assert_on_time(out, src.timestamp_ms + 300)
    assert out.headers == headers


def test_records_of_one_partition_come_out_in_order(
    app: App, forwarder: DelayForwarder
) -> None:
    sources = [put(app, "100ms", now_ms(), value=str(i).encode()) for i in range(50)]

    run_until([forwarder], lambda: len(queue_records(app)) == 50)

    out = queue_records(app)
    assert [r.value for r in out] == [r.value for r in sources]
    for src, fwd in zip(sources, out, strict=True):
        assert fwd.timestamp_ms >= src.timestamp_ms + 100


def test_a_paused_partition_does_not_block_a_due_one(
    app: App, forwarder: DelayForwarder
) -> None:
    # Given b waiting on partition 1, then a written 200 ms later on partition 0
    b = put(app, "300ms", now_ms(), partition=1, value=b"b")
    forwarder.step(0.0)
    time.sleep(0.2)
    a = put(app, "300ms", now_ms(), partition=0, value=b"a")
    a_due = a.timestamp_ms + 300

    # When b falls due while a still waits
    run_until([forwarder], lambda: bool(queue_records(app)))

    # Then b is out before a is due, and a comes out only when due
    [out_b] = queue_records(app)
    assert out_b.value == b"b" and out_b.partition == 1
    assert_on_time(out_b, b.timestamp_ms + 300)
    assert out_b.timestamp_ms < a_due
    run_until([forwarder], lambda: len(queue_records(app)) == 2)
    out_a = queue_records(app)[0]  # records() lists partition 0 first
    assert out_a.value == b"a"
    assert_on_time(out_a, a_due)


def test_a_failed_forward_is_retried_and_not_committed_past(
    app: App, broker: MemoryBroker, forwarder: DelayForwarder
) -> None:
    past = now_ms() - 1_000
    first = put(app, "100ms", past, value=b"first")
    put(app, "100ms", past, value=b"second")
    tp = TopicPartition(first.topic, 0)
    broker.fail_next_sends(1)

    # When the first forward fails and the second succeeds
    run_until([forwarder], lambda: bool(queue_records(app)))

    # Then nothing is committed: offset 0 is not forwarded yet
    assert [r.value for r in queue_records(app)] == [b"second"]
    forwarder.step(0.0)
    assert forwarder.consumer.committed([tp])[tp] is None
    assert forwarder.unconfirmed == 1

    # And the retry forwards it; then both offsets are committed
    run_until([forwarder], forwarder.idle)
    assert sorted(r.value for r in queue_records(app)) == [b"first", b"second"]
    assert forwarder.consumer.committed([tp])[tp] == 2


def test_a_rebalance_neither_loses_nor_repeats_a_record(app: App) -> None:
    # Given records waiting in every partition of both tiers and a forwarder owning all
    first = DelayForwarder(app, [QUEUE])
    first.start()
    eta = now_ms() + 150
    sources = [put(app, t, eta, partition=p, value=f"{t}/{p}".encode())
               for t in ("100ms", "300ms") for p in range(3)]
    first.step(0.0)
    assert len(first.assigned) == 6

    # When a second member joins and takes half of the partitions
    second = DelayForwarder(app, [QUEUE])
    second.start()
    try:
        run_until([first, second], lambda: first.idle() and second.idle())
        owned = (first.assigned, second.assigned)
    finally:
        second.close()
        first.close()

    # Then each record came out exactly once, not early
    out = {r.value: r for r in queue_records(app)}
    assert len(queue_records(app)) == len(sources) == len(out)
    for src in sources:
        assert src.value is not None
        tier_ms = 100 if src.value.startswith(b"100ms") else 300
        assert_on_time(out[src.value], max(eta, src.timestamp_ms + tier_ms))
    assert owned[0] and owned[1] and not owned[0] & owned[1]


def test_run_stops_commits_and_a_new_forwarder_continues(app: App) -> None:
    # Given one record already due and one waiting, forwarded by run() in a thread
    done = put(app, "100ms", now_ms() - 1_000, partition=0, value=b"done")
    put(app, "300ms", now_ms() + 5_000, partition=1, value=b"waiting")
    fwd = DelayForwarder(app, [QUEUE])
    stop = threading.Event()
    thread = threading.Thread(target=fwd.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 5
    while not queue_records(app):
        assert time.monotonic() < deadline
        time.sleep(0.01)

    # When it is stopped
    stop.set()
    thread.join(5)
    assert not thread.is_alive()

    # Then the forwarded offset is committed and the waiting record is still waiting
    tp = TopicPartition(done.topic, 0)
    again = DelayForwarder(app, [QUEUE])
    again.start()
    try:
        again.step(0.0)
        assert again.consumer.committed([tp])[tp] == 1
        assert [r.value for r in queue_records(app)] == [b"done"]
    finally:
        again.close()


def test_idle_is_false_while_a_record_waits(app: App, forwarder: DelayForwarder) -> None:
    forwarder.step(0.0)
    assert forwarder.idle()
    put(app, "300ms", now_ms() + 300)
    forwarder.step(0.0)
    assert not forwarder.idle()
    run_until([forwarder], forwarder.idle)
    assert len(queue_records(app)) == 1


def test_needs_a_queue(app: App) -> None:
    from streamtasks.errors import ConfigError

    with pytest.raises(ConfigError):
        DelayForwarder(app, [])
