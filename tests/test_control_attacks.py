"""Attacks on the promises of docs/control.md the way production breaks them (memory://).

Each test names the failure it stages: a scheduler restarted between its claim and its
send, a terminate arriving while a child process is being started, a worker starting on
a control topic whose old records were deleted, and more. Real-server attacks:
``integration/test_control_attacks_kafka.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from streamtasks import App, Settings, states
from streamtasks.broker.base import TopicPartition
from streamtasks.control import ControlListener, RevokedIds
from streamtasks.errors import SendError
from streamtasks.result import GroupResult
from streamtasks.schedules import Scheduler, scoped
from streamtasks.worker import procpool
from tests import control_tasks
from tests.test_control import _apps

# -- schedules -------------------------------------------------------------------------


def test_a_due_time_whose_send_failed_fires_after_its_scheduler_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka refuses the send of a claimed due time, then the worker restarts (deploy,
    crash): the new scheduler must send it, not resume after it as if it had fired."""
    before, after = _apps(2)
    [schedule] = scoped(before, before.schedules.values())

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise SendError([("x", "Broker: Not enough in-sync replicas")])

    monkeypatch.setattr(before, "send", refused)
    first = Scheduler(before, "w-before-restart")
    first.tick(11_000)  # started: the next due time is 12 s
    assert first.tick(12_000) == []  # claimed, not sent
    claim = before.backend.fire_claim(schedule.key, 12_000)
    assert claim is not None and not claim.sent
    # the worker restarts under a new name (hostname-pid) half a second later
    restarted = Scheduler(after, "w-after-restart")
    assert restarted.tick(12_500) == []  # the claimer might still be sending: wait
    monkeypatch.setattr("streamtasks.schedules.time.monotonic", lambda: time.time() + 3600)
    assert restarted.tick(13_000) == [schedule.task_id(12_000)]
    records = after.broker.records(after.settings.topic("default"))  # type: ignore[attr-defined]
    assert len(records) == 1


def test_a_restarted_scheduler_leaves_a_sent_due_time_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the restart: a due time sent before it is not sent again."""
    before, after = _apps(2)
    [schedule] = scoped(before, before.schedules.values())
    first = Scheduler(before, "w1")
    first.tick(11_000)
    assert first.tick(12_000) == [schedule.task_id(12_000)]
    restarted = Scheduler(after, "w2")
    monkeypatch.setattr("streamtasks.schedules.time.monotonic", lambda: time.time() + 3600)
    assert restarted.tick(12_500) == []
    assert restarted.tick(13_000) == []
    records = after.broker.records(after.settings.topic("default"))  # type: ignore[attr-defined]
    assert len(records) == 1


def test_due_times_a_cassandra_outage_delayed_are_fired_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduler lives through 12 s of claim timeouts (Cassandra overloaded): the
    due times it could not claim were on time when it tried; they must fire when the
    claims work again, not count as missed by a downtime and be dropped."""
    from streamtasks.errors import BackendError

    [app] = _apps(1)
    [schedule] = scoped(app, app.schedules.values())
    scheduler = Scheduler(app, "w")
    claim = app.backend.claim_fire
    down = True

    def timing_out(*args: Any, **kwargs: Any) -> Any:
        if down:
            raise BackendError("claim_fire: OperationTimedOut")
        return claim(*args, **kwargs)

    monkeypatch.setattr(app.backend, "claim_fire", timing_out)
    scheduler.tick(10_000)
    failed = 0
    for now in range(10_500, 22_500, 500):  # turns during the outage
        try:
            scheduler.tick(now)
        except BackendError:
            failed += 1
    assert failed >= 12  # every turn with a due time to claim failed
    down = False
    sent = scheduler.tick(22_500)
    expected = [schedule.task_id(due) for due in range(12_000, 22_001, 2000)]
    assert sent == expected


