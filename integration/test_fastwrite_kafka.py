"""A worker drains tasks on real Kafka + Cassandra with either row writer (``writer=``).

The rest of the suite runs on the default writer (acsylla where installed); this names
each one in the backend URL, so the other is exercised by a whole worker too.

Every result is in Cassandra as SUCCESS (read with cassandra-driver, as an operator
would) and the group's committed offsets reach the high watermark.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import pytest

from integration._gate import Gate
from integration._rows import Rows
from integration._services import backend_url
from integration._workers import (
    make_app,
    new_namespace,
    wait_committed_to_high,
    worker_env,
    workers,
)
from streamtasks import states

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
@pytest.mark.parametrize("writer", ["acsylla", "cassandra-driver"])
def test_a_worker_with_either_writer_drains_every_task(writer: str) -> None:
    url = backend_url()
    env = worker_env(new_namespace("fastw"),
                     STREAMTASKS_BACKEND=url + ("&" if "?" in url else "?") + f"writer={writer}")
    app = make_app(env)
    assert app.backend.options.writer == writer  # type: ignore[attr-defined]
    app.ensure_queue("default")
    sent = [app.send("it.add", args=[i, i]) for i in range(600)]
    app.flush()
    with workers(env, 1):
        # results read back through the app (its backend writes with that writer too)
        assert [r.get(timeout=180) for r in sent[:5]] == [0, 2, 4, 6, 8]
        wait_committed_to_high(
            [(app.settings.group_id("default"), app.settings.topic("default"))], timeout_s=180)
    rows = Rows()
    try:
        counts = rows.wait_states([r.id for r in sent], states.SUCCESS, timeout_s=60)
    finally:
        rows.cluster.shutdown()
    assert (counts[states.SUCCESS], counts["missing-or-other"]) == (len(sent), 0)
    assert [r.get(timeout=30) for r in sent] == [2 * i for i in range(len(sent))]
    app.close()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(300)
def test_a_worker_whose_cassandra_goes_away_keeps_every_task_and_leaks_nothing() -> None:
    # Given a worker (default writer) reaching Cassandra through a gate, up and idle
    node = urlsplit(backend_url())
    gate = Gate((node.hostname or "127.0.0.1", node.port or 9042))
    gate.open()
    url = f"cassandra://127.0.0.1:{gate.port}{node.path}"
    env = worker_env(new_namespace("fwgate"), STREAMTASKS_BACKEND=url)
    app = make_app(env)
    app.ensure_queue("default")
    rows = Rows()
    try:
        with workers(env, 1) as (worker,):
            warm = app.send("it.add", args=[1, 1])
            app.flush()
            assert rows.wait_states([warm.id], states.SUCCESS, timeout_s=120)[
                states.SUCCESS] == 1
            # When Cassandra goes away and tasks arrive (the row writer's first batch)
            gate.shut()
            sent = [app.send("it.add", args=[i, i]) for i in range(300)]
            app.flush()
            time.sleep(10)  # the worker retries its batches (backoff up to 5 s)
            before = _open_fds(worker.proc.pid)
            time.sleep(20)
            grown = _open_fds(worker.proc.pid) - before
            assert worker.proc.poll() is None, "the worker died"
            # Then nothing leaks while it retries, and once Cassandra is back every task
            # is written and every offset committed
            gate.open()
            wait_committed_to_high(
                [(app.settings.group_id("default"), app.settings.topic("default"))],
                timeout_s=180)
        counts = rows.wait_states([r.id for r in sent], states.SUCCESS, timeout_s=60)
        assert (counts[states.SUCCESS], counts["missing-or-other"]) == (len(sent), 0)
        assert grown <= 20, f"{grown} more file descriptors in 20 s of outage"
    finally:
        rows.cluster.shutdown()
        gate.shut()
        app.close()
