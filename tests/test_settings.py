from pathlib import Path

import pytest

from streamtasks import App, Settings
from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.broker.kafka import KafkaBroker
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
        created = spec.on_cluster(5)
        assert created.replication_factor == replication  # explicit: the brokers don't count
        assert created.config["min.insync.replicas"] == expected


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(3\).*replication_factor \(2\)"):
        Settings.build({"replication_factor": 2, "min_insync_replicas": 3})
    env = {"STREAMTASKS_MIN_INSYNC_REPLICAS": "2", "STREAMTASKS_REPLICATION_FACTOR": "1"}
    with pytest.raises(ConfigError, match=r"min_insync_replicas.*replication_factor"):
        Settings.from_env(env=env)
    with pytest.raises(ConfigError, match="min_insync_replicas"):
        Settings.build({"min_insync_replicas": -1})


def test_settings_built_directly_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="replication_factor"):
        Settings(broker="memory://", backend="memory://", replication_factor=1,
                 min_insync_replicas=2)
    settings = Settings(broker="memory://", backend="memory://", replication_factor=1)
    settings.min_insync_replicas = 2  # assignment is not checked: topics are
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


# -- typed values, sources and their order -----------------------------------------------

SECRET = "s3cr3t-Pw"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("concurrency: 4.5\n", r"setting concurrency \(from file .*\): expected a valid integer.*4\.5"),
    ("concurrency:\n  workers: 4\n",
     r"setting concurrency \(from file .*\): expected a valid integer.*'workers'"),
    ("log_level: loud\n", r"setting log_level \(from file .*\): expected 'debug', 'info'.*'loud'"),
    ("create_topics: maybe\n", r"setting create_topics .*expected a valid boolean"),
    ("partitions: 0\n", r"setting partitions .*greater than or equal to 1 \(given: 0\)"),
    ("concurency: 4\n",
     r"unknown setting\(s\) 'concurency' in file .*known settings: .*concurrency"),
    ("- concurrency\n", r"must hold a mapping"),
    ("concurrency: [4\n", r"is not valid YAML"),
])
def test_a_bad_value_in_the_file_is_refused_naming_the_setting(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env={}, config_file=_yaml(tmp_path, text))


def test_every_bad_value_gets_its_own_message() -> None:
    env = {"STREAMTASKS_CONCURRENCY": "4.5", "STREAMTASKS_LOG_LEVEL": "loud"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env=env)
    text = str(caught.value)
    assert "setting concurrency (from env STREAMTASKS_CONCURRENCY)" in text
    assert "setting log_level (from env STREAMTASKS_LOG_LEVEL)" in text


def test_values_are_typed_and_normalised() -> None:
    settings = Settings.from_env(env={"STREAMTASKS_CONCURRENCY": "16",
                                      "STREAMTASKS_CREATE_TOPICS": "no",
                                      "STREAMTASKS_LOG_LEVEL": "WARNING",
                                      "STREAMTASKS_CONSISTENCY": "local_quorum",
                                      "STREAMTASKS_EXTRA": '{"team": "data"}'})
    assert settings.concurrency == 16 and settings.create_topics is False
    assert settings.log_level == "warning" and settings.consistency == "LOCAL_QUORUM"
    assert settings.extra == {"team": "data"}
    with pytest.raises(ConfigError, match=r"STREAMTASKS_\* environment.*give it as JSON"):
        Settings.from_env(env={"STREAMTASKS_EXTRA": "team=data"})


def test_defaults_then_file_then_environment_then_arguments(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "concurrency: 3\nnamespace: from-file\npartitions: 2\n")
    env = {"STREAMTASKS_NAMESPACE": "from-env", "STREAMTASKS_PARTITIONS": "4",
           "STREAMTASKS_CONFIG": str(path)}
    settings = Settings.from_env(env=env, partitions=5, broker=None)
    assert settings.concurrency == 3  # the file over the default
    assert settings.namespace == "from-env"  # the environment over the file
    assert settings.partitions == 5  # an argument over the environment
    assert settings.broker == Settings().broker  # None: not given
    assert settings.max_in_flight == 1000  # the default


