"""Chaos on real Kafka and Cassandra: workers come and go (SIGTERM, SIGKILL) under load.

Bounded: about 100 s of chaos while the load is sent, then at most 120 s of drain
with every worker alive; pytest's timeout is the hard stop. The seed is printed,
and so is every chaos action with its time, so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration._rows import Rows
from integration._workers import (
    WorkerProcess,
    exec_lines,
    make_app,
    new_namespace,
    pids_by_label,
    stop_all,
    wait_committed_to_high,
    worker_env,
)
from streamtasks import App, chord, states
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("IT_CHAOS_SEED", "20240917"))
PLAIN = int(os.environ.get("IT_CHAOS_TASKS", "20000"))
CHORDS, CHORD_SIZE, FLAKY, COUNTDOWNS = 200, 5, 100, 200
QUEUE_SETS = ["q1", "q1,q2", "q2"]
CHAOS_S = 100.0      # actions every 3-5 s for this long; the load goes out in its first 3/4
DRAIN_S = 120.0      # then every task must be final within this
MAX_ALIVE, MIN_ALIVE = 4, 1
TERM_MIN_AGE_S = 8.0  # SIGTERM only workers old enough to have installed their handlers


@dataclass
class Chaos:
    """The worker processes, and a log of what was done to them."""

    env: dict[str, str]
    log_dir: Path
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    alive: list[tuple[WorkerProcess, str, float]] = field(default_factory=list)
    stopping: list[WorkerProcess] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    termed: dict[int, int | None] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    drain_s: dict[int, float] = field(default_factory=dict)
    every: list[WorkerProcess] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def start(self, queues: str | None = None) -> None:
        queues = queues or self.rng.choice(QUEUE_SETS)
        n = len(self.every)
        p = WorkerProcess(self.env, queues=queues, concurrency=8,
                          log_path=self.log_dir / f"worker-{n}.log")
        self.every.append(p)
        self.alive.append((p, queues, time.monotonic()))
        self.note(f"start pid {p.proc.pid} --queues {queues}")

    def _time_exit(self, p: WorkerProcess, since: float) -> None:
        code = p.proc.wait()
        self.drain_s[p.proc.pid] = round(time.monotonic() - since, 1)
        self.note(f"pid {p.proc.pid} exited {code}, {self.drain_s[p.proc.pid]}s after SIGTERM")

    def repeat_warnings(self) -> list[str]:
        """Worker log lines saying records may repeat (grace ran out, a commit failed)."""
        return [f"{path.name}: {line.strip()[:300]}"
                for path in sorted(self.log_dir.glob("worker-*.log"))
                for line in path.read_text(errors="replace").splitlines()
                if "repeat" in line or ("grace" in line and "signal received" not in line)]

    def _pick(self, min_age_s: float = 0.0) -> tuple[WorkerProcess, str, float] | None:
        now = time.monotonic()
        old = [w for w in self.alive if now - w[2] >= min_age_s]
        return self.rng.choice(old) if old else None

    def sigterm(self, replace: bool) -> bool:
        picked = self._pick(TERM_MIN_AGE_S)
        if picked is None:
            return False
        p, queues, _ = picked
        self.alive.remove(picked)
        p.proc.send_signal(signal.SIGTERM)
        self.stopping.append(p)
        self.note(f"SIGTERM pid {p.proc.pid} ({queues})")
        threading.Thread(target=self._time_exit, args=(p, time.monotonic()), daemon=True).start()
        if replace:
            self.start()
        return True

    def sigkill(self, replace: bool) -> bool:
        picked = self._pick()
        if picked is None:
            return False
        p, queues, _ = picked
        self.alive.remove(picked)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=30)
        self.killed.add(p.proc.pid)
        self.note(f"SIGKILL pid {p.proc.pid} ({queues})")
        if replace:
            self.start()
        return True

    def act(self) -> None:
        """One random action within the bounds on how many workers are alive."""
        actions: list[Callable[[], bool]] = [
            lambda: self.sigterm(replace=True), lambda: self.sigkill(replace=True)]
        if len(self.alive) < MAX_ALIVE:
            actions.append(lambda: self.start() is None)
        if len(self.alive) > MIN_ALIVE:
            actions.append(lambda: self.sigterm(replace=False))
        while actions:
            action = self.rng.choice(actions)
            if action():
                return
            actions.remove(action)

    def reap(self) -> None:
        """Collect the exit codes of SIGTERMed workers that have exited."""
        for p in list(self.stopping):
            if p.proc.poll() is not None:
                self.termed[p.proc.pid] = p.proc.returncode
                self.stopping.remove(p)
                p.close_log()

    def cover_every_queue(self) -> None:
        """Before the drain: at least two workers, and every queue served."""
        served = {q for _, queues, _ in self.alive for q in queues.split(",")}
        for q in ("q1", "q2"):
            if q not in served:
                self.start(q)
        if len(self.alive) < 2:
            self.start("q1,q2")

    def wait_stopped(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.stopping and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.2)
        for p in self.stopping:  # never exited: a failure, recorded as None
            self.termed[p.proc.pid] = None
            p.proc.kill()
            p.proc.wait(timeout=30)
            self.note(f"pid {p.proc.pid} did not exit within {timeout_s}s of SIGTERM")
        self.stopping.clear()

    def stop_all(self) -> None:
        stop_all(self.every)


def sig(app: App, name: str, *args: object, **options: object) -> Signature:
    return Signature(name, args, options=options, app=app)


def loads(app: App, rng: random.Random) -> list[Callable[[], list[str]]]:
    """Every send of the load as a closure returning the task ids it sent, shuffled."""
    def queue(i: int) -> str:
        return f"q{i % 2 + 1}"

    def plain(i: int) -> list[str]:
        return [app.send("it.tag", args=[f"p{i}"], queue=queue(i)).id]

    def a_chord(c: int) -> list[str]:
        members = [sig(app, "it.step", f"m{c}.{j}", j, queue=queue(c + j))
                   for j in range(CHORD_SIZE)]
        body = chord(members, sig(app, "it.body", f"c{c}", queue=queue(c))).apply_async()
        return [body.id, *(r.id for r in body.parent.results)]  # type: ignore[union-attr]

    def flaky(k: int) -> list[str]:
        return [app.send("it.flaky", args=[f"fl{k}", 1], queue=queue(k)).id]

    def countdown(j: int) -> list[str]:
        return [app.send("it.tag", args=[f"d{j}"], queue=queue(j),
                         countdown_s=rng.uniform(1, 3)).id]

    sends: list[Callable[[], list[str]]] = [
        *(lambda i=i: plain(i) for i in range(PLAIN)),
        *(lambda c=c: a_chord(c) for c in range(CHORDS)),
        *(lambda k=k: flaky(k) for k in range(FLAKY)),
        *(lambda j=j: countdown(j) for j in range(COUNTDOWNS)),
    ]
    rng.shuffle(sends)
    return sends


def body_runs(log: Path) -> dict[str, list[tuple[str, int]]]:
    """``chord label -> [(start|end, pid), ...]`` from the bodies' own log lines."""
    out: dict[str, list[tuple[str, int]]] = {}
    for line in exec_lines(log):
        if line.startswith("body:"):
            _, label, what, pid = line.split(":")
            out.setdefault(label, []).append((what, int(pid)))
    return out


