"""Periodic tasks, revokes, rate limits and time limits on memory:// (fast, no servers).

The same promises against real Kafka and Cassandra: ``integration/test_control_kafka.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from streamtasks import App, Settings, states
from streamtasks.backend.memory import MemoryBackend
from streamtasks.broker.memory import MemoryBroker
from streamtasks.errors import ConfigError
from streamtasks.ratelimit import Limit, RateGate, parse_rate
from streamtasks.schedules import Schedule, Scheduler, scoped
from streamtasks.worker.consumer import Worker
from streamtasks.worker.observe import NullObserver
from tests import control_tasks

MINUTE_MS = 60_000


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def _wait(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s")
        time.sleep(0.02)


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """Run ``worker`` in a thread; stop and join it at the end."""
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False},
                              daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"


def _row_state(app: App, task_id: str) -> str | None:
    meta = app.backend.fetch(task_id)
    return None if meta is None else meta.state


# -- schedules: due times ------------------------------------------------------------


def test_every_due_times_are_multiples_of_the_period_since_the_epoch() -> None:
    s = Schedule("s", "t", "q", every_s=2)
    assert s.next_due_ms(1001) == 2000
    assert s.next_due_ms(2000) == 4000  # strictly after
    assert s.dues(1000, 9000) == [2000, 4000, 6000, 8000]
    assert s.dues(0, 20_000, limit=3) == [16_000, 18_000, 20_000]


def test_cron_is_read_in_its_time_zone_and_dst_is_the_library_s() -> None:
    berlin = Schedule("b", "t", "q", cron="0 9 * * *", tz="Europe/Berlin")
    # 09:00 in Berlin is 08:00 UTC in winter, 07:00 UTC in summer
    assert berlin.next_due_ms(_ms("2026-01-10T12:00:00+00:00")) == _ms("2026-01-11T08:00:00+00:00")
    assert berlin.next_due_ms(_ms("2026-07-10T12:00:00+00:00")) == _ms("2026-07-11T07:00:00+00:00")
    # 02:30 does not exist on 2026-03-29 in Berlin: fired once that day, at 03:00 local
    spring = Schedule("sp", "t", "q", cron="30 2 * * *", tz="Europe/Berlin")
    day = spring.dues(_ms("2026-03-28T23:00:00+00:00"), _ms("2026-03-29T22:00:00+00:00"))
    assert day == [_ms("2026-03-29T03:00:00+02:00")]
    # 02:30 happens twice on 2026-10-25: fired once
    autumn = spring.dues(_ms("2026-10-24T23:00:00+00:00"), _ms("2026-10-25T22:00:00+00:00"))
    assert len(autumn) == 1


def test_a_due_time_has_one_task_id_everywhere() -> None:
    a = Schedule("report", "t", "q", every_s=60)
    b = Schedule("report", "t", "other", every_s=60)
    assert a.task_id(60_000) == b.task_id(60_000)
    assert a.task_id(60_000) != a.task_id(120_000)
    assert a.task_id(60_000) != Schedule("other", "t", "q", every_s=60).task_id(60_000)
    # another namespace sharing the keyspace has its own ids (and claims)
    elsewhere = Schedule("report", "t", "q", every_s=60, scope="staging")
    assert elsewhere.task_id(60_000) != a.task_id(60_000) and elsewhere.key != a.key


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", [10 * MINUTE_MS]),
    ("all", [m * MINUTE_MS for m in range(2, 11)]),
    ("none", []),
])
def test_catch_up_after_downtime_follows_the_policy(policy: str, expected: list[int]) -> None:
    s = Schedule("s", "t", "q", every_s=60, catch_up=policy)
    # last fired at minute 1; back at minute 10 + 30 s: minutes 2..10 were missed
    assert s.to_fire(MINUTE_MS, 10 * MINUTE_MS + 30_000) == expected
    # a due time on time fires whatever the policy
    assert s.to_fire(10 * MINUTE_MS, 11 * MINUTE_MS + 1000) == [11 * MINUTE_MS]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"cron": "61 * * * *"}, "bad cron expression"),
    ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
    ({"cron": "* * * * *", "every_s": 5}, "exactly one"),
    ({}, "exactly one"),
    ({"every_s": 0.5}, "at least 1 second"),
    ({"every_s": 5, "catch_up": "some"}, "catch_up must be one of"),
])
def test_a_bad_schedule_is_refused_when_declared(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Schedule("s", "t", "q", **kwargs)


def test_periodic_registers_the_task_and_checks_its_arguments(app: App) -> None:
    @app.periodic(every=timedelta(seconds=30), args=(2,), name="twice")
    def double(x: int) -> int:
        return 2 * x

    assert app.schedules["twice"].task == double.name
    assert app.tasks[double.name] is double
    with pytest.raises(Exception, match="argument"):
        app.periodic(every=30, args=(1, 2, 3))(control_tasks.square)


# -- schedules: claims ------------------------------------------------------------


def _apps(count: int) -> list[App]:
    """Apps sharing one memory broker and backend, as workers share Kafka and Cassandra."""
    settings = Settings(broker="memory://", backend="memory://", partitions=3)
    broker, backend = MemoryBroker(settings), MemoryBackend()
    apps = [App(f"a{i}", broker=broker, backend=backend, settings=settings)
            for i in range(count)]
    for app in apps:
        app.periodic(every=2, args=(3,), name="sq")(control_tasks.square)
    return apps


def test_schedulers_racing_for_due_times_send_each_once() -> None:
    apps = _apps(3)
    schedulers = [Scheduler(app, f"w{i}") for i, app in enumerate(apps)]
    start = 1_000_000_000_000
    sent: list[str] = []
    for now in range(start, start + 30_000, 500):  # 30 s of turns, every 0.5 s
        for scheduler in schedulers[(now // 500) % 3:] + schedulers[:(now // 500) % 3]:
            sent += scheduler.tick(now)
    dues = apps[0].schedules["sq"].dues(start, start + 29_500)
    assert len(dues) == 14  # every 2 s in (start, start + 29.5 s]
    [schedule] = scoped(apps[0], apps[0].schedules.values())
    assert sorted(sent) == sorted(schedule.task_id(d) for d in dues)
    records = apps[0].broker.records(apps[0].settings.topic("default"))  # type: ignore[attr-defined]
    assert len(records) == 14
    assert sum(len(sch.fired) for sch in schedulers) == 14
    assert all(sch.fired for sch in schedulers)  # the race was real: each won some


def test_a_claim_whose_send_never_came_is_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    [app] = _apps(1)
    [schedule] = scoped(app, app.schedules.values())
    scheduler = Scheduler(app, "alive")
    scheduler.tick(10_000)  # cursor at 10 s
    # a scheduler that died after claiming 12 s and before sending it
    app.backend.claim_fire(schedule.key, 12_000, "dead", 60)
    assert scheduler.tick(12_100) == []
    monkeypatch.setattr("streamtasks.schedules.time.monotonic", lambda: time.time() + 3600)
    assert scheduler.tick(12_600) == [schedule.task_id(12_000)]
    claim = app.backend.fire_claim(schedule.key, 12_000)
    assert claim is not None and claim.claimer == "alive" and claim.sent


def test_a_scheduler_catches_up_from_the_last_due_time_fired() -> None:
    [app] = _apps(1)
    app.settings = app.settings.replace(namespace="prod")  # as --namespace does
    [schedule] = scoped(app, app.schedules.values())
    key = schedule.key
    assert key == "prod/sq"  # scoped by the app's namespace when the scheduler starts
    app.backend.claim_fire(key, 10_000, "before", 60)
    app.backend.fire_sent(key, 10_000, 60)
    # back at 70 s: 12 s .. 64 s were missed and are skipped ("latest": the newest
    # missed one fires only when none is on time); 66, 68 and 70 s are on time
    fired = Scheduler(app, "new").tick(70_000)
    assert fired == [schedule.task_id(due) for due in (66_000, 68_000, 70_000)]


def test_a_worker_fires_its_app_s_schedules(app: App) -> None:
    from streamtasks.metrics import WorkerMetrics

    app.periodic(every=1, args=(4,), name="sq1")(control_tasks.square)
    metrics = WorkerMetrics()
    with running(app.worker(observer=metrics)) as worker:
        _wait(lambda: any(_row_state(app, i) == states.SUCCESS
                          for i in worker_fired(worker)), 30)
    fired = metrics.registry.get_sample_value("streamtasks_schedules_fired_total",
                                              {"schedule": "sq1"})
    assert fired is not None and fired >= 1


def worker_fired(worker: Worker) -> list[str]:
    """Task ids fired by the worker's scheduler (read from the app's result rows)."""
    [schedule] = scoped(worker.app, [worker.app.schedules["sq1"]])
    now = int(time.time() * 1000)
    return [schedule.task_id(d) for d in schedule.dues(now - 10_000, now)]


# -- revoke ------------------------------------------------------------------------


def _recording(app: App) -> tuple[Any, list[int]]:
    ran: list[int] = []

    @app.task(name="rec")
    def rec(i: int) -> int:
        ran.append(i)
        return i

    return rec, ran


def test_a_revoked_task_ends_revoked_without_running(app: App) -> None:
    rec, ran = _recording(app)
    results = [rec.delay(i) for i in range(10)]
    app.revoke([r.id for r in results[::2]])
    results[1].revoke()
    app.drain()
    assert sorted(ran) == [3, 5, 7, 9]
    assert [r.state for r in results] == [states.REVOKED] * 2 + [
        states.SUCCESS if i % 2 and i != 1 else states.REVOKED for i in range(2, 10)]


def test_a_revoked_countdown_task_never_runs(app: App) -> None:
    rec, ran = _recording(app)
    later = rec.apply_async((1,), countdown=1)
    now = rec.delay(2)
    later.revoke()
    app.drain(timeout_s=20)
    _wait(lambda: later.state == states.REVOKED, 20)
    assert ran == [2] and now.state == states.SUCCESS


def test_revoking_a_chain_stops_it(app: App) -> None:
    ran: list[int] = []

    @app.task(name="add1")
    def add1(x: int) -> int:
        ran.append(x)
        return x + 1

    chain = (add1.s(1) | add1.s() | add1.s()).apply_async()
    chain.revoke()
    app.drain()
    assert ran == []
    assert [step.state for step in chain.steps] == [states.REVOKED] * 3


def test_revoking_a_group_revokes_its_members(app: App) -> None:
    from streamtasks import group

    rec, ran = _recording(app)
    result = group(rec.s(i) for i in range(4)).apply_async()
    result.revoke()
    app.drain()
    assert ran == [] and [r.state for r in result.results] == [states.REVOKED] * 4


def test_a_task_revoked_while_queued_behind_a_slow_one_does_not_start(app: App) -> None:
    rec, ran = _recording(app)
    worker = app.worker(concurrency=1)
    victim_id = "victim"

    @app.task(name="slow")
    def slow() -> None:
        app.revoke(victim_id)
        _wait(lambda: len(worker.revoked) > 0, 10)  # the broadcast reached the worker

    slow.apply_async(key="k")
    rec.apply_async((1,), key="k", task_id=victim_id)
    with running(worker):
        _wait(lambda: _row_state(app, victim_id) == states.REVOKED)
    assert ran == []


@pytest.mark.parametrize("fn", [control_tasks.hold_async, control_tasks.hold])
def test_terminate_stops_a_running_task(app: App, tmp_path: Path, fn: Any) -> None:
    pool = "thread" if fn is control_tasks.hold_async else "process"
    task = app.task(name="hold", pool=pool)(fn)
    other = app.task(name="sq")(control_tasks.square)
    started = tmp_path / "started"
    result = task.delay(str(started))
    with running(app.worker()):
        _wait(started.exists, 60)
        result.revoke(terminate=True)
        _wait(lambda: result.state == states.REVOKED, 30)
        assert other.delay(5).get(timeout=30) == 25  # the worker goes on
    meta = result.meta()
    assert meta is not None and meta.error_message == "terminated while running"


def test_revoke_refuses_bad_input(app: App) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        app.revoke([])
    for expires_s in (0, 8 * 86400):
        with pytest.raises(ConfigError, match="expires_s"):
            app.revoke("x", expires_s=expires_s)
    with pytest.raises(ConfigError, match="reserved"):
        app.settings.topology.check_queue("_control")


def test_cli_revoke_prints_each_id(capsys: pytest.CaptureFixture[str]) -> None:
    from streamtasks.cli import main

    assert main(["revoke", "--broker", "memory://", "--backend", "memory://", "a", "b"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["revoked a", "revoked b"]
    with pytest.raises(SystemExit) as exit_info:
        main(["revoke"])
    assert exit_info.value.code == 2


# -- rate limits --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "per_s"), [
    ("100/s", 100.0), ("30/m", 0.5), ("36/h", 0.01), ("5", 5.0), (2.5, 2.5), (None, None),
])
def test_rates_parse_as_celery_s(text: str | float | None, per_s: float | None) -> None:
    assert parse_rate(text) == per_s


@pytest.mark.parametrize("text", ["fast", "10/d", "0/s", "-1", "/s"])
def test_a_bad_rate_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="rate_limit"):
        parse_rate(text)


def test_the_gate_releases_at_the_rate_and_divides_a_group_rate() -> None:
    clock = [0.0]
    members = {"g": 2}
    gate: RateGate[int] = RateGate(lambda group: members[group], clock=lambda: clock[0])
    gate.limit("t", Limit(None, 20.0, "g"))  # 20/s for the group, 2 members: 10/s here
    try:
        from streamtasks.broker.base import TopicPartition

        tp = TopicPartition("x", 0)
        admitted = [i for i in range(30) if gate.admit("t", tp, i)]
        assert admitted == [] and gate.held() == {tp}
        released: list[int] = []
        for _ in range(20):  # two seconds
            clock[0] += 0.1
            released += gate.release()
        assert released == list(range(20))  # in order, 10 per second
        assert gate.drop([tp]) == list(range(20, 30)) and gate.held() == set()
    finally:
        gate.close()


class _Counting(NullObserver):
    def __init__(self) -> None:
        self.limited = 0

    def rate_limited(self, queue: str, name: str) -> None:
        self.limited += 1


def test_a_rate_limited_task_waits_for_tokens_while_others_run(app: App) -> None:
    limited = app.task(name="lim", rate_limit="20/s")(control_tasks.square)
    free = app.task(name="free", queue="other")(control_tasks.square)
    observer = _Counting()
    results = [limited.delay(i) for i in range(10)]
    began = time.monotonic()
    with running(app.worker(["default", "other"], observer=observer)) as worker:
        assert free.delay(7).get(timeout=30) == 49
        assert worker.rates.waiting > 0  # the free task ran while limited ones waited
        assert [r.get(timeout=30) for r in results] == [i * i for i in range(10)]
    assert time.monotonic() - began >= 10 / 20  # a lower bound: the limit's promise
    assert observer.limited > 0


# -- time limits -----------------------------------------------------------------------


def test_a_sync_task_past_its_time_limit_is_killed_and_the_worker_goes_on(app: App) -> None:
    spin = app.task(name="spin", pool="process", time_limit=2)(control_tasks.spin)
    square = app.task(name="sq", pool="process")(control_tasks.square)
    stuck = spin.delay()
    with running(app.worker()):
        _wait(lambda: stuck.state == states.FAILURE, 60)
        assert square.delay(6).get(timeout=60) == 36
    meta = stuck.meta()
    assert meta is not None and meta.error_type == "TimeLimitExceeded"
    assert "killed" in (meta.error_message or "")


def test_a_soft_time_limit_lets_the_task_clean_up(app: App, tmp_path: Path) -> None:
    tidy = app.task(name="tidy", pool="process", soft_time_limit=1, time_limit=30)(
        control_tasks.tidy)
    marker = tmp_path / "cleaned"
    result = tidy.delay(str(marker))
    with running(app.worker()):
        assert result.get(timeout=60) == "cleaned up"
    assert marker.read_text() == "cleaned up"


@pytest.mark.parametrize(("fn", "options", "words"), [
    (control_tasks.square, {"time_limit": 2}, "need pool='process'"),
    (control_tasks.hold_async, {"pool": "process"}, "for sync tasks"),
    (control_tasks.square, {"pool": "process", "time_limit": 2, "soft_time_limit": 2},
     "must be below"),
    (control_tasks.square, {"pool": "fork"}, "pool must be one of"),
    (control_tasks.square, {"pool": "process", "time_limit": 0}, "above 0"),
])
def test_time_limits_a_task_cannot_have_are_refused(
    app: App, fn: Any, options: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        app.task(**options)(fn)


def test_cli_schedules_lists_next_due_times_and_beat_needs_schedules(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from streamtasks.cli import main

    app = App("cli", broker="memory://", backend="memory://")
    app.periodic(every=60, args=(2,), name="sq")(control_tasks.square)
    empty = App("cli-empty", broker="memory://", backend="memory://")
    monkeypatch.setattr("streamtasks.cli._import_app",
                        lambda spec, *_: app if spec == "m:app" else empty)
    assert main(["schedules", "--app", "m:app", "--json", "--next", "2"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "sq" and row["when"] == "every 60s" and len(row["next"]) == 2
    assert row["next"][0].endswith(":00+00:00")  # due times on the minute
    assert main(["beat", "--app", "m:empty"]) == 2
    assert "no periodic task" in capsys.readouterr().err


def test_topics_create_makes_the_control_topic_and_no_listing_shows_it_as_a_queue(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from streamtasks.cli import main
    from streamtasks.ops.inspect import queues_of_topics

    flags = ["--broker", "memory://", "--backend", "memory://"]
    assert main(["topics", "create", "--queue", "q", *flags]) == 0
    assert "streamtasks._control: created (1 partitions)" in capsys.readouterr().out
    settings = Settings(broker="memory://", backend="memory://")
    topics = ["streamtasks.q", "streamtasks.q.dlq", "streamtasks._control"]
    assert queues_of_topics(settings, topics) == ["q"]


def test_a_task_revoked_while_waiting_for_its_retry_never_runs_again(app: App) -> None:
    from streamtasks.metrics import WorkerMetrics

    calls: list[int] = []

    @app.task(name="flaky", max_retries=5, backoff="fixed", backoff_s=1.0)
    def flaky() -> None:
        calls.append(1)
        raise ConnectionError("down")

    result = flaky.delay()
    metrics = WorkerMetrics()
    with running(app.worker(observer=metrics)):
        _wait(lambda: result.state == states.RETRY)  # the first attempt failed
        result.revoke()
        _wait(lambda: result.state == states.REVOKED)
    assert calls == [1]  # the retry came back from its delay tier and was not run
    revoked = metrics.registry.get_sample_value(
        "streamtasks_revoked_total", {"queue": "default", "name": "flaky"})
    assert revoked == 1


def test_a_time_limited_task_is_retried_by_its_policy_then_fails(app: App) -> None:
    spin = app.task(name="spin", pool="process", time_limit=1, max_retries=1,
                    backoff="fixed", backoff_s=0.1)(control_tasks.spin)
    result = spin.delay()
    with running(app.worker()):
        _wait(lambda: result.state == states.FAILURE, 90)
    meta = result.meta()
    assert meta is not None and meta.attempts == 2 and meta.error_type == "TimeLimitExceeded"
