"""Settings that cannot keep the delivery promise on a cluster are refused or warned about."""

from __future__ import annotations

import pytest

from streamtasks import App, Settings
from streamtasks.backend.base import Replication
from streamtasks.durability import ClusterView, check_durability
from streamtasks.errors import BrokerError, ConfigError
from streamtasks.worker.consumer import Worker

RF3 = {"class": "org.apache.cassandra.locator.SimpleStrategy", "replication_factor": "3"}
RF1 = {"class": "org.apache.cassandra.locator.SimpleStrategy", "replication_factor": "1"}


def production(**changes: object) -> Settings:
    values: dict[str, object] = {"replication_factor": 3}
    values.update(changes)
    return Settings.build(values)


def cluster(brokers: int = 3, nodes: int = 3, replication: dict[str, str] = RF3,
            consistency: str = "LOCAL_QUORUM") -> ClusterView:
    return ClusterView(brokers, Replication(nodes, "streamtasks", replication, consistency,
                                            "LOCAL_SERIAL"))


def test_the_production_settings_pass_on_three_nodes_without_warnings() -> None:
    assert check_durability(production(), cluster()) == []


def test_the_single_node_defaults_pass_on_a_single_node() -> None:
    assert check_durability(Settings(), cluster(brokers=1, nodes=1, replication=RF1)) == []


@pytest.mark.parametrize("acks", ["1", "0", "leader"])
def test_acks_below_all_in_the_broker_url_is_refused(acks: str) -> None:
    settings = production(broker=f"kafka://127.0.0.1:9092?acks={acks}")
    with pytest.raises(ConfigError, match=f"broker URL option acks={acks}"):
        check_durability(settings, ClusterView())  # refused whatever the cluster


def test_acks_all_in_the_broker_url_is_accepted() -> None:
    settings = production(broker="kafka://127.0.0.1:9092?acks=all&linger.ms=5")
    assert check_durability(settings, cluster()) == []


def test_idempotence_turned_off_in_the_broker_url_is_refused() -> None:
    settings = production(broker="kafka://127.0.0.1:9092?enable.idempotence=false")
    with pytest.raises(ConfigError, match=r"enable\.idempotence=false"):
        check_durability(settings, cluster())


def test_topics_with_one_replica_on_several_brokers_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"setting replication_factor is 1 on a Kafka "
                                          r"cluster of 3 brokers.*replication_factor=3 or auto"):
        check_durability(Settings(replication_factor=1), cluster(replication=RF3))


def test_two_replicas_on_three_brokers_and_a_min_insync_of_one_are_warned_about() -> None:
    warnings = check_durability(production(replication_factor=2), cluster())
    assert len(warnings) == 2
    assert "replication_factor=2 on 3 brokers" in warnings[0]
    assert "min_insync_replicas=1 with replication_factor=2" in warnings[1]
    warnings = check_durability(production(min_insync_replicas=1), cluster())
    assert ["min_insync_replicas=1 with replication_factor=3" in w for w in warnings] == [True]


def test_more_replicas_than_live_brokers_is_a_warning_not_a_refusal() -> None:
    # one broker of three is down while a worker starts: it must start
    warnings = check_durability(production(), cluster(brokers=2))
    assert len(warnings) == 1 and "2 broker(s) are up" in warnings[0]


def test_a_keyspace_with_one_replica_on_several_nodes_is_refused() -> None:
    with pytest.raises(ConfigError, match="keyspace streamtasks keeps one replica on a "
                                          "Cassandra cluster of 3 nodes"):
        check_durability(production(), cluster(replication=RF1))


def test_consistency_one_for_joins_is_refused_on_a_replicated_keyspace() -> None:
    with pytest.raises(ConfigError, match="consistency ONE"):
        check_durability(production(), cluster(consistency="ONE"))


def test_an_unseen_cluster_is_not_checked() -> None:
    assert check_durability(Settings(), ClusterView()) == []


def test_a_worker_refuses_to_start_with_one_replica_on_a_cluster(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.broker, "cluster_size", lambda: 3)
    app.settings.replication_factor = 1
    worker = Worker(app, ["default"])
    with pytest.raises(ConfigError, match="setting replication_factor is 1"):
        worker.start()


def _down() -> int:
    raise BrokerError("no Kafka broker at 127.0.0.1:1 answered")


@pytest.mark.parametrize("cluster_size", [lambda: 3, _down],
                         ids=["defaults-on-three-brokers", "cluster-unseen"])
def test_a_worker_starts_with_the_defaults_on_three_brokers_or_an_unseen_cluster(
    app: App, monkeypatch: pytest.MonkeyPatch, cluster_size: object
) -> None:
    monkeypatch.setattr(app.broker, "cluster_size", cluster_size)
    assert app.settings.replication_factor == 0  # auto
    worker = Worker(app, ["default"])
    try:
        worker.start()
        assert all(rt.started for rt in worker.runtimes)
    finally:
        worker.close()


def test_an_existing_topic_with_one_replica_on_several_brokers_is_refused() -> None:
    # created with RF 1 earlier: the setting saying 3 now does not protect its tasks
    view = ClusterView(3, None, {"ns.default": 1})
    with pytest.raises(ConfigError, match=r"topic ns\.default has one replica on a Kafka "
                                          "cluster of 3 brokers"):
        check_durability(production(), view)


@pytest.mark.parametrize(("settings", "factor"), [
    (production(), "3"),
    # auto on 2 live brokers gave 2 replicas; back on 3, the default asks for 3
    (Settings(), "auto (3 on 3 brokers)"),
])
def test_an_existing_topic_with_fewer_replicas_than_the_setting_is_warned_about(
    settings: Settings, factor: str
) -> None:
    warnings = check_durability(settings, ClusterView(3, None, {"ns.default": 2}))
    assert warnings == [f"topic ns.default has 2 replicas, fewer than setting "
                        f"replication_factor={factor} (it was created before, or while brokers"
                        " were down; add replicas with kafka-reassign-partitions)"]
    assert check_durability(settings, ClusterView(3, None, {"ns.default": 3})) == []


def test_a_worker_checks_the_existing_topics_of_its_queues(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def replicas(topic: str) -> int:
        asked.append(topic)
        return 1

    monkeypatch.setattr(app.broker, "cluster_size", lambda: 3)
    monkeypatch.setattr(app.broker, "topic_replicas", replicas)
    app.settings.replication_factor = 3
    worker = Worker(app, ["default", "emails"])
    with pytest.raises(ConfigError, match=r"topic streamtasks\.default has one replica"):
        worker.start()
    assert asked == [app.settings.topic("default"), app.settings.topic("emails")]
