"""On the real cluster a worker sees three brokers and three replicas, and refuses RF 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster._cluster import NODES, cluster_env
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