def test_a_turn_late_by_seconds_under_load_skips_no_due_time_of_a_1s_schedule() -> None:
    """every=1 s, one scheduler (a beat) whose thread is starved for 8 s: the due times
    of those 8 s were due while it lived; none may count as missed by a downtime."""
    [app] = _apps(1)
    app.periodic(every=1, args=(2,), name="fast")(app.tasks["tests.control_tasks.square"])
    scheduler = Scheduler(app, "beat", [app.schedules["fast"]])
    [schedule] = scheduler.schedules
    sent = scheduler.tick(10_000) + scheduler.tick(10_500) + scheduler.tick(11_000)
    sent += scheduler.tick(19_000)  # the next turn came 8 s late
    assert sent == [schedule.task_id(due) for due in range(11_000, 19_001, 1000)]


@pytest.mark.parametrize("skew_ms", [3_000, 7_000])
def test_workers_whose_clocks_disagree_fire_each_due_time_once(skew_ms: int) -> None:
    """One worker's clock is ahead, another's behind (by less, then more, than the
    on-time window); the one ahead stops halfway: every due time fires once."""
    apps = _apps(2)
    ahead, behind = Scheduler(apps[0], "ahead"), Scheduler(apps[1], "behind")
    [schedule] = scoped(apps[0], apps[0].schedules.values())
    start = 1_000_000_000_000
    sent: list[str] = []
    for real in range(start, start + 40_000, 500):
        if real < start + 20_000:
            sent += ahead.tick(real + skew_ms)
        sent += behind.tick(real - skew_ms)
    # every due time the behind clock saw (the ahead one fired some early), no gap
    # when the ahead one stopped, none twice
    dues = schedule.dues(start - skew_ms, start + 39_500 - skew_ms)
    assert len(sent) == len(set(sent))
    assert sorted(sent) == sorted(schedule.task_id(d) for d in dues)
    assert ahead.fired and behind.fired


# -- revoke ----------------------------------------------------------------------------


def test_a_worker_starting_on_a_control_topic_whose_records_were_deleted_is_not_held(
) -> None:
    """Retention deletes every revoke (7 days): the topic is empty but its end offset is
    not 0. Reading it to its end must not wait for records that will never come."""
    [app] = _apps(1)
    app.revoke(["a", "b", "c"])
    topic = app.settings.topology.control_topic()
    tp = TopicPartition(topic, 0)
    app.broker.delete_records({tp: app.broker.watermarks(tp)[1]})
    listener = ControlListener(app, RevokedIds())
    try:
        assert listener.start(catch_up_s=10.0), "the start waited for deleted records"
    finally:
        listener.close()


# -- process pool ----------------------------------------------------------------------


def test_terminate_while_the_task_s_child_process_is_being_started_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A revoke with terminate=True lands while the pool starts (spawns) the child for
    the task (its first run, or replacing a killed child): the task must not run."""
    spawning, go_on = threading.Event(), threading.Event()
    real_child = procpool._Child

    def slow_child(context: Any) -> Any:
        spawning.set()
        go_on.wait(30)
        return real_child(context)

    monkeypatch.setattr(procpool, "_Child", slow_child)
    pool = procpool.ProcessPool(1)
    answers: list[procpool.ChildResult] = []
    runner = threading.Thread(
        target=lambda: answers.append(pool.run(control_tasks.square, [3], {}, "victim")),
        daemon=True)
    runner.start()
    try:
        assert spawning.wait(30)
        assert pool.terminate("victim")
        go_on.set()
        runner.join(60)
    finally:
        go_on.set()
        pool.shutdown()
    assert answers and answers[0].terminated, answers


# -- revoke inside workflows -------------------------------------------------------------


def test_revoking_one_chord_member_fails_the_chord_visibly(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    """docs/control.md: a chord one of whose members is revoked fails (never a body that
    silently never runs); its error callback runs once; the other members still run."""
    from streamtasks import chord
    from streamtasks.errors import TaskFailed

    add, total, on_error = app.tasks["add"], app.tasks["total"], app.tasks["on_error"]
    result = chord([add.s(i, i) for i in range(4)], total.s()).on_error(
        on_error.s()).apply_async()
    assert isinstance(result.parent, GroupResult)
    victim = result.parent.results[1]
    victim.revoke()
    app.drain()
    assert victim.state == states.REVOKED
    assert result.state == states.FAILURE
    with pytest.raises(TaskFailed):
        result.get(timeout=1)
    assert not any(c[0] == "total" for c in calls)
    assert sorted(c[1] for c in calls if c[0] == "add") == [(0, 0), (2, 2), (3, 3)]
    assert [c[0] for c in calls].count("on_error") == 1


def test_revoking_a_chord_member_after_the_others_finished_still_fails_the_chord(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    """The revoked member is the last to come: the chord's decision is made by it."""
    from streamtasks import chord

    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(3)], total.s()).apply_async()
    assert isinstance(result.parent, GroupResult)
    last = result.parent.results[-1]
    last.revoke()
    app.drain()
    assert result.state == states.FAILURE
    assert not any(c[0] == "total" for c in calls)


