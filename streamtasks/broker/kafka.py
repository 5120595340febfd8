"""The Kafka broker, on confluent-kafka (librdkafka).

Every option of the broker URL's query string (``kafka://h:9092?security.protocol=SASL_SSL``)
goes straight into the librdkafka configuration of the producer, the consumers and the admin
client, so SASL and TLS need nothing more. Options that the delivery promise depends on
(idempotence, manual commits, cooperative rebalancing) cannot be overridden.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import confluent_kafka as ck
import structlog
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewPartitions, NewTopic

from streamtasks.broker.base import (
    Broker,
    Consumer,
    DeliveryCallback,
    RebalanceListener,
    Record,
    TopicPartition,
    TopicSpec,
)
from streamtasks.errors import BrokerError, MessageTooLargeError
from streamtasks.settings import Settings, parse_url

log = structlog.get_logger("streamtasks.broker")

#: Room above ``max_message_bytes`` for the key, headers and record framing.
RECORD_OVERHEAD_BYTES = 512 * 1024
#: How often ``send`` waits for room when the producer's local queue is full.
QUEUE_FULL_RETRIES = 50
#: Timeout of metadata, watermark and offset look-ups.
REQUEST_TIMEOUT_S = 10.0
#: How long ``create_topics`` waits for new topics to show in the metadata.
TOPIC_VISIBLE_TIMEOUT_S = 30.0
#: How long a first metadata request may take before the broker is called unreachable.
REACHABLE_TIMEOUT_S = 8.0
#: Records fetched per ``consume`` call of a range read.
READ_BATCH = 1000
#: How long ``delete_records`` waits for the brokers to confirm.
DELETE_TIMEOUT_S = 60.0

_SECRET_MARKERS = ("password", "secret", "sasl.jaas", "oauthbearer.config", "key.pem", "token")


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` with every secret-looking value replaced, for logs and errors.

    Args:
        config: a librdkafka configuration.

    Returns:
        A copy safe to log: passwords, keys and tokens read ``***``.

    """
    return {
        k: "***" if any(m in k.lower() for m in _SECRET_MARKERS) else v for k, v in config.items()
    }


def _ck_partitions(tps: Sequence[TopicPartition]) -> list[ck.TopicPartition]:
    return [ck.TopicPartition(tp.topic, tp.partition) for tp in tps]


def _our_partitions(tps: Sequence[ck.TopicPartition]) -> list[TopicPartition]:
    return sorted(TopicPartition(tp.topic, tp.partition) for tp in tps)


def _error_code(err: BaseException) -> int | None:
    if isinstance(err, ck.KafkaException) and err.args and isinstance(err.args[0], ck.KafkaError):
        code: int = err.args[0].code()
        return code
    return None


_TRANSIENT_CODES = frozenset(
    {
        ck.KafkaError.NOT_LEADER_FOR_PARTITION,
        ck.KafkaError.LEADER_NOT_AVAILABLE,
        ck.KafkaError.REQUEST_TIMED_OUT,
        ck.KafkaError._TRANSPORT,
        ck.KafkaError._TIMED_OUT,
    }
)


def _retriable(err: BaseException) -> bool:
    if isinstance(err, ck.KafkaException) and err.args and isinstance(err.args[0], ck.KafkaError):
        return bool(err.args[0].retriable()) or err.args[0].code() in _TRANSIENT_CODES
    return False


#: Client errors that say why a broker cannot be reached ("1/1 brokers are down" does not).
_CAUSE_CODES = frozenset(
    {
        ck.KafkaError._RESOLVE,
        ck.KafkaError._TRANSPORT,
        ck.KafkaError._AUTHENTICATION,
        ck.KafkaError._SSL,
    }
)
#: Errors of the reachability probe that mean no broker answered (any other: one did).
_UNREACHED_CODES = _CAUSE_CODES | {ck.KafkaError._TIMED_OUT, ck.KafkaError._ALL_BROKERS_DOWN}
_AFTER_STATE = re.compile(r" \(after \d+ms in state \w+\)$")


def _unreachable_hint(codes: set[int]) -> str:
    if ck.KafkaError._RESOLVE in codes:
        return "check the host name in the broker URL"
    if codes & {ck.KafkaError._AUTHENTICATION, ck.KafkaError._SSL}:
        return "check the SASL / TLS options of the broker URL"
    return "check that Kafka is running there and the host:port in the broker URL"


#: A consumer's prefetch: what librdkafka holds for the worker beyond its max_in_flight
#: records, ~1 KB of native memory a small task until the worker takes it. It is bounded
#: by records, whatever the backlog: a new fetch only when fewer than
#: ``_QUEUED_MIN_RECORDS`` wait (a fraction of a second of a busy worker's work), checked
#: every ``_QUEUE_BACKOFF_MS`` (librdkafka's 1 s default starves a worker whose queue
#: holds less than a second's work), each fetch at most ``_PARTITION_FETCH_BYTES`` a
#: partition and ``_FETCH_MAX_BYTES`` in all (librdkafka refuses less than its
#: ``message.max.bytes``, 1,000,000). A record larger than a fetch still comes whole:
#: Kafka returns the first batch of a fetch whatever its size, and
#: ``receive.message.max.bytes`` is set to hold the largest record allowed.
_QUEUED_MIN_RECORDS = 2_000
_QUEUE_BACKOFF_MS = 20
_PARTITION_FETCH_BYTES = 64 * 1024
_FETCH_MAX_BYTES = 1024 * 1024

