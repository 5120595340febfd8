"""Automatic replication, ``min(3, nodes)``: read when a topic or keyspace is made."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from streamtasks import Settings
from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.backend.cassandra.schema import Migrator
from streamtasks.broker.base import TopicSpec
from streamtasks.broker.kafka import KafkaBroker
from streamtasks.broker.memory import MemoryBroker
from streamtasks.durability import ClusterView, check_durability
from streamtasks.errors import ConfigError
from streamtasks.replicas import auto_replicas

#: brokers (or nodes) -> (replication factor, min.insync.replicas) the defaults give
SIZES = {1: (1, 1), 2: (2, 1), 3: (3, 2), 5: (3, 2)}


@pytest.mark.parametrize(("nodes", "expected"), [(0, 1), (1, 1), (2, 2), (3, 3), (5, 3)])
def test_auto_replicas_is_min_3_nodes_and_at_least_one(nodes: int, expected: int) -> None:
    assert auto_replicas(nodes) == expected


@pytest.mark.parametrize(("brokers", "expected"), SIZES.items())
def test_the_default_topic_spec_is_chosen_from_the_brokers(brokers: int,
                                                           expected: tuple[int, int]) -> None:
    spec = Settings().topology.topic_specs("q")[0]
    assert spec.automatic and spec.replication_factor == 0
    created = spec.on_cluster(brokers)
    assert (created.replication_factor, created.min_insync_replicas) == expected
    assert created.config["min.insync.replicas"] == str(expected[1])
    assert created.config["retention.ms"] == spec.config["retention.ms"]


@pytest.mark.parametrize("brokers", [1, 2, 3, 5])
def test_an_explicit_replication_factor_wins_over_the_brokers(brokers: int) -> None:
    spec = Settings(replication_factor=2).topology.topic_specs("q")[0]
    assert spec.on_cluster(brokers).replication_factor == 2


def test_a_min_insync_above_the_automatic_factor_is_refused_when_the_topic_is_made() -> None:
    # accepted by the settings (a cluster of 3 takes it) but not by one broker
    spec = Settings(min_insync_replicas=2).topology.topic_specs("q")[0]
    assert spec.on_cluster(3).config["min.insync.replicas"] == "2"
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(2\) is above the replication "
                                          r"factor auto \(1 on 1 broker\)"):
        spec.on_cluster(1)
    settings = Settings(broker="memory://", min_insync_replicas=2)
    broker = MemoryBroker(settings)
    with pytest.raises(ConfigError, match="min_insync_replicas"):
        broker.create_topics(settings.topology.topic_specs("q"))
    assert not broker.topic_exists(settings.topic("q"))  # nothing half made


def test_a_min_insync_no_automatic_factor_reaches_is_refused_with_the_settings() -> None:
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(4\) is above the 3 replicas "
                                          "that replication_factor=auto gives at most"):
        Settings(min_insync_replicas=4)
    assert Settings(min_insync_replicas=4, replication_factor=5).min_insync_replicas == 4


@pytest.mark.parametrize("given", ["auto", "AUTO", " Auto ", "0"])
def test_auto_is_spelled_auto_or_0_in_the_environment(given: str) -> None:
    env = {"STREAMTASKS_REPLICATION_FACTOR": given, "STREAMTASKS_MIN_INSYNC_REPLICAS": given}
    settings = Settings.from_env(env=env)
    assert settings.replication_factor == 0 and settings.min_insync_replicas == 0
    assert Settings().replication_factor == 0  # the default


def test_auto_is_spelled_auto_in_a_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("replication_factor: auto\nmin_insync_replicas: 2\n")
    settings = Settings.from_env(env={}, config_file=path)
    assert (settings.replication_factor, settings.min_insync_replicas) == (0, 2)


@pytest.mark.parametrize("given", ["three", "-1", "2.5", "automatic"])
def test_a_bad_replication_factor_names_the_setting_its_source_and_auto(given: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env={"STREAMTASKS_REPLICATION_FACTOR": given})
    assert str(caught.value) == (
        "setting replication_factor (from env STREAMTASKS_REPLICATION_FACTOR): expected a "
        f"whole number of replicas, or auto (also 0) (given: {given!r})")


@pytest.mark.parametrize("brokers", [1, 3, 5])
def test_the_defaults_pass_the_durability_checks_without_warnings(brokers: int) -> None:
    assert check_durability(Settings(), ClusterView(brokers)) == []


def test_the_defaults_on_two_brokers_are_warned_about_naming_auto() -> None:
    # 2 replicas, min.insync 1: a record confirmed by one broker can still be lost
    warnings = check_durability(Settings(), ClusterView(2))
    assert warnings == [
        "setting min_insync_replicas=1 with replication_factor=auto (2 on 2 brokers): a record"
        " confirmed by one broker is lost if that broker fails before the others copy it; "
        "use 2 (or 0, automatic, with 3 replicas)"]


def test_an_explicit_min_insync_above_the_automatic_factor_refuses_a_worker_start() -> None:
    with pytest.raises(ConfigError, match="min_insync_replicas"):
        check_durability(Settings(min_insync_replicas=3), ClusterView(2))


def test_the_memory_broker_is_one_broker() -> None:
    broker = MemoryBroker(Settings(broker="memory://"))
    broker.create_topics([TopicSpec("t", 1, 0)])
    spec = broker.topic_spec("t")
    assert spec is not None and spec.replication_factor == 1
    assert spec.config["min.insync.replicas"] == "1"


class _Admin:
    """An AdminClient that records the topics asked for and answers metadata at once."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        partition = SimpleNamespace(leader=1, error=None)
        info = SimpleNamespace(error=None, partitions={0: partition})
        return SimpleNamespace(topics={topic: info} if topic else {})

    def create_topics(self, new: list[Any], **_kwargs: Any) -> dict[str, Future[None]]:
        self.asked.extend(new)
        futures: dict[str, Future[None]] = {}
        for topic in new:
            futures[topic.topic] = Future()
            futures[topic.topic].set_result(None)
        return futures


