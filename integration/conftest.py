"""Integration fixtures: the real Kafka and Cassandra, schema migrated once per run."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from integration._services import kafka_bootstrap
from integration._workers import worker_env
from streamtasks import App, Settings

#: Name prefixes of the topics the suite creates (fresh namespaces per test, probes).
RUN_TOPIC_PREFIXES = ("it-", "it.", "streamtasks.smoke.")


@pytest.fixture(scope="session", autouse=True)
def migrated_keyspace() -> None:
    """Apply the CQL migrations to the backend keyspace (fails, never skips, when down)."""
    app = App("it-migrate", settings=Settings.from_env(env=worker_env("it-migrate")))
    try:
        app.backend.migrate()
    finally:
        app.close()


@pytest.fixture(scope="session", autouse=True)
def topics_of_the_run_deleted() -> Iterator[None]:
    """Delete the topics this run created when it ends.

    Each test makes fresh namespaces (a queue, its delay tiers, dead letters, control:
    dozens of partitions each); kept, a developer's long-lived Kafka held 5,055
    partitions after a few runs, and its heap and start-up grow with them. Topics that
    were there before the run are left alone; a failed delete is reported, not fatal.
    """
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    before = set(admin.list_topics(timeout=30).topics)
    yield
    try:
        created = sorted(t for t in admin.list_topics(timeout=30).topics
                         if t not in before and t.startswith(RUN_TOPIC_PREFIXES))
        for start in range(0, len(created), 200):
            futures = admin.delete_topics(created[start:start + 200], operation_timeout=60)
            for future in futures.values():
                future.result()
    except Exception as err:  # the run's verdict stands without it
        print(f"\ncould not delete the topics this run created: {err}", file=sys.stderr)
