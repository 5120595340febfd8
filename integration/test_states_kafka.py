"""States and results on the real Kafka and Cassandra: STARTED while running, PENDING on
send, a saved group restored by another app, forget."""

from __future__ import annotations

import time

import pytest

from integration._workers import make_app, new_namespace, worker_env, workers
from streamtasks import GroupResult, group, states
from streamtasks.backend.base import PROGRESS_PREFIX
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration


def _until_state(result: object, state: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        seen = result.state  # type: ignore[attr-defined]
        if seen == state:
            return seen
        time.sleep(0.05)
    return seen


@pytest.mark.timeout(240)
def test_a_long_task_reads_started_and_short_ones_write_no_progress() -> None:
    env = worker_env(new_namespace("states"), STREAMTASKS_TRACK_PENDING="true")
    app = make_app(env)
    try:
        long = app.send("it.sleep", args=[4000, 7])
        short = [app.send("it.add", args=[i, i]) for i in range(20)]
        app.flush()
        pending = long.meta()
        assert pending is not None and pending.state == states.PENDING  # before any worker
        assert pending.name == "it.sleep"
        with workers(env, 1):
            assert _until_state(long, states.STARTED, 60) == states.STARTED
            running = long.meta()
            assert running is not None and running.worker and running.started_ms
            assert long.get(timeout=60) == 7
            assert [r.get(timeout=60) for r in short] == [2 * i for i in range(20)]
        final = long.meta()
        assert final is not None and final.state == states.SUCCESS and final.result == 7
        for result in short:
            meta = result.meta()
            assert meta is not None and meta.state == states.SUCCESS
            # the final row replaced the PENDING entry of the send (it is not merged)
            assert PROGRESS_PREFIX + states.PENDING not in meta.extra
    finally:
        app.close()


@pytest.mark.timeout(240)
def test_a_saved_group_is_restored_by_another_app_and_forgotten() -> None:
    env = worker_env(new_namespace("groups"))
    sender, reader = make_app(env), make_app(env)
    try:
        members = [Signature("it.add", (i, i)) for i in range(4)]
        sent = group(members).apply_async(app=sender)
        assert isinstance(sent, GroupResult)
        sent.save()
        sender.flush()
        with workers(env, 1):
            restored = reader.group_result(sent.id)
            assert restored is not None and len(restored) == 4
            assert restored.get(timeout=90) == [0, 2, 4, 6]
        assert restored.results[0].date_done is not None
        assert restored.results[0].name == "it.add"
        restored.forget()
        assert reader.group_result(sent.id) is None
        assert reader.result(restored.results[0].id).state == states.PENDING
        assert reader.group_result("never-saved") is None
    finally:
        sender.close()
        reader.close()