#: librdkafka warnings that only say it waits for a broker still loading its state (the
#: group or transaction coordinator right after a broker starts): it retries by itself.
_TRANSIENT_NOTICES = ("load in progress",)


def _demote_transient(record: logging.LogRecord) -> bool:
    """A filter: log librdkafka's "…load in progress: retrying" warnings at INFO."""
    if record.levelno == logging.WARNING and any(
            notice in record.getMessage() for notice in _TRANSIENT_NOTICES):
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def librdkafka_logger() -> logging.Logger:
    """Return the stdlib logger librdkafka's lines go to (instead of stderr).

    Its transient "coordinator load in progress: retrying" warnings are INFO, so a
    program sending tasks right after Kafka started prints nothing for them (Python's
    last-resort handler shows only warnings and above).
    """
    logger = logging.getLogger("streamtasks.broker.librdkafka")
    if _demote_transient not in logger.filters:
        logger.addFilter(_demote_transient)
    return logger


def _log_client_error(err: ck.KafkaError) -> None:
    log.warning("kafka client error", error=err.str(), code=err.name(), fatal=err.fatal())


@contextlib.contextmanager
def _interrupt_between_calls() -> Iterator[list[int]]:
    """Within the block, SIGINT is noted (the list gets an item) instead of raised.

    Only in the main thread and when SIGINT has Python's default handler; elsewhere
    the block changes nothing (the list stays empty).
    """
    noted: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield noted
        return

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


_C = TypeVar("_C")

def _client(factory: Callable[[dict[str, Any]], _C], config: Mapping[str, Any]) -> _C:
    """``factory(config)`` with a Ctrl-C during it raised after it, as ``KeyboardInterrupt``.

    A SIGINT handled while confluent-kafka's C constructor walks the config turned into
    ``TypeError: expected configuration property name as type unicode string``.
    """
    with _interrupt_between_calls() as interrupted:
        client = factory(dict(config))
    if interrupted:
        raise KeyboardInterrupt
    return client