# -- process pool: children breaking -------------------------------------------------------


def test_process_tasks_that_break_their_child_fail_clearly_and_the_worker_goes_on(
    app: App,
) -> None:
    """A child that exits, an error that cannot be read back, a result that cannot be
    sent back: each run ends FAILURE naming what happened; the next runs are served."""
    from tests import attack_tasks
    from tests.test_control import _wait, running

    exits = app.task(name="exits", pool="process")(attack_tasks.exit_hard)
    unreadable = app.task(name="unreadable", pool="process")(attack_tasks.raise_unreadable)
    lock = app.task(name="lock", pool="process")(attack_tasks.return_lock)
    square = app.task(name="square", pool="process")(control_tasks.square)
    results = [exits.delay(), unreadable.delay(), lock.delay()]
    with running(app.worker()):
        _wait(lambda: all(r.state == states.FAILURE for r in results), 120)
        assert square.delay(6).get(timeout=60) == 36
    metas = [r.meta() for r in results]
    assert all(m is not None for m in metas)
    errors = [(m.error_type, m.error_message) for m in metas if m is not None]
    assert errors[0][0] == "ChildProcessDied" and "exit code 3" in errors[0][1], errors[0]
    assert "TwoPartError" in f"{errors[1]}" and "disk: full" in f"{errors[1]}", errors[1]
    assert "cannot be sent back" in errors[2][1] and "lock" in errors[2][1], errors[2]


# -- rate limits -------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), "10/x", "0/s", "-5/m", True])
def test_a_malformed_rate_is_refused_when_the_task_is_declared(app: App, rate: Any) -> None:
    """Refused at decoration with the option's name, not found out at the first run."""
    from streamtasks.errors import ConfigError

    for option in ("rate_limit", "group_rate_limit"):
        with pytest.raises(ConfigError, match=option):
            app.task(name=f"limited_{option}", **{option: rate})(control_tasks.square)


def test_jobs_held_for_tokens_move_with_their_partition_and_run_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second worker joins while the first holds rate-limited jobs: the held jobs of
    the partitions leaving are not run by the old owner once the new owner has them;
    every task runs, and runs once (counted across both workers)."""
    from collections import Counter

    from tests.test_control import _wait, running

    first, second = _apps(2)
    ran: Counter[int] = Counter()
    lock = threading.Lock()

    def note(i: int) -> int:
        with lock:
            ran[i] += 1
        return i

    tasks = [app.task(name="slowly", rate_limit="4/s")(note) for app in (first, second)]
    results = [tasks[0].delay(i) for i in range(16)]
    with running(first.worker(["default"])) as worker:
        _wait(lambda: worker.rates.waiting > 3, 60)  # jobs held on several partitions
        with running(second.worker(["default"])) as joined:
            _wait(lambda: all(r.ready() for r in results), 120)
    assert joined.stats["received"] > 0  # the rebalance was real: partitions moved
    assert sorted(ran) == list(range(16))
    assert [i for i, count in ran.items() if count > 1] == []


def test_a_terminate_racing_the_end_of_its_run_never_kills_the_next_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run being terminated ends just as terminate() found its child, and the pool
    hands that child to the next task: the kill must not land on the next task."""
    from tests import attack_tasks

    pool = procpool.ProcessPool(1)
    answers: dict[str, procpool.ChildResult] = {}

    def run(run_id: str, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.setdefault(
            run_id, pool.run(attack_tasks.nap, [seconds], {}, run_id)), daemon=True)
        thread.start()
        return thread

    def busy_with(run_id: str) -> bool:
        return pool._busy.get(run_id) is not None

    class Stalling:
        """The pool's log: its "terminating" line waits for the race to be staged."""

        def info(self, event: str, **_fields: Any) -> None:
            if event.startswith("terminating"):
                first.join(30)  # the terminated run ended by itself meanwhile
                second = run("next", 1.0)
                deadline = time.monotonic() + 30
                while not busy_with("next") and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.3)  # its arguments went to the child
                threads.append(second)

        def __getattr__(self, _name: str) -> Any:
            return lambda *_a, **_k: None

    threads: list[threading.Thread] = []
    try:
        first = run("victim", 1.0)
        deadline = time.monotonic() + 60
        while not busy_with("victim") and time.monotonic() < deadline:
            time.sleep(0.01)
        monkeypatch.setattr(procpool, "log", Stalling())
        pool.terminate("victim")
        for thread in threads:
            thread.join(60)
    finally:
        pool.shutdown()
    assert "next" in answers and answers["next"].ok, answers.get("next")


