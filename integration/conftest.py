"""Integration fixtures: the real Kafka and Cassandra, schema migrated once per run."""

from __future__ import annotations

import pytest

from integration._workers import worker_env
from streamtasks import App, Settings


@pytest.fixture(scope="session", autouse=True)
def migrated_keyspace() -> None:
    """Apply the CQL migrations to the backend keyspace (fails, never skips, when down)."""
    app = App("it-migrate", settings=Settings.from_env(env=worker_env("it-migrate")))
    try:
        app.backend.migrate()
    finally:
        app.close()