def test_settings_built_directly_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMTASKS_CONCURRENCY", "3")
    assert Settings().concurrency == 8
    assert Settings(concurrency=2).concurrency == 2
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        Settings(bogus=1)


def test_app_reads_the_environment_for_what_it_is_not_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STREAMTASKS_CONCURRENCY", "3")
    monkeypatch.setenv("STREAMTASKS_NAMESPACE", "env-ns")
    monkeypatch.setenv("STREAMTASKS_BROKER", "kafka://elsewhere:9092")
    monkeypatch.setenv("STREAMTASKS_CONFIG", str(_yaml(tmp_path, "default_queue: fromfile\n")))
    app = App("demo", broker="memory://", backend="memory://")  # the README's form
    assert app.settings.concurrency == 3 and app.settings.namespace == "env-ns"
    assert app.settings.default_queue == "fromfile"
    assert app.settings.broker == "memory://"  # the argument over the environment
    # given settings are the app's whole configuration, the arguments over them
    given = App("demo", broker="memory://", settings=Settings(backend="memory://"))
    assert given.settings.concurrency == 8 and given.settings.broker == "memory://"
    with pytest.raises(ConfigError, match="STREAMTASKS_CONCURRENCY"):
        monkeypatch.setenv("STREAMTASKS_CONCURRENCY", "many")
        App("demo", broker="memory://", backend="memory://")


# -- secrets -----------------------------------------------------------------------------


def test_passwords_are_secret_in_repr_and_reach_the_clients() -> None:
    settings = Settings.from_env(env={"STREAMTASKS_BROKER_PASSWORD": SECRET,
                                      "STREAMTASKS_BACKEND_PASSWORD": SECRET,
                                      "STREAMTASKS_BROKER": f"kafka://app:{SECRET}@k:9092"
                                                            f"?sasl.password={SECRET}"})
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
    assert settings.broker_password is not None
    assert settings.broker_password.get_secret_value() == SECRET
    broker = KafkaBroker("kafka://k:9092", settings)  # builds its client config only
    assert broker._common["sasl.password"] == SECRET
    options = CassandraOptions.from_url("cassandra://db:9042/ks", settings)
    assert options.password == SECRET
    assert SECRET not in repr(options)


@pytest.mark.parametrize("url", [
    f"kafka://app:{SECRET}@k:notaport",  # a bad port
    f"kafka://app:{SECRET}/x@k:9092",  # a password with a slash: not even a host
    f"cassandra://app:{SECRET}:@db:x/ks",  # a password with a colon, a bad port
    f"kafak://app:{SECRET}@k:9092",  # an unknown scheme
    f"kafka://k:bad?sasl.password={SECRET}",  # a secret option
])
def test_a_malformed_url_never_shows_its_password(url: str) -> None:
    name = "backend" if url.startswith("cassandra") else "broker"
    with pytest.raises(ConfigError) as caught:
        Settings(**{name: url})
    with pytest.raises(ConfigError) as from_env:
        Settings.from_env(env={f"STREAMTASKS_{name.upper()}": url})
    for err in (caught.value, from_env.value):
        assert SECRET not in str(err)
    assert name in str(from_env.value)


def test_a_bad_password_value_and_a_bad_yaml_line_hide_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="broker_password") as caught:
        Settings.build({"broker_password": ["x", SECRET]})
    assert SECRET not in str(caught.value)
    path = _yaml(tmp_path, f"backend: cassandra://u:{SECRET}@db/ks\n  bad: [\n")
    with pytest.raises(ConfigError, match="not valid YAML") as bad_yaml:
        Settings.from_env(env={}, config_file=path)
    assert SECRET not in str(bad_yaml.value)


@pytest.mark.parametrize(("name", "url"), [
    ("backend", f"kafka://app:{SECRET}@k:9092"),  # the broker's URL given as the backend
    ("broker", f"cassandra://app:{SECRET}@db:9042/ks"),  # and the other way round
])
def test_a_url_of_the_other_service_is_refused_by_name_without_its_password(
    name: str, url: str
) -> None:
    for build in (lambda: Settings(**{name: url}),
                  lambda: Settings.from_env(env={f"STREAMTASKS_{name.upper()}": url})):
        with pytest.raises(ConfigError, match=name) as caught:
            build()
        assert SECRET not in str(caught.value)
