"""The worker's delivery promises, attacked from outside with real worker processes.

Every count below is written by the tasks themselves (``IT_EXEC_LOG``, a line
``label:pid`` per execution), every state is read back from Cassandra, and every
commit is compared with the partition's high watermark through confluent_kafka.
Graceful stops and rebalances must repeat nothing; only a SIGKILL may.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from integration._rows import Rows
from integration._workers import (
    WorkerProcess,
    exec_lines,
    make_app,
    new_namespace,
    pids_by_label,
    wait_committed_to_high,
    wait_groups_settled,
    wait_lines,
    wait_namespace_quiet,
    worker_env,
    workers_for,
)
from integration.test_worker_kafka import dlq_records
from streamtasks import App, chain, chord, states
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration


def sig(app: App, name: str, *args: object, **options: object) -> Signature:
    """A signature of a task the worker processes know, with options (``queue``...)."""
    return Signature(name, args, options=options, app=app)


def repeats_of(runs: dict[str, list[int]]) -> dict[str, list[int]]:
    """The labels executed more than once, with the pids that ran them."""
    return {label: pids for label, pids in runs.items() if len(pids) > 1}


def warm_up(app: App, queues: list[str]) -> None:
    """One task through each queue: its workers are up and consuming."""
    for q in queues:
        assert app.send("it.add", args=[1, 1], queue=q).get(timeout=120) == 2


@pytest.mark.timeout(420)
def test_overlapping_queue_sets_run_every_task_once(tmp_path: Path) -> None:
    # Given worker A serving "default" and worker B serving "default,emails"
    log = tmp_path / "executions.log"
    ns = new_namespace("overlap")
    env = worker_env(ns, IT_EXEC_LOG=str(log))
    app = make_app(env)
    for q in ("default", "emails"):
        app.ensure_queue(q)
    rows = Rows()
    with workers_for(env, ["default", "default,emails"], log_dir=tmp_path, concurrency=4):
        warm_up(app, ["default", "emails"])
        wait_namespace_quiet(ns, groups_at_least=2)
        # When 1,000 tasks go to "default", 200 to "emails", and 20 five-step chains
        started = time.monotonic()
        ids = [app.send("it.tag", args=[f"d{i}"], queue="default").id for i in range(1000)]
        ids += [app.send("it.tag", args=[f"e{i}"], queue="emails").id for i in range(200)]
        chains = [
            chain(sig(app, "it.step", f"ch{c}.0", 0),
                  *(sig(app, "it.step", f"ch{c}.{k}") for k in range(1, 5))).apply_async()
            for c in range(20)
        ]
        app.flush(timeout_s=60)
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=180)
        assert [c.get(timeout=120) for c in chains] == [5] * 20
        elapsed = time.monotonic() - started
        time.sleep(3)  # a second execution would have shown by now
        metas = app.backend.fetch_many(ids[:1000])
    rows.close()
    runs = pids_by_label(log)
    repeated = repeats_of(runs)
    by_worker = Counter(m.worker for m in metas if m is not None)
    print(f"\noverlapping queue sets: {len(runs)} labels executed in {elapsed:.1f}s, "
          f"{sum(len(p) - 1 for p in repeated.values())} repeated executions over "
          f"{len(repeated)} labels; 'default' rows by worker {dict(by_worker)}")
    # Then every task and every chain step ran exactly once, and ended SUCCESS
    assert not repeated, (
        f"{len(repeated)} tasks ran more than once with no crash, e.g. "
        f"{dict(list(repeated.items())[:5])}")
    expected = {f"d{i}" for i in range(1000)} | {f"e{i}" for i in range(200)} | {
        f"ch{c}.{k}" for c in range(20) for k in range(5)}
    assert set(runs) == expected
    assert counts[states.SUCCESS] == len(ids), counts
    # and the queues' groups ({ns}.default, {ns}.emails) committed everything
    wait_committed_to_high(
        [(app.settings.group_id(q), app.settings.topic(q)) for q in ("default", "emails")],
        timeout_s=30)
    app.close()


@pytest.mark.timeout(400)
def test_scaling_up_and_down_under_a_backlog_repeats_nothing(tmp_path: Path) -> None:
    # Given one worker and a backlog of 600 tasks of 100 ms on a 6-partition queue
    total, ms = 600, 100
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("scale"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    group, topic = app.settings.group_id("default"), app.settings.topic("default")
    rows = Rows()
    with workers_for(env, ["default"], log_dir=tmp_path, concurrency=2) as procs:
        started = time.monotonic()
        ids = [app.send("it.nap", args=[f"t{i}", ms]).id for i in range(total)]
        app.flush(timeout_s=60)
        wait_lines(log, total // 10, timeout_s=120)
        # When two more workers join while it drains
        for n in (1, 2):
            procs.append(WorkerProcess(env, concurrency=2,
                                       log_path=tmp_path / f"worker-{n}.log"))
        wait_groups_settled([group], members=3, timeout_s=90)
        deadline = time.monotonic() + 60
        while not all(p.proc.pid in {pid for pids in pids_by_label(log).values()
                                     for pid in pids} for p in procs[1:]):
            assert time.monotonic() < deadline, "the new workers ran nothing within 60 s"
            time.sleep(0.2)
        done_at_scale_down = len(exec_lines(log))
        # and then two of the three are stopped gracefully (SIGTERM) mid-backlog
        for p in procs[:2]:
            p.proc.send_signal(signal.SIGTERM)
        codes = [p.proc.wait(timeout=60) for p in procs[:2]]
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=240)
        elapsed = time.monotonic() - started
        time.sleep(3)
    rows.close()
    runs = pids_by_label(log)
    repeated = repeats_of(runs)
    print(f"\nscale 1 -> 3 -> 1 under a backlog of {total} x {ms} ms: {len(runs)} executed, "
          f"{done_at_scale_down} done when two were SIGTERMed (exit codes {codes}), "
          f"repeats {sum(len(p) - 1 for p in repeated.values())} over {len(repeated)} tasks, "
          f"{elapsed:.1f}s")
    # Then the scale-down really happened under load, and nothing repeated
    assert done_at_scale_down < total - 50, "backlog drained before the scale-down"
    assert codes == [0, 0]
    assert counts[states.SUCCESS] == total, counts
    assert set(runs) == {f"t{i}" for i in range(total)}
    assert not repeated, (
        f"graceful rebalances repeated {len(repeated)} tasks, e.g. "
        f"{dict(list(repeated.items())[:5])}")
    wait_committed_to_high([(group, topic)], timeout_s=30)
    app.close()


@pytest.mark.timeout(300)
def test_a_poison_error_fails_its_task_and_the_partition_moves_on(tmp_path: Path) -> None:
    # Given a task whose exception text holds a lone surrogate, and 50 tasks behind it
    # on the same partition (same key)
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("poison"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    group, topic = app.settings.group_id("default"), app.settings.topic("default")
    rows = Rows()
    with workers_for(env, ["default"], log_dir=tmp_path, concurrency=4):
        warm_up(app, ["default"])
        poison = app.send("it.poison", args=["poison-1"], key="k1")
        after = [app.send("it.tag", args=[f"after{i}"], key="k1").id for i in range(50)]
        app.flush()
        # Then the tasks behind it complete
        behind = rows.wait_states(after, states.SUCCESS, timeout_s=60)
        # and the poisoned task ends FAILURE, its row readable, its error text sanitised
        failed = rows.wait_states([poison.id], states.FAILURE, timeout_s=60)
        dead = [m for m in dlq_records(app.settings.dlq_topic("default"), 1, timeout_s=30)
                if dict(m.headers() or []).get("st-id") == poison.id.encode()]
        # and the group's committed offset reaches the partition's high watermark
        try:
            wait_committed_to_high([(group, topic)], timeout_s=30)
            caught_up = "yes"
        except AssertionError as err:
            caught_up = str(err)
        raw = rows.session.execute(
            f"SELECT state, error_type, error_message FROM {rows.keyspace}.tasks "
            "WHERE task_id = %s", (poison.id,)).one()
    rows.close()
    runs = pids_by_label(log)
    print(f"\npoison: {behind[states.SUCCESS]}/50 behind it SUCCESS, poison row {raw}, "
          f"executions {len(runs.get('poison-1', []))}, DLQ records {len(dead)}, "
          f"committed to high: {caught_up}")
    assert behind[states.SUCCESS] == 50, behind
    assert failed[states.FAILURE] == 1, f"no FAILURE row for the poisoned task: {raw}"
    assert raw is not None
    assert raw.error_type == "ValueError"
    assert "bad name" in raw.error_message
    raw.error_message.encode("utf-8")  # no lone surrogate left in it
    assert len(dead) == 1, "no DLQ record for the poisoned task"
    assert dict(dead[0].headers())["dlq-reason"] == b"task-failed"
    assert caught_up == "yes", caught_up
    assert len(runs["poison-1"]) == 1
    app.close()


@pytest.mark.timeout(600)
def test_a_chord_of_1000_on_two_workers_one_sigkilled_fires_its_body_once(
    tmp_path: Path,
) -> None:
    # Given two workers (settled) and a chord of 1,000 members of 20 ms
    size = 1000
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("chord2"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    group, topic = app.settings.group_id("default"), app.settings.topic("default")
    with workers_for(env, ["default", "default"], log_dir=tmp_path, concurrency=4) as procs:
        warm_up(app, ["default"])
        wait_groups_settled([group], members=2)
        started = time.monotonic()
        result = chord([sig(app, "it.member", i, 20) for i in range(size)],
                       sig(app, "it.body", "c1000")).apply_async(confirm=True)
        # When the worker that is running members is SIGKILLed a quarter of the way in
        wait_lines(log, size // 4, timeout_s=300)
        busy = {int(line.split(":")[1]) for line in exec_lines(log)
                if not line.startswith("body:")}
        victim = next(p for p in procs if p.proc.pid in busy)
        victim.kill()
        killed_after = len(exec_lines(log))
        # Then the survivor finishes the chord and its body runs once
        assert result.get(timeout=400) == sum(2 * i for i in range(size))
        elapsed = time.monotonic() - started
        time.sleep(3)  # a second body run would have shown by now
        wait_committed_to_high([(group, topic)], timeout_s=60)
    lines = exec_lines(log)
    starts = [line for line in lines if line.startswith("body:c1000:start:")]
    ends = [line for line in lines if line.startswith("body:c1000:end:")]
    members = Counter(line.split(":")[0] for line in lines if not line.startswith("body:"))
    print(f"\nchord of {size} on 2 workers, pid {victim.proc.pid} SIGKILLed after "
          f"{killed_after} member runs: body starts {starts}, ends {len(ends)}, "
          f"{sum(members.values()) - size} member repeats, {elapsed:.1f}s to the result")
    assert len(starts) == 1 and len(ends) == 1, f"body ran {len(starts)} times: {starts}"
    assert sorted(members) == sorted(str(i) for i in range(size))
    app.close()


@pytest.mark.timeout(300)
def test_countdowns_on_two_queues_with_different_worker_queue_sets_run_once(
    tmp_path: Path,
) -> None:
    # Given workers serving "a", "a,b" and "b": each queue's delay tiers have two
    # forwarders in processes with different queue sets
    log = tmp_path / "executions.log"
    ns = new_namespace("fwd")
    env = worker_env(ns, IT_EXEC_LOG=str(log))
    app = make_app(env)
    for q in ("a", "b"):
        app.ensure_queue(q)
    rows = Rows()
    with workers_for(env, ["a", "a,b", "b"], log_dir=tmp_path, concurrency=2):
        warm_up(app, ["a", "b"])
        wait_namespace_quiet(ns, groups_at_least=4)
        # When 10 tasks with a countdown of 2 s go to each queue
        sent: dict[int, int] = {}
        ids = []
        for q, base in (("a", 0), ("b", 100)):
            for i in range(base, base + 10):
                ids.append(app.send("it.stamp", args=[i], queue=q, countdown_s=2).id)
                sent[i] = int(time.time() * 1000)
        app.flush()
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=90)
        time.sleep(5)  # a second forward would have run by now
        tiers = [(app.settings.delayer_group_id(q), app.settings.tier_topic(q, t))
                 for q in ("a", "b") for t in app.settings.tiers()]
        try:
            wait_committed_to_high(tiers, timeout_s=20)
            forwarders_caught_up = "yes"
        except AssertionError as err:
            forwarders_caught_up = str(err)
    rows.close()
    starts: dict[int, list[int]] = {}
    for line in exec_lines(log):
        i, started_ms = line.split(":")
        starts.setdefault(int(i), []).append(int(started_ms))
    runs = {i: len(v) for i, v in starts.items()}
    early = [i for i, v in starts.items() if min(v) < sent[i] + 2000 - 50]
    print(f"\ncountdowns of 2 s on queues a and b (workers a | a,b | b): runs per task "
          f"{dict(sorted(runs.items()))}, early {early}, forwarder groups caught up: "
          f"{forwarders_caught_up}")
    # Then each ran exactly once, never early, and each queue's forwarder group committed
    assert counts[states.SUCCESS] == 20, counts
    assert runs == {i: 1 for i in sent}, f"countdown tasks ran more than once: {runs}"
    assert early == []
    assert forwarders_caught_up == "yes", forwarders_caught_up
    wait_committed_to_high([(app.settings.group_id(q), app.settings.topic(q))
                            for q in ("a", "b")], timeout_s=30)
    app.close()