@pytest.mark.timeout(330)
def test_chaos_workers_come_and_go_under_load(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    log = tmp_path / "executions.log"
    ns = new_namespace("chaos")
    env = worker_env(ns, IT_EXEC_LOG=str(log), STREAMTASKS_LOG_LEVEL="info")
    app = make_app(env)
    for q in ("q1", "q2"):
        app.ensure_queue(q)
    chaos = Chaos(env, tmp_path, rng)
    rows = Rows()
    ids: list[str] = []
    try:
        # Given 3 workers with overlapping queue sets
        for queues in QUEUE_SETS:
            chaos.start(queues)
        for q in ("q1", "q2"):
            assert app.send("it.add", args=[1, 1], queue=q).get(timeout=120) == 2
        # When the load goes out in waves while a worker is started, SIGTERMed or
        # SIGKILLed every 3-5 s
        sends = loads(app, rng)
        waves = max(1, int(CHAOS_S * 0.75 / 4))
        per_wave = -(-len(sends) // waves)
        chaos.t0 = time.monotonic()
        while time.monotonic() - chaos.t0 < CHAOS_S:
            if sends:
                wave, sends = sends[:per_wave], sends[per_wave:]
                for send in wave:
                    ids.extend(send())
                app.flush(timeout_s=60)
                chaos.note(f"sent a wave, {len(ids)} task ids so far")
            time.sleep(rng.uniform(3, 5))
            chaos.reap()
            chaos.act()
        assert not sends, "the load was not all sent during the chaos"
        # Then, with every worker left alive (and every queue served)
        chaos.cover_every_queue()
        chaos.note("chaos over; draining")
        drain_started = time.monotonic()
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=DRAIN_S)
        drain_s = time.monotonic() - drain_started
        chaos.wait_stopped(timeout_s=30)
        time.sleep(3)  # a late repeat would have shown by now
        try:
            wait_committed_to_high(
                [(app.settings.group_id(q), app.settings.topic(q)) for q in ("q1", "q2")],
                timeout_s=30)
            caught_up = "yes"
        except AssertionError as err:
            caught_up = str(err)
    finally:
        chaos.stop_all()
        rows.close()
        print(f"\nchaos seed {SEED}, {PLAIN} plain tasks, {CHORDS} chords of {CHORD_SIZE}, "
              f"{FLAKY} fail-once tasks, {COUNTDOWNS} countdowns; actions:")
        print("\n".join(sorted(chaos.events)))
        print(f"seconds from SIGTERM to exit: {chaos.drain_s}")
        print("worker log lines about repeats:", *chaos.repeat_warnings() or ["none"],
              sep="\n  ")

    runs = pids_by_label(log)
    killed = chaos.killed

    def unattributed(prefix: str) -> dict[str, list[int]]:
        # a repeat is a crash's only if every execution before the last ran in a
        # SIGKILLed process (its offset was never committed)
        return {label: pids for label, pids in runs.items()
                if label.startswith(prefix) and len(pids) > 1
                and not all(pid in killed for pid in pids[:-1])}

    def repeats(prefix: str) -> int:
        return sum(len(p) - 1 for label, p in runs.items() if label.startswith(prefix))

    plain_bad, member_bad = unattributed("p"), unattributed("m")
    countdown_repeats = repeats("d")
    bodies = body_runs(log)
    body_bad = {
        label: events for label, events in bodies.items()
        if sum(1 for what, _ in events if what == "start") > 1 and events[0][1] not in killed
    }
    flaky_runs = {line.split(":")[0] for line in exec_lines(log) if line.startswith("fl")}
    print(f"{len(ids)} tasks; all final SUCCESS: {counts}, drain {drain_s:.1f}s; "
          f"{len(killed)} SIGKILLs, SIGTERM exit codes {chaos.termed}")
    print(f"repeats: plain {repeats('p')} ({len(plain_bad)} not attributable to a SIGKILL), "
          f"chord members {repeats('m')} ({len(member_bad)} not attributable), "
          f"countdowns {countdown_repeats}, chord bodies "
          f"{sum(1 for e in bodies.values() for w, _ in e if w == 'start') - len(bodies)} "
          f"({len(body_bad)} not attributable); committed to high: {caught_up}")

    assert counts[states.SUCCESS] == len(ids), f"not every task final SUCCESS: {counts}"
    assert {f"p{i}" for i in range(PLAIN)} <= set(runs)
    assert len(bodies) == CHORDS
    assert flaky_runs == {f"fl{k}" for k in range(FLAKY)}
    assert not plain_bad, (
        f"{len(plain_bad)} plain tasks repeated though no SIGKILLed process ran them "
        f"first (killed pids {sorted(killed)}), e.g. {dict(list(plain_bad.items())[:5])}; "
        f"worker logs: {chaos.repeat_warnings()[:3]}; SIGTERM to exit s {chaos.drain_s}")
    assert not member_bad, (
        f"{len(member_bad)} chord members repeated with no SIGKILL to blame, "
        f"e.g. {dict(list(member_bad.items())[:5])}")
    assert not body_bad, (
        f"{len(body_bad)} chord bodies ran more than once, their first run not in a "
        f"SIGKILLed process (killed {sorted(killed)}): {dict(list(body_bad.items())[:5])}")
    assert countdown_repeats == 0 or killed, f"{countdown_repeats} countdown repeats, no SIGKILL"
    assert all(code == 0 for code in chaos.termed.values()), (
        f"SIGTERMed workers must drain and exit 0: {chaos.termed}")
    assert caught_up == "yes", caught_up
    app.close()