def test_an_expired_revoke_of_a_step_does_not_hide_the_live_revoke_of_its_chain() -> None:
    """A step was revoked for a minute (long ago); its chain is revoked now: the step
    must match the chain's revoke, not stop at its own expired one."""
    from streamtasks.control import RevokeNotice
    from streamtasks.message import TaskMessage

    now_ms = int(time.time() * 1000)
    revoked = RevokedIds()
    revoked.add(RevokeNotice("step", False, now_ms - 60_000))
    revoked.add(RevokeNotice("chain", True, now_ms + 3_600_000))
    step = TaskMessage(id="step", name="t", queue="q", root_id="chain")
    notice = revoked.match(step)
    assert notice is not None and notice.task_id == "chain" and notice.terminate
    assert revoked.match(TaskMessage(id="step", name="t", queue="q")) is None  # expired


def test_many_process_tasks_at_once_keep_the_children_within_the_concurrency(
    app: App,
) -> None:
    """Twelve pool="process" tasks, some killed by their time limit (children replaced):
    never more children alive than the worker's concurrency."""
    import multiprocessing

    from tests import attack_tasks
    from tests.test_control import running

    nap = app.task(name="nap", pool="process", time_limit=1.0)(attack_tasks.nap)
    results = [nap.delay(0.05 if i % 3 else 5.0) for i in range(12)]
    before = {p.pid for p in multiprocessing.active_children()}  # other tests' children
    most = 0
    with running(app.worker(concurrency=2)):
        deadline = time.monotonic() + 180
        while not all(r.ready() for r in results) and time.monotonic() < deadline:
            ours = [p for p in multiprocessing.active_children() if p.pid not in before]
            most = max(most, len(ours))
            time.sleep(0.02)
    seen = [(r.state, getattr(r.meta(), "error_message", None)) for r in results]
    assert all(r.ready() for r in results), seen
    assert {state for state, _ in seen} == {states.FAILURE, states.SUCCESS}, seen
    assert 1 <= most <= 2, most


def test_a_task_revoked_while_held_for_a_rate_token_never_runs(app: App) -> None:
    """Revoked while the rate gate holds it (its partition paused): REVOKED, not run."""
    from tests.test_control import _wait, running

    ran: list[int] = []

    @app.task(name="trickle", rate_limit="2/s")
    def trickle(i: int) -> int:
        ran.append(i)
        return i

    results = [trickle.apply_async((i,), key="one-partition") for i in range(6)]
    with running(app.worker()) as worker:
        _wait(lambda: worker.rates.waiting >= 4, 60)
        results[-1].revoke()
        _wait(lambda: all(r.ready() for r in results), 60)
    assert results[-1].state == states.REVOKED
    assert 5 not in ran and sorted(ran) == [0, 1, 2, 3, 4]


def test_a_process_task_killed_by_a_worker_s_shutdown_is_run_again_not_failed(
    tmp_path: Any,
) -> None:
    """SIGTERM drain while a pool="process" task runs past the grace: its child is
    killed with the worker; the task must not end FAILURE (ChildProcessDied) but run
    again on the next worker, as any task a stopping worker could not finish."""
    from tests import attack_tasks
    from tests.test_control import _wait, running

    settings = Settings(broker="memory://", backend="memory://", partitions=1,
                        commit_interval_s=0.0, shutdown_grace_s=1.0)
    app = App("drain", settings=settings)
    try:
        task = app.task(name="hold_once", pool="process")(attack_tasks.hold_once)
        started = tmp_path / "started"
        result = task.delay(str(started))
        with running(app.worker()):
            _wait(started.exists, 60)
        assert result.state != states.FAILURE, result.meta()
        with running(app.worker()):
            assert result.get(timeout=60) == "second run"
    finally:
        app.close()


