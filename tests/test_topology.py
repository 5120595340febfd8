import pytest

from streamtasks import App, ConfigError, Settings
from streamtasks.topology import TopicKind, TopicRole, Topology


@pytest.fixture
def topology() -> Topology:
    return Topology.from_settings(Settings(namespace="ns", delay_tiers="1s,30s", partitions=4,
                                           replication_factor=1, retention_ms=1000,
                                           max_message_bytes=2_000_000))


def test_topic_names(topology: Topology) -> None:
    assert topology.topic("q") == "ns.q"
    assert topology.dlq_topic("q") == "ns.q.dlq"
    assert topology.tier_topics("q") == ["ns.q.delay.1s", "ns.q.delay.30s"]
    assert topology.tier_topic("q", topology.tiers[1]) == "ns.q.delay.30s"
    assert topology.topics("q") == ["ns.q", "ns.q.dlq", "ns.q.delay.1s", "ns.q.delay.30s"]


def test_one_worker_group_and_one_forwarder_group_per_queue(topology: Topology) -> None:
    assert topology.group_id("a") == "ns.a"
    assert topology.delayer_group_id("a") == "ns.a.delayer"
    assert topology.legacy_group_ids(["b", "a"]) == ("ns.a+b", "ns.a+b.delayer")
    assert topology.lookup_group_id() == "ns.lookup"
    assert topology.read_group_id() != topology.read_group_id()
    assert topology.read_group_id().startswith("ns.read.")


def test_settings_methods_delegate_to_the_topology() -> None:
    settings = Settings(namespace="ns", delay_tiers="1s,30s")
    topology = settings.topology
    tier = settings.tiers()[0]
    assert settings.topic("q") == topology.topic("q")
    assert settings.dlq_topic("q") == topology.dlq_topic("q")
    assert settings.tier_topic("q", tier) == topology.tier_topic("q", tier)
    assert settings.group_id("q") == topology.group_id("q")
    assert settings.delayer_group_id("q") == topology.delayer_group_id("q") == "ns.q.delayer"


def test_topic_specs_of_a_queue(topology: Topology) -> None:
    specs = topology.topic_specs("q")
    assert [s.name for s in specs] == topology.topics("q")
    for spec in specs:
        assert spec.partitions == 4
        assert spec.replication_factor == 1
        assert spec.config["retention.ms"] == "1000"
        assert spec.config["max.message.bytes"] == str(2_000_000 + 64 * 1024)
    assert {s.partitions for s in topology.topic_specs("q", partitions=9)} == {9}
    specs[0].config["retention.ms"] = "1"  # every spec owns its config
    assert specs[1].config["retention.ms"] == "1000"


def test_app_topic_specs_come_from_the_topology() -> None:
    app = App("t", settings=Settings(broker="memory://", backend="memory://", namespace="x"))
    assert app.topic_specs("q") == app.settings.topology.topic_specs("q")


def test_roles_map_every_topic_back_to_its_queue_kind_and_tier(topology: Topology) -> None:
    roles = topology.roles(["a", "a.b"])
    one_s, thirty_s = topology.tiers
    assert roles["ns.a"] == TopicRole("a", TopicKind.TASK)
    assert roles["ns.a.dlq"] == TopicRole("a", TopicKind.DLQ)
    assert roles["ns.a.delay.30s"] == TopicRole("a", TopicKind.DELAY, thirty_s)
    # A queue whose name contains a dot is not mistaken for another queue's topic.
    assert roles["ns.a.b"] == TopicRole("a.b", TopicKind.TASK)
    assert roles["ns.a.b.delay.1s"] == TopicRole("a.b", TopicKind.DELAY, one_s)
    assert len(roles) == 2 * 4
    assert topology.role_of("ns.c", ["a"]) is None
    assert topology.role_of("ns.a.delay.5s", ["a"]) is None  # not a configured tier


def test_group_of_a_role(topology: Topology) -> None:
    roles = topology.roles(["a"])
    assert topology.group_of(roles["ns.a"]) == "ns.a"
    assert topology.group_of(roles["ns.a.delay.1s"]) == "ns.a.delayer"
    assert topology.group_of(roles["ns.a.dlq"]) is None


@pytest.mark.parametrize(("queue", "why"), [
    ("", "empty"),
    ("bad queue", "characters"),
    ("a/b", "characters"),
    ("ümlaut", "characters"),
    ("emails.dlq", "reserved"),
    ("emails.delay.1s", "reserved"),
    ("emails.delayer", "reserved"),
    ("q" * 240, "249"),
])
def test_a_bad_queue_name_is_refused_before_anything_is_created(queue: str, why: str) -> None:
    topology = Settings(broker="memory://", backend="memory://").topology
    with pytest.raises(ConfigError, match=why):
        topology.topic_specs(queue)


@pytest.mark.parametrize("queue", ["default", "delay", "emails.v2", "a-b_c", "q" * 200])
def test_good_queue_names_pass(queue: str) -> None:
    topology = Settings(broker="memory://", backend="memory://").topology
    assert all(len(spec.name) <= 249 for spec in topology.topic_specs(queue))


def test_the_settings_topology_follows_every_field_it_is_built_from() -> None:
    # Topologies are cached per distinct values: a settings object assigned to later
    # (tests, the CLI) must not keep an older one
    settings = Settings(namespace="ns", delay_tiers="1s,30s", partitions=4)
    first = settings.topology
    assert settings.topology is first  # built once
    changes = {"namespace": "other", "delay_tiers": "5s", "partitions": 2,
               "replication_factor": 1, "min_insync_replicas": 1, "retention_ms": 5000,
               "max_message_bytes": 3_000_000}
    for field, value in changes.items():
        setattr(settings, field, value)
        topology = settings.topology
        assert topology is not first, field
        got = topology.tiers[0].name if field == "delay_tiers" else getattr(topology, field)
        assert got == value, field
        first = topology
