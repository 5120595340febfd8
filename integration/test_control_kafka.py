"""Periodic tasks, revokes, rate limits and time limits on the real Kafka and Cassandra.

Workers run ``integration/control_app.py``. Durations are asserted only as lower bounds
(a rate limit's promise); revoke latency is printed, not asserted.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from integration._workers import (
    WorkerProcess,
    exec_lines,
    make_app,
    new_namespace,
    stop_all,
    wait_groups_settled,
    wait_lines,
    worker_env,
)
from streamtasks import App, chain, states
from streamtasks.ratelimit import MEMBERS_REFRESH_S
from streamtasks.schedules import Schedule
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration

CONTROL_APP = "integration.control_app:app"


def _workers(env: dict[str, str], count: int, queues: str, *extra: str,
             concurrency: int = 8) -> list[WorkerProcess]:
    return [WorkerProcess(env, queues, concurrency, app=CONTROL_APP, extra=extra)
            for _ in range(count)]


def _wait_final(app: App, ids: list[str], timeout_s: float) -> dict[str, str]:
    """Wait until every id has a final row; return id -> state."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        missing = [i for i in ids if i not in found]
        for start in range(0, len(missing), 200):
            part = missing[start:start + 200]
            for task_id, meta in zip(part, app.backend.fetch_many(part), strict=True):
                if meta is not None and meta.ready:
                    found[task_id] = meta.state
        if len(found) == len(ids):
            return found
        time.sleep(0.3)
    raise AssertionError(f"{len(ids) - len(found)} of {len(ids)} tasks not final in "
                         f"{timeout_s}s")


def _sig(app: App, name: str, *args: object) -> Signature:
    return Signature(name, args, app=app)


@pytest.mark.timeout(400)
def test_three_workers_fire_each_due_time_once_with_one_killed_halfway(
    tmp_path: Path,
) -> None:
    # Given three workers firing a schedule every 2 s (they serve no queue of it) and a
    # fourth that runs the fired tasks without firing (so a kill repeats no execution)
    log = tmp_path / "exec.log"
    namespace = new_namespace("beat")
    env = worker_env(namespace, IT_EXEC_LOG=str(log), IT_SCHEDULE_EVERY="2")
    app = make_app(env)
    schedule = Schedule("it.tick", "ctl.tick", "ticks", every_s=2, scope=namespace)
    firing = _workers(env, 3, "other")
    runner = _workers(env, 1, "ticks", "--no-beat")
    procs = firing + runner
    try:
        wait_lines(log, 1, 120)  # the first due time fired and ran: everyone is up
        began = time.time()
        # When one firing worker is SIGKILLed halfway through 30 s
        time.sleep(15)
        firing[0].kill()
        time.sleep(15)
        ended = time.time()
        stop_all(firing)
        # the runner ends every fired task before we count
        fired_ids = [line.split(":", 1)[1] for line in exec_lines(log)]
        dues = schedule.dues(int(began * 1000), int(ended * 1000) - 4000)
        _wait_final(app, [schedule.task_id(d) for d in dues], 60)
    finally:
        stop_all(procs)
    # Then every due time of the window ran exactly once; nothing ran twice
    executions = Counter(line.split(":", 1)[1] for line in exec_lines(log))
    assert len(dues) >= 12
    missing = [d for d in dues if executions[schedule.task_id(d)] == 0]
    assert missing == [], f"due times not fired: {missing}"
    assert max(executions.values()) == 1, [i for i, n in executions.items() if n > 1]
    known = {schedule.task_id(d) for d in schedule.dues(int(began * 1000) - 600_000,
                                                        int(time.time() * 1000))}
    assert set(fired_ids) <= known  # every task fired belongs to one due time
    app.close()


