"""On the real cluster the defaults give three replicas; a worker sees them, and refuses RF 1."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from cluster._cluster import BACKEND_URL, NODES, cluster_env, drop_keyspace, keyspace_replication
from integration._services import REPO
from integration._workers import make_app
from streamtasks.durability import check_durability, observe

pytestmark = pytest.mark.integration


def run_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a worker of the default queue; it is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
         "integration.worker_app:app", "--queues", "default"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=90, check=False)


def test_the_cluster_is_seen_as_three_brokers_and_a_keyspace_of_three_replicas() -> None:
    app = make_app(cluster_env("seen"))
    try:
        view = observe(app.broker, app.backend)
        assert view.brokers == NODES
        assert view.store is not None and view.store.nodes == NODES
        assert view.store.replication["replication_factor"] == str(NODES)
        assert check_durability(app.settings, view) == []
    finally:
        app.close()


@pytest.mark.timeout(120)
def test_a_worker_with_topics_of_one_replica_refuses_to_start_on_the_cluster() -> None:
    proc = run_worker(cluster_env("rf1", STREAMTASKS_REPLICATION_FACTOR="1"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "setting replication_factor is 1 on a Kafka cluster of 3 brokers" in (
        proc.stdout + proc.stderr)


@pytest.mark.timeout(120)
def test_a_worker_refuses_a_queue_topic_created_with_one_replica_on_the_cluster() -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    from cluster._cluster import BOOTSTRAP

    env = cluster_env("rf1topic")
    topic = make_app(env).settings.topic("default")
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(topic, 6, 1)])[topic].result(timeout=60)
    proc = run_worker(env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"topic {topic} has one replica on a Kafka cluster of 3 brokers" in (
        proc.stdout + proc.stderr)


def topic_replication(topics: list[str]) -> dict[str, tuple[set[int], str, str]]:
    """Per topic: the replica counts of its partitions, its min.insync.replicas and source."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    from cluster._cluster import BOOTSTRAP

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    meta = admin.list_topics(timeout=30).topics
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    found = {}
    for resource, future in admin.describe_configs(resources).items():
        entry = future.result(timeout=60)["min.insync.replicas"]
        replicas = {len(p.replicas) for p in meta[resource.name].partitions.values()}
        found[resource.name] = (replicas, entry.value, entry.source)
    return found


@pytest.mark.timeout(420)
def test_the_default_settings_give_new_topics_and_a_new_keyspace_three_replicas() -> None:
    from confluent_kafka.admin import ConfigSource

    from streamtasks.control import ensure_control_topic

    # Given the library's defaults: no replication setting, no URL option
    env = cluster_env("defaults")
    keyspace = f"st_auto_{uuid.uuid4().hex[:8]}"
    env["STREAMTASKS_BACKEND"] = BACKEND_URL.replace("/streamtasks", f"/{keyspace}")
    assert "REPLICATION" not in "".join(env) and "?" not in env["STREAMTASKS_BACKEND"]
    app = make_app(env)
    try:
        # When a new queue's topics are created and a new keyspace is migrated
        app.ensure_queue("fresh")
        ensure_control_topic(app)
        app.backend.migrate()
        # Then every topic has 3 replicas and min.insync.replicas 2 set on the topic
        topics = [*app.settings.topology.topics("fresh"), app.settings.topology.control_topic()]
        found = topic_replication(topics)
        assert set(found) == set(topics)
        for topic, (replicas, insync, source) in found.items():
            assert replicas == {NODES}, (topic, replicas)
            assert (insync, source) == ("2", ConfigSource.DYNAMIC_TOPIC_CONFIG.value), topic
        # and the keyspace 3 replicas
        replication = keyspace_replication(keyspace)
        assert replication["class"].endswith("SimpleStrategy"), replication
        assert replication["replication_factor"] == str(NODES)
        # and a worker start finds nothing to warn about
        view = observe(app.broker, app.backend, [app.settings.topic("fresh")])
        assert view.topic_replicas == {app.settings.topic("fresh"): NODES}
        assert check_durability(app.settings, view) == []
    finally:
        app.close()
        drop_keyspace(keyspace)
