import pytest

from streamtasks import App, Settings
from streamtasks.broker.memory import MemoryBroker
from streamtasks.errors import ConfigError
from streamtasks.topology import Topology


@pytest.mark.parametrize(("replication", "configured", "expected"),
                         [(1, 0, "1"), (2, 0, "1"), (3, 0, "2"), (5, 0, "2"), (3, 3, "3"),
                          (3, 1, "1")])
def test_min_insync_replicas_of_created_topics(replication: int, configured: int,
                                               expected: str) -> None:
    settings = Settings.build({"replication_factor": replication,
                               "min_insync_replicas": configured})
    for spec in settings.topology.topic_specs("q"):
        assert spec.config["min.insync.replicas"] == expected


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(3\).*replication_factor \(2\)"):
        Settings.build({"replication_factor": 2, "min_insync_replicas": 3})
    env = {"STREAMTASKS_MIN_INSYNC_REPLICAS": "2"}
    with pytest.raises(ConfigError, match=r"min_insync_replicas.*replication_factor"):
        Settings.from_env(env=env)
    with pytest.raises(ConfigError, match="min_insync_replicas"):
        Settings.build({"min_insync_replicas": -1})


def test_settings_built_directly_are_checked_when_topics_are_made() -> None:
    settings = Settings(broker="memory://", backend="memory://", min_insync_replicas=2)
    with pytest.raises(ConfigError, match="replication_factor"):
        Topology.from_settings(settings).topic_specs("q")


def test_the_memory_broker_gets_min_insync_replicas_in_every_topic_spec() -> None:
    app = App("t", settings=Settings(broker="memory://", backend="memory://"))

    @app.task(name="noop")
    def noop() -> None:
        return None

    noop.delay()
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    names = app.settings.topology.topics("default")
    for name in names:
        spec = broker.topic_spec(name)
        assert spec is not None
        assert spec.config["min.insync.replicas"] == "1"
        assert spec.config["retention.ms"] == str(app.settings.retention_ms)
    app.close()
