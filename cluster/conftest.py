"""Fault tests on the three-node cluster (``make test-cluster``).

Every test here talks to the cluster of ``services.sh --nodes 3``: the environment is
pointed at it before any test runs, workers inherit it. If the cluster cannot start,
every test fails (never skips).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster._cluster import (
    BACKEND_URL,
    BROKER_URL,
    NODES,
    cassandra_nodes_up,
    cluster_env,
    keyspace_replication,
    services,
)

# Read lazily by integration._services (broker_url / backend_url) and by the workers.
os.environ["STREAMTASKS_BROKER"] = BROKER_URL
os.environ["STREAMTASKS_BACKEND"] = BACKEND_URL


@pytest.fixture(scope="session", autouse=True)
def cluster_up() -> None:
    """Start the cluster (a no-op when it runs) and migrate the keyspace with RF 3."""
    try:
        services("up", timeout=600)
    except Exception as err:  # any failure to start fails the suite
        pytest.fail(f"the 3-node cluster did not start: {err}")
    from streamtasks import App, Settings

    app = App("cluster-migrate", settings=Settings.from_env(env=cluster_env("migrate")))
    try:
        app.backend.migrate()
    finally:
        app.close()
    replication = keyspace_replication("streamtasks")
    assert replication.get("replication_factor") == "3", (
        f"keyspace streamtasks is replicated {replication}, not 3: "
        "services.sh --nodes 3 clean-data and run again")


@pytest.fixture(autouse=True)
def all_nodes_back() -> Iterator[None]:
    """Whatever a test killed is started again before the next one."""
    yield
    services("up", timeout=600)
    assert cassandra_nodes_up() == NODES