def test_a_task_revoked_before_it_was_even_sent_never_runs(app: App) -> None:
    """The caller revokes an id it is about to use (or a retry of a known id)."""
    from tests.test_control import _wait, running

    ran: list[int] = []

    @app.task(name="later")
    def later(i: int) -> int:
        ran.append(i)
        return i

    app.revoke(["chosen-id"])
    result = later.apply_async((1,), task_id="chosen-id")
    other = later.delay(2)
    with running(app.worker()):
        assert other.get(timeout=60) == 2
        _wait(lambda: result.state == states.REVOKED, 60)
    assert ran == [2]


def test_rate_limited_chord_members_fire_the_body_once_with_every_result(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    """Members held for tokens (their partitions paused) still join the chord."""
    from streamtasks import chord
    from tests.test_control import running

    @app.task(name="slow_double", rate_limit="5/s")
    def slow_double(i: int) -> int:
        return 2 * i

    total = app.tasks["total"]
    result = chord([slow_double.s(i) for i in range(8)], total.s()).apply_async()
    with running(app.worker()):
        assert result.get(timeout=120) == sum(2 * i for i in range(8))
    assert [c[0] for c in calls].count("total") == 1


def test_shutting_the_pool_down_leaves_a_running_child_s_pipe_to_its_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    """The worker stops while a child runs a task: the worker's thread (shutdown) and
    the task's thread (its run ending) must not both close the child's pipe: a second
    close of a descriptor number reused meanwhile closes someone else's socket (seen
    as EBADF in the worker's thread)."""
    closers: list[str] = []
    real_kill = procpool._Child.kill

    def kill(child: Any) -> None:
        closers.append(threading.current_thread().name)
        real_kill(child)

    monkeypatch.setattr(procpool._Child, "kill", kill)
    pool = procpool.ProcessPool(1)
    started = tmp_path / "started"
    answers: list[procpool.ChildResult] = []
    runner = threading.Thread(name="task-thread", daemon=True, target=lambda: answers.append(
        pool.run(control_tasks.hold, [str(started)], {}, "held")))
    runner.start()
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pool.shutdown()
    runner.join(30)
    assert answers and isinstance(answers[0].error, procpool.ChildProcessDied), answers
    assert set(closers) == {"task-thread"}  # never the thread that shut the pool down


def test_a_process_tasks_time_limit_does_not_count_its_modules_import(app: App) -> None:
    """The time limit is the task's: a 1.5 s import in a fresh child (a heavy module, a
    loaded machine) does not kill a task that returns at once under time_limit=1."""
    from tests import slow_import_tasks
    from tests.test_control import running

    quick = app.task(name="quick", pool="process", time_limit=1.0)(slow_import_tasks.quick)
    results = [quick.delay(i) for i in range(3)]
    with running(app.worker(concurrency=1)):
        deadline = time.monotonic() + 120
        while not all(r.ready() for r in results) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [(r.state, r.result if r.state == states.SUCCESS else r.meta().error_message)
            for r in results] == [(states.SUCCESS, i) for i in range(3)]


def test_a_child_that_cannot_import_in_time_fails_the_task_by_name(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child stuck importing the task's module is killed after the start timeout and
    the run fails saying so (never a wait without end)."""
    from tests import slow_import_tasks
    from tests.test_control import running

    monkeypatch.setattr(procpool, "START_TIMEOUT_S", 0.5)
    quick = app.task(name="quick", pool="process")(slow_import_tasks.quick)
    result = quick.delay(1)
    with running(app.worker(concurrency=1)):
        deadline = time.monotonic() + 120
        while not result.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert result.state == states.FAILURE
    message = result.meta().error_message or ""
    # (on a loaded machine the child's own start may be what exceeds 0.5 s)
    assert ("did not import tests.slow_import_tasks within" in message
            or "did not start within" in message), message
