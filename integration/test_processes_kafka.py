"""``streamtasks worker --processes N`` on real Kafka and Cassandra."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration._rows import Rows
from integration._services import REPO
from integration._workers import (
    make_app,
    new_namespace,
    pids_by_label,
    wait_committed_to_high,
    wait_groups_settled,
    wait_lines,
    worker_env,
)
from streamtasks import states


@pytest.mark.timeout(300)
def test_two_processes_share_the_queue_restart_a_killed_child_and_drain_on_sigterm(
    tmp_path: Path,
) -> None:
    # Given `worker --processes 2` and 400 tasks of 20 ms
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("procs"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    rows = Rows()
    out = (tmp_path / "supervisor.log").open("wb")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
         "integration.worker_app:app", "--queues", "default", "--concurrency", "4",
         "--processes", "2"],
        cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=out,
    )
    try:
        # Both children hold partitions before the backlog exists: a child joining late
        # on a slow machine found the 2 s of work done and "both ran tasks" failed.
        group = app.settings.group_id("default")
        wait_groups_settled([group], members=2, timeout_s=120)
        ids = [app.send("it.nap", args=[f"t{i}", 20]).id for i in range(400)]
        app.flush(timeout_s=60)
        wait_lines(log, 50, timeout_s=120)
        # When a child that has run tasks is SIGKILLed mid-backlog
        children = _children(supervisor.pid)
        assert len(children) == 2, children
        ran = {pid for pids in pids_by_label(log).values() for pid in pids}
        victim = min(set(children) & ran)
        os.kill(victim, signal.SIGKILL)
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=180)
        # Then it is replaced, both processes ran tasks, and every task ended SUCCESS
        deadline = time.monotonic() + 30
        while len(_children(supervisor.pid)) < 2:
            assert time.monotonic() < deadline, "the killed child was not restarted"
            time.sleep(0.2)
        assert counts[states.SUCCESS] == 400, counts
        runs = pids_by_label(log)
        assert set(runs) == {f"t{i}" for i in range(400)}
        assert len({pid for pids in runs.values() for pid in pids}) >= 2
        # repeats may only come from the SIGKILLed child (its uncommitted records)
        repeated = {label: pids for label, pids in runs.items() if len(pids) > 1}
        assert all(pids[0] == victim for pids in repeated.values()), repeated
        wait_committed_to_high([(group, app.settings.topic("default"))], timeout_s=60)
        print(f"\n--processes 2: 400 tasks, {len(repeated)} repeated after a SIGKILL of "
              f"child {victim}")
        # and SIGTERM drains both children and exits 0
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        out.close()
        rows.close()
        app.close()


def _children(pid: int) -> list[int]:
    """Live child pids of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)
