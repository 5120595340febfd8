"""Workflows on the real Kafka and Cassandra: chains, groups, chords, crashes, failures."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from integration._workers import (
    WorkerProcess,
    executions,
    make_app,
    new_namespace,
    wait_groups_settled,
    wait_lines,
    worker_env,
    workers,
)
from streamtasks import App, ChainResult, GroupResult, TaskFailed, chain, chord, group
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration


def sig(app: App, name: str, *args: object, immutable: bool = False) -> Signature:
    """A signature of a task the worker processes know (this process need not import it)."""
    return Signature(name, args, immutable=immutable, app=app)


@pytest.mark.timeout(300)
def test_the_articles_workflows() -> None:
    env = worker_env(new_namespace("wf"))
    app = make_app(env)
    with workers(env, 1, concurrency=8):
        # a group of three additions
        three = group(sig(app, "it.add", i, i) for i in range(3)).apply_async()
        # a chord of 100 additions whose callback sums them
        summed = chord([sig(app, "it.add", i, i) for i in range(100)],
                       sig(app, "it.sum")).apply_async()
        # a 4-step chain passing results: ((2 + 3) * 4 + 1) * 10
        four = chain(sig(app, "it.add", 2, 3), sig(app, "it.mul", 4), sig(app, "it.add", 1),
                     sig(app, "it.mul", 10)).apply_async()
        # a nested chain(group, chord): [1+1, 2+2] -> each member sums [2, 4] -> sum
        nested = chain(
            group(sig(app, "it.add", 1, 1), sig(app, "it.add", 2, 2)),
            chord([sig(app, "it.sum"), sig(app, "it.sum")], sig(app, "it.sum")),
        ).apply_async()
        app.flush()

        assert isinstance(three, GroupResult)
        assert three.get(timeout=120) == [0, 2, 4]
        assert summed.get(timeout=120) == sum(2 * i for i in range(100))
        assert four.get(timeout=120) == 210
        assert isinstance(four, ChainResult)
        assert [step.get(timeout=10) for step in four.steps] == [5, 20, 21, 210]
        assert nested.get(timeout=120) == 12
    app.close()


@pytest.mark.timeout(900)
def test_a_chord_of_1000_fires_once_when_a_worker_is_killed(tmp_path: Path) -> None:
    # Given a chord of 1,000 members (20 ms each) over 3 worker processes
    size = 1000
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("chord-kill"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    with workers(env, 3, concurrency=8) as procs:
        started = time.monotonic()
        result = chord([sig(app, "it.member", i, 20) for i in range(size)],
                       sig(app, "it.collect")).apply_async(confirm=True)
        # When a worker that is running members is SIGKILLed, and another one started
        wait_lines(log, size // 4, timeout_s=300)
        busy = {int(line.split(":")[1]) for line in log.read_text().split()}
        victim = next(p for p in procs if p.proc.pid in busy)
        victim.kill()
        procs.append(WorkerProcess(env))
        # Then the callback gets all 1,000 results, in order, and runs once
        assert result.get(timeout=600) == [2 * i for i in range(size)]
        elapsed = time.monotonic() - started
        time.sleep(3)  # a second firing would have shown by now
    runs = executions(log)
    bodies = {tag: n for tag, n in runs.items() if tag.startswith("collect")}
    members = Counter(tag.split(":")[0] for tag in runs.elements() if tag not in bodies)
    print(f"\nchord of {size}, a busy worker of 3 SIGKILLed: body ran {bodies}, "
          f"{sum(members.values()) - size} member repeats, {elapsed:.1f}s to the result")
    assert bodies == {f"collect:{size}": 1}
    assert sorted(members) == sorted(str(i) for i in range(size))
    app.close()


@pytest.mark.timeout(300)
def test_chords_whose_members_finish_together_on_two_workers_fire_once(
    tmp_path: Path,
) -> None:
    # Given 2 workers (settled) and 40 chords of 2 members that take 300 ms each
    chords = 40
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("chord-race"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    with workers(env, 2, concurrency=8):
        sig(app, "it.add", 1, 1).delay().get(timeout=120)
        wait_groups_settled([app.settings.group_id("default")], members=2)
        # When all 80 members start at about the same time, two per chord
        results = [
            chord([sig(app, "it.member", 2 * c, 300), sig(app, "it.member", 2 * c + 1, 300)],
                  sig(app, "it.collect")).apply_async()
            for c in range(chords)
        ]
        app.flush()
        # Then every body gets its two results, and runs once
        assert [r.get(timeout=120) for r in results] == [
            [4 * c, 4 * c + 2] for c in range(chords)
        ]
        time.sleep(3)  # a second firing would have shown by now
    runs = executions(log)
    pid_of = dict(tag.split(":") for tag in runs if not tag.startswith("collect"))
    split = sum(1 for c in range(chords) if pid_of[str(2 * c)] != pid_of[str(2 * c + 1)])
    print(f"\n{chords} chords of 2 simultaneous members: bodies run {runs['collect:2']}; "
          f"{split} chords had their members on different worker processes")
    assert runs["collect:2"] == chords
    assert split > 0
    app.close()


@pytest.mark.timeout(300)
def test_a_chord_with_a_failing_member_fails_visibly_and_calls_back_once(
    tmp_path: Path,
) -> None:
    # Given a chord whose last member always fails (2 retries, 0.5 s apart)
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("chord-fail"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    with workers(env, 2, concurrency=4):
        # the workers and their delay forwarders are up and done rebalancing
        sig(app, "it.add", 1, 1).delay().get(timeout=120)
        groups = [app.settings.group_id("default"), app.settings.delayer_group_id("default")]
        wait_groups_settled(groups, members=2)
        members = [sig(app, "it.count", i) for i in range(9)] + [sig(app, "it.always_fails")]
        workflow = chord(members, sig(app, "it.collect")).on_error(sig(app, "it.on_error"))
        started = time.monotonic()
        result = workflow.apply_async(confirm=True)
        # Then the chord's result fails with the member's error
        with pytest.raises(TaskFailed, match=r"chord member 9 of 10 .*this task always fails"):
            result.get(timeout=120)
        visible_s = time.monotonic() - started
        assert isinstance(result.parent, GroupResult)
        failed_id = result.parent.results[9].id
        # and the error callback runs once, with the failed member's id; the body never
        deadline = time.monotonic() + 60
        while executions(log)[f"on_error:{failed_id}"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # a second error callback or a body run would have shown by now
    runs = executions(log)
    member_row, body_row = app.backend.fetch(failed_id), app.backend.fetch(result.id)
    assert member_row is not None and body_row is not None
    assert member_row.attempts == 3 and body_row.state == "FAILURE"
    print(f"\nchord with a failing member: FAILURE visible after {visible_s:.2f}s; "
          f"member sent -> its 3rd attempt failed "
          f"{((member_row.finished_ms or 0) - (member_row.created_ms or 0)) / 1000:.2f}s "
          f"(retries 2 x 0.5 s via the 1 s tier), -> chord FAILURE row "
          f"{((body_row.finished_ms or 0) - (member_row.finished_ms or 0)) / 1000:.2f}s")
    assert runs[f"on_error:{failed_id}"] == 1
    assert not any(tag.startswith("collect") for tag in runs)
    assert result.parent.failed()
    app.close()
