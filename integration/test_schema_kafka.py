"""A worker on a keyspace nobody migrated refuses to start, and says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from integration._services import REPO, backend_url
from integration._workers import new_namespace, worker_env


@pytest.mark.timeout(120)
def test_a_worker_on_an_unmigrated_keyspace_exits_2_and_names_streamtasks_migrate() -> None:
    keyspace = f"never_migrated_{uuid.uuid4().hex[:8]}"
    url = backend_url().rsplit("/", 1)[0] + "/" + keyspace
    env = worker_env(new_namespace("schema"), STREAMTASKS_BACKEND=url)
    done = subprocess.run(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
         "integration.worker_app:app", "--queues", "default"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run `streamtasks migrate`" in done.stderr
    assert "Traceback" not in done.stderr