class KafkaBroker(Broker):
    """A broker on an Apache Kafka cluster.

    The producer is created on first use and shared by every thread; it is idempotent
    with ``acks=all``, so a confirmed record is durable and never duplicated by retries.

    Args:
        url: ``kafka://host:9092[,host2:9092][?librdkafka.option=value&...]``.
        settings: the app settings (``max_message_bytes`` is enforced on send).

    Raises:
        ConfigError: the URL is malformed.

    """

    def __init__(self, url: str, settings: Settings) -> None:
        parsed = parse_url(url, "broker")
        if parsed.scheme != "kafka":
            raise BrokerError(f"KafkaBroker needs a kafka:// URL, got scheme {parsed.scheme!r}")
        self.max_message_bytes = settings.max_message_bytes
        self._topology = settings.topology
        self._common: dict[str, Any] = {
            "bootstrap.servers": ",".join(f"{h}:{p}" for h, p in parsed.hosts),
            "client.id": "streamtasks",
            "error_cb": _log_client_error,
            # librdkafka's own log lines go to stdlib logging instead of stderr.
            "logger": librdkafka_logger(),
            **parsed.options,
        }
        if settings.broker_password is not None:  # kept out of the URL (and its logs)
            self._common["sasl.password"] = settings.broker_password.get_secret_value()
        self._lock = threading.Lock()
        self._reachable = False
        self._reach_lock = threading.Lock()
        self._producer: ck.Producer | None = None
        self._admin: AdminClient | None = None
        self._lookup: ck.Consumer | None = None
        log.debug("kafka broker configured", config=redact(self._common))

    # -- configuration -------------------------------------------------------------------

    @property
    def _limit_bytes(self) -> int:
        return self.max_message_bytes + RECORD_OVERHEAD_BYTES

    def producer_config(self) -> dict[str, Any]:
        """Return the librdkafka configuration of the producer (secrets included)."""
        return {
            "linger.ms": 1,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": self._limit_bytes,
            **self._common,
            # The delivery promise depends on these; the URL cannot turn them off.
            "enable.idempotence": True,
            "acks": "all",
        }

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        """Return the librdkafka configuration of a consumer of ``group_id``."""
        # Prefetch bounded by records, not by the backlog (see _QUEUED_MIN_RECORDS): with
        # fetches as large as the largest record (16.5 MiB by default) a worker draining a
        # 1,000,000 backlog held ~120,000 records at once and peaked at ~220 MiB against
        # ~95 at 10,000 (bench/backlog_rss.py; bench/README.md, seventh round).
        return {
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": 300_000,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
            "fetch.max.bytes": _FETCH_MAX_BYTES,
            "max.partition.fetch.bytes": _PARTITION_FETCH_BYTES,
            "queued.min.messages": _QUEUED_MIN_RECORDS,
            "queued.max.messages.kbytes": 32_768,
            "fetch.queue.backoff.ms": _QUEUE_BACKOFF_MS,
            # A response holding the largest record allowed must still be read.
            "receive.message.max.bytes": self._limit_bytes + _FETCH_MAX_BYTES,
            **self._common,
            "group.id": group_id,
            # Offsets move only when the worker says a record's effects are durable.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
        }

    # -- lazily created clients ----------------------------------------------------------

    def _get_producer(self) -> ck.Producer:
        producer = self._producer
        if producer is not None:  # every send: no lock once it exists
            return producer
        self.check_reachable()
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = _client(ck.Producer, self.producer_config())
                except ck.KafkaException as err:
                    raise BrokerError(f"cannot create the Kafka producer: {err}") from err
            return self._producer

    def _get_admin(self) -> AdminClient:
        if self._admin is None:
            self.check_reachable()
        with self._lock:
            if self._admin is None:
                # A metadata request for a missing topic must not create it (the local
                # broker has auto.create.topics.enable=true).
                self._admin = _client(
                    AdminClient, {**self._common, "allow.auto.create.topics": False})
            return self._admin

    def _get_lookup(self) -> ck.Consumer:
        """Return a consumer that never subscribes, for watermark and time look-ups."""
        if self._lookup is None:
            self.check_reachable()
        with self._lock:
            if self._lookup is None:
                config = self.consumer_config(self._topology.lookup_group_id())
                config["allow.auto.create.topics"] = False
                self._lookup = _client(ck.Consumer, config)
            return self._lookup

    # -- producing -----------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Queue one record for sending and return at once.

        ``on_delivery`` runs from :meth:`poll` or :meth:`flush` (also from a later
        ``send`` that waits for room in a full queue).

        Raises:
            MessageTooLargeError: the value exceeds :attr:`max_message_bytes`.
            BrokerError: the record could not be queued (queue full for too long, an
                unknown partition, a closed producer).

        """
        if len(value) > self.max_message_bytes:
            raise MessageTooLargeError(
                f"record for topic {topic!r} is {len(value)} bytes, over the limit of "
                f"{self.max_message_bytes} bytes (setting max_message_bytes); nothing was sent"
            )
        producer = self._get_producer()
        callback = _delivery_adapter(on_delivery)
        header_list = list(headers.items()) if headers else None
        for _ in range(QUEUE_FULL_RETRIES):
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    partition=-1 if partition is None else partition,
                    on_delivery=callback,
                    headers=header_list,  # type: ignore[arg-type]
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                producer.poll(0.1)
            except ck.KafkaException as err:
                if _error_code(err) == ck.KafkaError.MSG_SIZE_TOO_LARGE:
                    raise MessageTooLargeError(
                        f"record for topic {topic!r} is too large for the producer: {err}"
                    ) from err
                raise BrokerError(f"cannot queue a record for topic {topic!r}: {err}") from err
        raise BrokerError(
            f"the producer queue stayed full for {QUEUE_FULL_RETRIES * 0.1:.0f}s; "
            "Kafka is slow or unreachable (call flush() more often or check the brokers)"
        )

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery callbacks; return how many were served."""
        if self._producer is None:
            return 0
        return self._producer.poll(timeout_s)

    def flush(self, timeout_s: float) -> int:
        """Wait until every queued record is confirmed or failed; return how many remain.

        Ctrl-C ends the wait within 0.2 s with ``KeyboardInterrupt``: the wait is sliced
        (librdkafka's flush holds signals until it returns), and in the main thread
        SIGINT only sets a flag while a slice runs: raised inside one of the client's
        callbacks, it was lost and the flush failed with a ``SystemError``.
        """
        if self._producer is None:
            return 0
        deadline = time.monotonic() + timeout_s
        with _interrupt_between_calls() as interrupted:
            while True:
                left = deadline - time.monotonic()
                remaining = int(self._producer.flush(max(0.0, min(0.2, left))))
                if interrupted:
                    raise KeyboardInterrupt
                if remaining == 0 or left <= 0.2:
                    return remaining

    # -- consuming -----------------------------------------------------------------------

    def consumer(
        self, group_id: str, topics: Sequence[str], listener: RebalanceListener,
        *, eager: bool = False,
    ) -> KafkaConsumer:
        """Join ``group_id`` and subscribe to ``topics`` (the join completes in ``poll``).

        See :meth:`Broker.consumer` for ``eager``.

        Raises:
            BrokerError: no broker answered (first use of this broker object), or the
                consumer could not be created.
        """
        self.check_reachable()
        return KafkaConsumer(self.consumer_config(group_id), topics, listener, eager=eager)

    # -- topics and offsets --------------------------------------------------------------

    def create_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create the topics that do not exist yet; return the names created.

        An automatic replication factor is ``min(3, brokers)`` of the brokers that serve
        now (DescribeCluster): a topic created while a broker is down gets fewer
        replicas, which a worker start then warns about (:mod:`streamtasks.durability`).
        Waits until every topic of ``specs`` shows in the cluster metadata.

        Raises:
            ConfigError: ``min_insync_replicas`` is above the replication factor chosen.
            BrokerError: a topic could not be created or did not show in time.

        """
        if not specs:
            return []
        admin = self._get_admin()
        brokers = self.cluster_size() if any(s.automatic for s in specs) else 1
        specs = [s.on_cluster(brokers) for s in specs]
        new = [
            NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config))
            for s in specs
        ]
        try:
            futures = admin.create_topics(new, operation_timeout=30, request_timeout=30)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot create topics: {err}") from err
        created: list[str] = []
        for name, future in futures.items():
            try:
                future.result(timeout=60)
                created.append(name)
            except ck.KafkaException as err:
                if _error_code(err) != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"cannot create topic {name!r}: {err}") from err
        for spec in specs:
            self._wait_visible(spec.name)
        if created:
            log.info("topics created", topics=created,
                     replication_factor=sorted({s.replication_factor for s in specs}))
        return created

    def check_reachable(self) -> None:
        """Fail fast, naming the servers and the cause, when no broker answers.

        Runs once per broker object (the first client it creates does it): a worker,
        a send or a CLI command against a wrong or dead address ends within
        ``REACHABLE_TIMEOUT_S`` instead of retrying for ever (a consumer) or timing out
        later naming no host. A broker that answered once is not asked again: an outage
        after that is retried like any other.

        Raises:
            BrokerError: no broker answered within ``REACHABLE_TIMEOUT_S``.
        """
        if self._reachable:
            return
        with self._reach_lock:
            if not self._reachable:
                log.debug("checking that a Kafka broker answers",
                          servers=self._common.get("bootstrap.servers"))
                self._probe()
                self._reachable = True

    def _probe(self) -> None:
        # A throwaway client: its connection errors are collected for the message
        # instead of being logged (and librdkafka's own log lines are off).
        errors: list[ck.KafkaError] = []
        config: dict[str, Any] = {
            k: v for k, v in self._common.items() if k not in ("logger", "error_cb")
        }
        config.update({"error_cb": errors.append, "log_level": 0})
        probe = _client(AdminClient, config)
        try:
            # DescribeCluster carries no topic metadata (cheap on a broker with many
            # partitions); an error answer (e.g. not authorized) still proves a broker.
            probe.describe_cluster(request_timeout=REACHABLE_TIMEOUT_S).result(
                timeout=REACHABLE_TIMEOUT_S + 2)
            return
        except ck.KafkaException as err:
            if _error_code(err) not in _UNREACHED_CODES:
                return
            failure: str = err.args[0].str() if err.args else str(err)
        except TimeoutError:
            failure = "no answer"
        probe.poll(0)  # serves the error callbacks collected meanwhile
        raise BrokerError(self._unreachable_message(errors, failure))

    def _unreachable_message(self, errors: list[ck.KafkaError], failure: str) -> str:
        causes = [e for e in errors if e.code() in _CAUSE_CODES]
        shown = list(dict.fromkeys(_AFTER_STATE.sub("", e.str()) for e in causes))[:3]
        servers = self._common.get("bootstrap.servers", "?")
        return (
            f"no Kafka broker at {servers} answered within {REACHABLE_TIMEOUT_S:.0f}s "
            f"({'; '.join(shown) or failure}); "
            f"{_unreachable_hint({e.code() for e in causes})}"
        )

    def _wait_visible(self, topic: str) -> None:
        """Wait until ``topic`` shows in the metadata with a leader for every partition."""
        deadline = time.monotonic() + TOPIC_VISIBLE_TIMEOUT_S
        while True:
            try:
                metadata = self._get_admin().list_topics(topic, timeout=REQUEST_TIMEOUT_S)
                info = metadata.topics.get(topic)
                if (
                    info is not None
                    and info.error is None
                    and info.partitions
                    and all(p.leader >= 0 and p.error is None for p in info.partitions.values())
                ):
                    return
            except ck.KafkaException as err:
                if time.monotonic() > deadline:
                    raise BrokerError(f"cannot read metadata of topic {topic!r}: {err}") from err
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"topic {topic!r} has no leader for every partition "
                    f"after {TOPIC_VISIBLE_TIMEOUT_S:.0f}s"
                )
            time.sleep(0.1)

    def partition_count(self, topic: str) -> int:
        """Return the number of partitions of ``topic`` (BrokerError if it does not exist)."""
        try:
            metadata = self._get_admin().list_topics(topic, timeout=REQUEST_TIMEOUT_S)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot read metadata of topic {topic!r}: {err}") from err
        info = metadata.topics.get(topic)
        if info is None or (info.error is not None and not info.partitions):
            reason = "unknown" if info is None or info.error is None else info.error.str()
            raise BrokerError(f"topic {topic!r} does not exist ({reason})")
        return len(info.partitions)

    def watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """Return the (low, high) offsets of a partition.

        Raises:
            BrokerError: the partition is unknown or Kafka did not answer in time.

        """
        lookup = self._get_lookup()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                marks = lookup.get_watermark_offsets(
                    ck.TopicPartition(tp.topic, tp.partition), timeout=remaining
                )
            except ck.KafkaException as err:
                # Right after a topic is created or a broker restarted, the leader may
                # not be known yet (NOT_LEADER_FOR_PARTITION, retriable): ask again.
                if _retriable(err) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise BrokerError(f"cannot read watermarks of {tp}: {err}") from err
            if marks is None:
                raise BrokerError(f"no watermarks of {tp} within {REQUEST_TIMEOUT_S}s")
            return int(marks[0]), int(marks[1])

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[TopicPartition, int]:
        """Return, per partition, the first offset whose timestamp is at or after ``timestamp_ms``.

        Where no record is that new, the partition's high watermark is returned (the
        offset the next record will get), so a replay from there reads nothing old.

        Raises:
            BrokerError: the topic does not exist or Kafka did not answer in time.

        """
        count = self.partition_count(topic)
        query = [ck.TopicPartition(topic, p, timestamp_ms) for p in range(count)]
        try:
            found = self._get_lookup().offsets_for_times(query, timeout=REQUEST_TIMEOUT_S)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot look up offsets of {topic!r} by time: {err}") from err
        result: dict[TopicPartition, int] = {}
        for tp in found:
            ours = TopicPartition(tp.topic, tp.partition)
            if tp.error is not None:
                raise BrokerError(f"cannot look up offsets of {ours} by time: {tp.error.str()}")
            result[ours] = tp.offset if tp.offset >= 0 else self.watermarks(ours)[1]
        return result

    # -- operator tools: plain reads and deletes -----------------------------------------

    def topic_exists(self, topic: str) -> bool:
        """Return whether ``topic`` exists (the metadata request creates nothing).

        Raises:
            BrokerError: Kafka did not answer in time.

        """
        try:
            metadata = self._get_admin().list_topics(topic, timeout=REQUEST_TIMEOUT_S)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot read metadata of topic {topic!r}: {err}") from err
        info = metadata.topics.get(topic)
        if info is None:
            return False
        if info.error is not None and info.error.code() == ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
            return False
        return bool(info.partitions)

    def read(
        self, tp: TopicPartition, start: int, end: int, timeout_s: float = 30.0
    ) -> Iterator[Record]:
        """Yield the records of ``tp`` with ``start <= offset < end``, in offset order.

        Uses a consumer that is only assigned the partition: it joins no group and
        commits nothing (its ``group.id`` is a throwaway). Stops at ``end`` or at the
        high watermark seen when the read started, whichever comes first.

        Raises:
            BrokerError: the partition does not exist, or no record came within
                ``timeout_s`` although the range holds more.

        """
        low, high = self.watermarks(tp)
        start, end = max(start, low), min(end, high)
        if start >= end:
            return
        config = self.consumer_config(self._topology.read_group_id())
        config.update({"enable.partition.eof": True, "allow.auto.create.topics": False})
        try:
            consumer = _client(ck.Consumer, config)
            consumer.assign([ck.TopicPartition(tp.topic, tp.partition, start)])
        except ck.KafkaException as err:
            raise BrokerError(f"cannot read {tp}: {err}") from err
        try:
            yield from self._read_assigned(consumer, tp, end, timeout_s)
        finally:
            consumer.close()

    @staticmethod
    def _read_assigned(
        consumer: ck.Consumer, tp: TopicPartition, end: int, timeout_s: float
    ) -> Iterator[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                messages = consumer.consume(READ_BATCH, 0.5)
            except ck.KafkaException as err:
                raise BrokerError(f"cannot read {tp}: {err}") from err
            for msg in messages:
                problem = msg.error()
                if problem is not None:
                    if problem.code() == ck.KafkaError._PARTITION_EOF:
                        return  # the high watermark: nothing more to read now
                    if problem.fatal():
                        raise BrokerError(f"cannot read {tp}: {problem.str()}")
                    log.warning("read error", error=problem.str(), partition=str(tp))
                    continue
                record = _record(msg)
                if record.offset >= end:
                    return
                yield record
                if record.offset >= end - 1:
                    return
            if messages:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise BrokerError(
                    f"no record of {tp} within {timeout_s}s although offsets up to {end} remain"
                )

    def delete_records(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Delete, per partition, every record before the given offset.

        The low watermark moves to that offset (Kafka's DeleteRecords); offsets of the
        records kept do not change.

        Raises:
            BrokerError: Kafka refused or did not confirm in time (naming the partition).

        """
        if not offsets:
            return
        parts = [ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        try:
            futures = self._get_admin().delete_records(
                parts, request_timeout=DELETE_TIMEOUT_S, operation_timeout=DELETE_TIMEOUT_S
            )
        except ck.KafkaException as err:
            raise BrokerError(f"cannot delete records: {err}") from err
        for part, future in futures.items():
            try:
                future.result(timeout=DELETE_TIMEOUT_S)
            except (ck.KafkaException, TimeoutError) as err:
                ours = TopicPartition(part.topic, part.partition)
                raise BrokerError(f"cannot delete records of {ours}: {err!r}") from err

    # -- topic administration ------------------------------------------------------------

    def list_topics(self) -> list[str]:
        """Return the names of every topic, sorted (Kafka's internal ones left out).

        Raises:
            BrokerError: Kafka did not answer in time.

        """
        try:
            metadata = self._get_admin().list_topics(timeout=REQUEST_TIMEOUT_S)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot list topics: {err}") from err
        return sorted(t for t in metadata.topics if not t.startswith("__"))

    def add_partitions(self, topic: str, total: int) -> None:
        """Grow ``topic`` to ``total`` partitions (CreatePartitions); wait until they show.

        Raises:
            BrokerError: Kafka refused (the topic is missing or already that large) or
                did not confirm in time.

        """
        try:
            futures = self._get_admin().create_partitions(
                [NewPartitions(topic, total)], operation_timeout=30, request_timeout=30
            )
        except ck.KafkaException as err:
            raise BrokerError(f"cannot add partitions to {topic!r}: {err}") from err
        for future in futures.values():
            try:
                future.result(timeout=60)
            except (ck.KafkaException, TimeoutError) as err:
                raise BrokerError(f"cannot grow {topic!r} to {total} partitions: {err!r}") from err
        deadline = time.monotonic() + TOPIC_VISIBLE_TIMEOUT_S
        while self.partition_count(topic) < total:
            if time.monotonic() > deadline:
                raise BrokerError(f"{topic!r} does not show {total} partitions "
                                  f"after {TOPIC_VISIBLE_TIMEOUT_S:.0f}s")
            time.sleep(0.1)
        self._wait_visible(topic)
        log.info("partitions added", topic=topic, partitions=total)

    # -- consumer group offsets -----------------------------------------------------------

    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """Return the offsets ``group_id`` has committed (ListConsumerGroupOffsets).

        Raises:
            BrokerError: Kafka did not answer, or answered with an error.
        """
        request = [ck.ConsumerGroupTopicPartitions(group_id)]
        try:
            futures = self._get_admin().list_consumer_group_offsets(
                request, request_timeout=REQUEST_TIMEOUT_S
            )
            answer = futures[group_id].result(timeout=REQUEST_TIMEOUT_S * 3)
        except (ck.KafkaException, TimeoutError) as err:
            raise BrokerError(f"cannot list the offsets of group {group_id!r}: {err!r}") from err
        offsets: dict[TopicPartition, int] = {}
        for tp in answer.topic_partitions or []:
            if tp.error is not None:
                raise BrokerError(f"cannot list the offset of group {group_id!r} on "
                                  f"{tp.topic}[{tp.partition}]: {tp.error}")
            if tp.offset >= 0:
                offsets[TopicPartition(tp.topic, tp.partition)] = tp.offset
        return offsets

    def cluster_size(self) -> int:
        """Return how many brokers the cluster lists (the live ones; DescribeCluster).

        DescribeCluster carries no topic metadata: on a broker with many thousands of
        partitions a full metadata request is large (it exhausted a 512 MiB heap here).

        Raises:
            BrokerError: no broker answered.
        """
        try:
            future = self._get_admin().describe_cluster(request_timeout=REQUEST_TIMEOUT_S)
            return len(future.result(timeout=REQUEST_TIMEOUT_S * 2).nodes)
        except (ck.KafkaException, TimeoutError) as err:
            raise BrokerError(
                f"cannot describe the Kafka cluster at {self._common.get('bootstrap.servers')}"
                f": {err}") from err

    def topic_replicas(self, topic: str) -> int | None:
        """Return the fewest replicas of any partition of ``topic``; None if it is missing.

        Raises:
            BrokerError: Kafka did not answer in time.
        """
        try:
            info = self._get_admin().list_topics(topic, timeout=REQUEST_TIMEOUT_S).topics.get(topic)
        except ck.KafkaException as err:
            raise BrokerError(f"cannot read metadata of topic {topic!r}: {err}") from err
        if info is None or info.error is not None or not info.partitions:
            return None
        return min(len(p.replicas) for p in info.partitions.values())

    def group_member_count(self, group_id: str) -> int:
        """Return how many consumers are members of ``group_id`` now (DescribeGroups).

        Raises:
            BrokerError: Kafka did not answer, or answered with an error.
        """
        try:
            futures = self._get_admin().describe_consumer_groups(
                [group_id], request_timeout=REQUEST_TIMEOUT_S
            )
            description = futures[group_id].result(timeout=REQUEST_TIMEOUT_S * 3)
        except ck.KafkaException as err:
            if _error_code(err) == ck.KafkaError.GROUP_ID_NOT_FOUND:
                return 0
            raise BrokerError(f"cannot describe group {group_id!r}: {err!r}") from err
        except TimeoutError as err:
            raise BrokerError(f"cannot describe group {group_id!r}: {err!r}") from err
        return len(description.members or [])

    def set_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` for ``group_id`` (AlterConsumerGroupOffsets).

        Kafka refuses while the group has active members.

        Raises:
            BrokerError: Kafka refused the group or an offset (naming the partition).
        """
        if not offsets:
            return
        parts = [ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        request = [ck.ConsumerGroupTopicPartitions(group_id, parts)]
        try:
            futures = self._get_admin().alter_consumer_group_offsets(
                request, request_timeout=REQUEST_TIMEOUT_S
            )
            answer = futures[group_id].result(timeout=REQUEST_TIMEOUT_S * 3)
        except (ck.KafkaException, TimeoutError) as err:
            raise BrokerError(f"cannot set the offsets of group {group_id!r}: {err!r}") from err
        failed = [tp for tp in answer.topic_partitions or [] if tp.error is not None]
        if failed:
            shown = ", ".join(f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in failed)
            raise BrokerError(f"cannot set the offsets of group {group_id!r}: {shown}")

    def drop_queued(self) -> None:
        """Drop the records not yet handed to a broker (librdkafka purge of its queues).

        Each gets a failed delivery report ("Local: Purged in queue") at the next
        :meth:`poll` or :meth:`flush`. Records in flight are left to be answered.
        """
        if self._producer is not None:
            self._producer.purge(in_queue=True, in_flight=False, blocking=False)

    def close(self) -> None:
        """Flush what can be flushed (up to 30 s) and release connections."""
        with self._lock:
            producer, self._producer = self._producer, None
            lookup, self._lookup = self._lookup, None
            self._admin = None
        if producer is not None:
            remaining = producer.flush(30.0)
            if remaining:
                log.warning("records not confirmed at close", remaining=remaining)
        if lookup is not None:
            lookup.close()


def _delivery_adapter(
    on_delivery: DeliveryCallback | None,
) -> Callable[[ck.KafkaError | None, ck.Message], None] | None:
    if on_delivery is None:
        return None
    callback = on_delivery

    def report(err: ck.KafkaError | None, _msg: ck.Message) -> None:
        callback(None if err is None else err.str())

    return report


class KafkaConsumer(Consumer):
    """A member of a Kafka consumer group (cooperative-sticky, manual commits).

    Rebalance callbacks run inside :meth:`poll` (and :meth:`close`). On assignment the
    partitions are added before the listener's ``on_assign`` runs, so it may seek or pause
    them; on revocation the listener's ``on_revoke`` runs while the partitions are still
    assigned, so it can commit their progress synchronously, and they are removed after it
    returns. Empty assignment changes, which a cooperative rebalance reports too, are not
    passed on.

    Args:
        config: the librdkafka consumer configuration.
        topics: topics to subscribe to.
        listener: told about assignment changes.

    Raises:
        BrokerError: the consumer could not be created or subscribed.

    """

    def __init__(
        self, config: Mapping[str, Any], topics: Sequence[str], listener: RebalanceListener,
        *, eager: bool = False,
    ) -> None:
        self._eager = eager
        self._listener = listener
        self._closed = False
        # Partitions being assigned while the listener's on_assign runs (see _on_assign).
        self._pending: dict[tuple[str, int], ck.TopicPartition] = {}
        self._pending_pauses: list[ck.TopicPartition] = []
        conf = dict(config)
        conf["on_commit"] = self._on_commit
        try:
            self._consumer = _client(ck.Consumer, conf)
            self._consumer.subscribe(
                list(topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except ck.KafkaException as err:
            raise BrokerError(f"cannot join group {conf.get('group.id')!r}: {err}") from err

    # -- rebalance trampolines (run inside consume() / close()) ---------------------------

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        # librdkafka refuses seek() on a partition whose fetcher has not started yet
        # (_STATE), which is the case right after incremental_assign. So the listener runs
        # first with the new partitions "pending": its seeks become the start offsets passed
        # to incremental_assign, its pauses are applied right after. Assigning here also
        # keeps confluent-kafka from doing its own incremental_assign afterwards.
        # librdkafka keeps an application pause on a partition across revocation and
        # re-assignment, so a partition paused when it left would come back paused and
        # never be read: every assigned partition is resumed unless the listener paused it.
        self._pending = {(tp.topic, tp.partition): tp for tp in partitions}
        self._pending_pauses = []
        try:
            if partitions:
                self._listener.on_assign(_our_partitions(partitions))
        finally:
            starts, pauses = list(self._pending.values()), self._pending_pauses
            self._pending, self._pending_pauses = {}, []
            consumer.incremental_assign(starts)
            paused = {(tp.topic, tp.partition) for tp in pauses}
            fresh = [tp for tp in starts if (tp.topic, tp.partition) not in paused]
            if fresh:
                consumer.resume(fresh)
            if pauses:
                consumer.pause(pauses)

    def _on_revoke(self, _consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        # The partitions stay assigned until this returns (confluent-kafka then calls
        # incremental_unassign), so the listener can still commit them.
        if partitions:
            self._listener.on_revoke(_our_partitions(partitions))

    def _on_lost(self, _consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if partitions:
            self._listener.on_lost(_our_partitions(partitions))

    def _on_commit(self, err: ck.KafkaError | None, partitions: list[ck.TopicPartition]) -> None:
        # The answer to an asynchronous commit (served inside poll): offsets that failed
        # stay due in the listener's tracker and are committed again.
        if err is not None and err.code() == ck.KafkaError._NO_OFFSET:
            return
        whole = err is not None
        committed = {TopicPartition(tp.topic, tp.partition): tp.offset for tp in partitions
                     if not whole and tp.error is None and tp.offset >= 0}
        failed = {TopicPartition(tp.topic, tp.partition): tp.offset for tp in partitions
                  if (whole or tp.error is not None) and tp.offset >= 0}
        reason = err.str() if err is not None else "; ".join(
            f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in partitions if tp.error
        )
        on_commit = getattr(self._listener, "on_commit", None)
        if on_commit is not None:
            on_commit(committed, failed, reason or None)
        elif failed:
            log.warning("offset commit failed", error=reason)

    # -- Consumer ------------------------------------------------------------------------

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Return up to ``max_records`` records, waiting at most ``timeout_s``.

        ``consume(n, timeout)`` waits the whole timeout unless ``n`` records come: an
        eager consumer (a worker's) instead polls for one record and takes what else is
        already fetched, so a lone task starts at once rather than up to the worker's
        idle poll of 100 ms later. The delay forwarder keeps the batch wait: polled
        eagerly, its countdown lateness p99 rose from 1.37 s to 2.0-2.4 s.
        Rebalance callbacks run inside this call; an exception raised by the listener
        comes out of it unchanged.

        Raises:
            BrokerError: a fatal consumer error, or the consumer is closed.

        """
        try:
            if self._eager:
                first = self._consumer.poll(timeout_s)
                messages = [] if first is None else [first]
                if first is not None and max_records > 1:
                    messages += self._consumer.consume(max_records - 1, 0)
            else:
                messages = self._consumer.consume(max_records, timeout_s)
        except ck.KafkaException as err:
            raise BrokerError(f"consume failed: {err}") from err
        except RuntimeError as err:
            raise BrokerError(f"consume failed: {err}") from err
        records: list[Record] = []
        for msg in messages:
            problem = msg.error()
            if problem is None:
                records.append(_record(msg))
            elif problem.code() == ck.KafkaError._PARTITION_EOF:
                continue
            elif problem.fatal():
                raise BrokerError(f"fatal consumer error: {problem.str()}")
            else:
                log.warning(
                    "consumer error",
                    error=problem.str(),
                    topic=msg.topic(),
                    partition=msg.partition(),
                )
        return records

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching from these partitions (records already fetched are dropped)."""
        parts = _ck_partitions(partitions)
        pending = [tp for tp in parts if (tp.topic, tp.partition) in self._pending]
        self._pending_pauses.extend(pending)
        assigned = [tp for tp in parts if (tp.topic, tp.partition) not in self._pending]
        if assigned:
            self._call("pause", self._consumer.pause, assigned)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Fetch again from these partitions, from the position after the last record read."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._pending_pauses = [
            tp for tp in self._pending_pauses if (tp.topic, tp.partition) not in keys
        ]
        if partitions:
            self._call("resume", self._consumer.resume, _ck_partitions(partitions))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next (``tp`` must be assigned, or being assigned)."""
        pending = self._pending.get((tp.topic, tp.partition))
        if pending is not None:
            pending.offset = offset
            return
        self._call("seek", self._consumer.seek, ck.TopicPartition(tp.topic, tp.partition, offset))

    def commit(self, offsets: Mapping[TopicPartition, int], *, asynchronous: bool) -> None:
        """Commit, per partition, the offset of the next record to read.

        A synchronous commit returns when Kafka stored the offsets. Asynchronous commit
        failures are logged (the next commit carries the same or newer offsets).

        Raises:
            BrokerError: a synchronous commit failed.

        """
        if not offsets:
            return
        parts = [ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        try:
            if asynchronous:
                self._consumer.commit(offsets=parts, asynchronous=True)
                return
            result = self._consumer.commit(offsets=parts, asynchronous=False)
        except ck.KafkaException as err:
            if _error_code(err) == ck.KafkaError._NO_OFFSET:
                return
            raise BrokerError(f"offset commit failed: {err}") from err
        except RuntimeError as err:
            raise BrokerError(f"offset commit failed: {err}") from err
        failed = [tp for tp in result or [] if tp.error is not None]
        if failed:
            shown = ", ".join(f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in failed)
            raise BrokerError(f"offset commit failed for {shown}")

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Return the group's committed offsets (None where nothing is committed).

        Raises:
            BrokerError: Kafka did not answer in time.

        """
        if not partitions:
            return {}
        try:
            found = self._consumer.committed(_ck_partitions(partitions), timeout=REQUEST_TIMEOUT_S)
        except (ck.KafkaException, RuntimeError) as err:
            raise BrokerError(f"cannot read committed offsets: {err}") from err
        return {
            TopicPartition(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None
            for tp in found
        }

    def assignment(self) -> list[TopicPartition]:
        """Return the partitions assigned to this consumer (in ``on_assign``: with the new)."""
        current = self._call("assignment", self._consumer.assignment)
        pending = _our_partitions(list(self._pending.values()))
        return sorted(set(_our_partitions(current)) | set(pending))

    def close(self) -> None:
        """Leave the group; the listener's ``on_revoke`` runs for what is still assigned."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        except (ck.KafkaException, RuntimeError) as err:
            raise BrokerError(f"consumer close failed: {err}") from err

    @staticmethod
    def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except (ck.KafkaException, RuntimeError) as err:
            raise BrokerError(f"consumer {what} failed: {err}") from err


def _record(msg: ck.Message) -> Record:
    ts_type, ts = msg.timestamp()
    return Record(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        key=msg.key(),
        value=msg.value(),
        headers=_headers(msg.headers()),
        timestamp_ms=ts if ts_type != ck.TIMESTAMP_NOT_AVAILABLE else 0,
    )


def _headers(raw: Any) -> dict[str, bytes]:
    if not raw:
        return {}
    headers: dict[str, bytes] = dict(raw)  # librdkafka's: (str, bytes | None) pairs
    if None in headers.values():  # a header without a value reads as empty
        return {name: value or b"" for name, value in headers.items()}
    return headers