@pytest.mark.timeout(400)
def test_500_of_1000_tasks_queued_behind_a_slow_one_are_revoked_and_never_run(
    tmp_path: Path,
) -> None:
    log = tmp_path / "exec.log"
    env = worker_env(new_namespace("revoke"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    procs = _workers(env, 1, "default", concurrency=1)
    try:
        # Given one worker thread held by a slow task, and 1,000 tasks behind it
        app.send("ctl.slow", [20_000], key="one", confirm=True)
        wait_lines(log, 1, 120)
        results = [app.send("ctl.count", [i], key="one") for i in range(1000)]
        app.flush()
        # When 500 of them are revoked
        revoked = [r.id for r in results[::2]]
        app.revoke(revoked)
        states_by_id = _wait_final(app, [r.id for r in results], 240)
    finally:
        stop_all(procs)
    # Then none of those ran and all read REVOKED; the others ran once
    ran = Counter(exec_lines(log))
    assert all(ran[str(i)] == 0 for i in range(0, 1000, 2))
    assert all(ran[str(i)] == 1 for i in range(1, 1000, 2))
    assert {states_by_id[i] for i in revoked} == {states.REVOKED}
    assert {states_by_id[r.id] for r in results[1::2]} == {states.SUCCESS}
    app.close()


@pytest.mark.timeout(400)
def test_a_revoked_countdown_task_and_a_revoked_chain_never_run(tmp_path: Path) -> None:
    log = tmp_path / "exec.log"
    env = worker_env(new_namespace("revoke2"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    procs = _workers(env, 1, "default")
    try:
        later = app.send("ctl.count", [1], countdown=5, confirm=True)
        later.revoke()
        # a chain whose first step is running when it is revoked: the rest stops
        steps = chain(_sig(app, "ctl.slow", 3000), _sig(app, "ctl.count", 2),
                      _sig(app, "ctl.count", 3)).apply_async()
        wait_lines(log, 1, 120)  # "slow" started
        steps.revoke()
        after = app.send("ctl.count", [4], countdown=5, confirm=True)  # not revoked
        final = _wait_final(app, [later.id, *[s.id for s in steps.steps], after.id], 120)
    finally:
        stop_all(procs)
    assert final[later.id] == states.REVOKED
    assert final[after.id] == states.SUCCESS
    assert [final[s.id] for s in steps.steps[1:]] == [states.REVOKED, states.REVOKED]
    assert sorted(exec_lines(log)) == ["4", "slow"]
    app.close()


@pytest.mark.timeout(300)
def test_revoke_latency_to_a_worker_terminating_a_running_task(tmp_path: Path) -> None:
    env = worker_env(new_namespace("latency"))
    app = make_app(env)
    procs = _workers(env, 1, "default")
    latencies_ms: list[int] = []
    try:
        for n in range(5):
            started = tmp_path / f"started-{n}"
            result = app.send("ctl.hold_async", [str(started)], confirm=True)
            deadline = time.monotonic() + 120
            while not started.exists():
                assert time.monotonic() < deadline, "the task did not start"
                time.sleep(0.05)
            revoked_at_ms = int(time.time() * 1000)
            result.revoke(terminate=True)
            final = _wait_final(app, [result.id], 60)
            assert final[result.id] == states.REVOKED
            meta = result.meta()
            assert meta is not None and meta.finished_ms is not None
            latencies_ms.append(meta.finished_ms - revoked_at_ms)
        # the worker goes on
        assert app.send("ctl.count", [7]).get(timeout=60) == 7
    finally:
        stop_all(procs)
    print(f"\nrevoke() -> worker terminated the task: median "
          f"{statistics.median(latencies_ms)} ms, max {max(latencies_ms)} ms "
          f"(5 revokes: {latencies_ms})")
    app.close()


@pytest.mark.timeout(400)
def test_a_group_rate_limit_holds_two_workers_while_they_serve_other_queues() -> None:
    env = worker_env(new_namespace("rate"))
    app = make_app(env)
    procs = _workers(env, 2, "limited,other")
    try:
        wait_groups_settled([app.settings.group_id("limited")], 2)
        time.sleep(MEMBERS_REFRESH_S * 2)  # both workers counted the group's members
        began_ms = int(time.time() * 1000)
        limited = [app.send("ctl.limited", [i], queue="limited") for i in range(200)]
        app.flush()
        time.sleep(2)  # the limited tasks are waiting for tokens now
        others = [app.send("ctl.other", [i], queue="other") for i in range(20)]
        app.flush()
        _wait_final(app, [o.id for o in others], 60)
        others_done_ms = int(time.time() * 1000)
        _wait_final(app, [r.id for r in limited], 240)
        rows = app.backend.fetch_many([r.id for r in limited])
    finally:
        stop_all(procs)
    finished = [m.finished_ms for m in rows if m is not None and m.finished_ms is not None]
    assert len(finished) == 200
    took_s = (max(finished) - began_ms) / 1000
    print(f"\n200 tasks at group_rate_limit 20/s on two workers took {took_s:.1f} s")
    assert took_s >= 10  # 20/s for the group: 200 take at least 10 s
    assert others_done_ms < max(finished)  # the other queue was served meanwhile
    app.close()


@pytest.mark.timeout(300)
def test_a_sync_task_past_its_time_limits_is_killed_or_cleans_up(tmp_path: Path) -> None:
    env = worker_env(new_namespace("limits"))
    app = make_app(env)
    procs = _workers(env, 1, "default")
    marker = tmp_path / f"tidy-{uuid.uuid4().hex}"
    try:
        stuck = app.send("ctl.spin", [], confirm=True)
        tidy = app.send("ctl.tidy", [str(marker)], confirm=True)
        final = _wait_final(app, [stuck.id, tidy.id], 120)
        after = app.send("ctl.count", [5]).get(timeout=60)  # the worker goes on
    finally:
        stop_all(procs)
    meta = stuck.meta()
    assert final[stuck.id] == states.FAILURE
    assert meta is not None and meta.error_type == "TimeLimitExceeded"
    assert final[tidy.id] == states.SUCCESS and tidy.get(timeout=5) == "cleaned up"
    assert marker.read_text() == "cleaned up"
    assert after == 5
    app.close()


def test_schedule_claims_and_revokes_on_cassandra() -> None:
    app = make_app(worker_env(new_namespace("claims")))
    backend, schedule = app.backend, f"s-{uuid.uuid4().hex}"
    try:
        first = backend.claim_fire(schedule, 2000, "dead", 60)
        assert first.claimer == "dead" and not first.sent
        assert backend.claim_fire(schedule, 2000, "late", 60).claimer == "dead"  # LWT lost
        # an unsent claim is taken over once, from its holder only
        assert backend.take_over_fire(schedule, 2000, "alive", "dead", 60)
        assert not backend.take_over_fire(schedule, 2000, "other", "dead", 60)
        backend.fire_sent(schedule, 2000, 60)
        assert not backend.take_over_fire(schedule, 2000, "other", "alive", 60)
        claim = backend.fire_claim(schedule, 2000)
        assert claim is not None and claim.claimer == "alive" and claim.sent
        backend.claim_fire(schedule, 4000, "alive", 60)
        assert backend.last_fire(schedule) == 4000
        assert backend.fire_claim(schedule, 6000) is None
        ids = [f"r-{uuid.uuid4().hex}" for _ in range(3)]
        backend.store_revoked(ids[:2], True, 60)
        assert backend.revoked(ids) == {ids[0]: True, ids[1]: True}
    finally:
        app.close()