@pytest.mark.parametrize(("brokers", "expected"), SIZES.items())
def test_the_kafka_broker_reads_the_cluster_size_when_it_creates_topics(
    brokers: int, expected: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings()
    broker = KafkaBroker("kafka://127.0.0.1:1", settings)
    admin = _Admin()
    asked_size: list[int] = []
    monkeypatch.setattr(broker, "_get_admin", lambda: admin)
    monkeypatch.setattr(broker, "cluster_size", lambda: asked_size.append(brokers) or brokers)
    specs = settings.topology.topic_specs("q")
    assert sorted(broker.create_topics(specs)) == sorted(s.name for s in specs)
    assert asked_size == [brokers]  # once per call, at creation
    assert {(t.replication_factor, t.config["min.insync.replicas"]) for t in admin.asked} == {
        (expected[0], str(expected[1]))}
    # an explicit factor does not ask the cluster
    asked_size.clear()
    broker.create_topics(Settings(replication_factor=2).topology.topic_specs("r"))
    assert asked_size == []
    assert admin.asked[-1].replication_factor == 2


class _Connection:
    """What :class:`Migrator` reads of the nodes: all, or those of one data center."""

    def __init__(self, url: str, by_dc: dict[str, int]) -> None:
        self.options = CassandraOptions.from_url(url, Settings())
        self._by_dc = by_dc

    def nodes(self, data_center: str | None = None) -> int:
        if data_center is None:
            return sum(self._by_dc.values())
        return self._by_dc.get(data_center, 0)


@pytest.mark.parametrize(("nodes", "expected"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_migrate_replicates_a_new_keyspace_on_the_nodes_the_driver_sees(nodes: int,
                                                                         expected: int) -> None:
    conn: Any = _Connection("cassandra://h/ks", {"dc1": nodes})
    assert Migrator(conn)._replication() == (
        f"{{'class': 'SimpleStrategy', 'replication_factor': {expected}}}")
    # local_dc: the nodes of that data center count, not the others
    conn = _Connection("cassandra://h/ks?local_dc=dc1", {"dc1": nodes, "dc2": 4})
    assert Migrator(conn)._replication() == (
        f"{{'class': 'NetworkTopologyStrategy', 'dc1': {expected}}}")
    conn = _Connection("cassandra://h/ks?replication_factor=2", {"dc1": nodes})
    assert "'replication_factor': 2}" in Migrator(conn)._replication()


def test_migrate_refuses_a_local_dc_with_no_node() -> None:
    conn: Any = _Connection("cassandra://h/ks?local_dc=dc9", {"dc1": 3})
    with pytest.raises(ConfigError, match="local_dc=dc9: the driver sees no Cassandra node"):
        Migrator(conn)._replication()


def test_the_consistency_defaults_are_the_production_ones() -> None:
    options = CassandraOptions.from_url("cassandra://h/ks", Settings())
    assert (options.consistency, options.serial_consistency) == ("LOCAL_QUORUM", "LOCAL_SERIAL")
