"""One load for the fault tests: tagged tasks through three workers while a fault happens.

Half the tasks are sent, the fault starts once a quarter has run, the other half is sent
during it, and the run ends when every task's row reads SUCCESS and the queue's group has
committed every partition's end. Progress (executions written so far) is sampled twice a
second, so that a stall of the group shows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from cluster._cluster import cluster_env, wait_in_sync
from integration._rows import Rows
from integration._workers import (
    make_app,
    pids_by_label,
    wait_committed_to_high,
    wait_lines,
    workers_for,
)
from streamtasks import App, states

#: A fault: entered once a quarter of the load ran, left once the second half is sent;
#: it yields a description of what it did.
Fault = Callable[[str], AbstractContextManager[str]]


@dataclass
class Progress:
    """Executions seen over time: ``(monotonic s, lines)`` every 0.5 s."""

    log: Path
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.5):
            lines = self.log.read_bytes().count(b"\n") if self.log.exists() else 0
            self.samples.append((time.monotonic(), lines))

    def longest_stall(self, total: int) -> float:
        """The longest time in seconds without a new execution while tasks remained."""
        longest, since = 0.0, None
        for (t, n), (_t0, n0) in zip(self.samples[1:], self.samples, strict=False):
            if n == n0 and n < total:
                since = since if since is not None else _t0
                longest = max(longest, t - since)
            else:
                since = None
        return longest

    def stop(self) -> None:
        self._stop.set()


@dataclass
class LoadResult:
    """What a load run saw."""

    total: int
    states: dict[str, int]
    runs: dict[str, list[int]]
    fault: str
    longest_stall_s: float
    elapsed_s: float

    @property
    def repeats(self) -> int:
        """Executions beyond the first of each task."""
        return sum(len(pids) - 1 for pids in self.runs.values())

    def assert_nothing_lost(self) -> None:
        """Every task ran and its row reads SUCCESS."""
        assert self.states.get(states.SUCCESS) == self.total, self.states
        assert set(self.runs) == {f"t{i}" for i in range(self.total)}

    def report(self) -> str:
        return (f"{self.fault}: {len(self.runs)}/{self.total} tasks executed in "
                f"{self.elapsed_s:.0f}s, {self.repeats} repeated executions, longest stall "
                f"{self.longest_stall_s:.1f}s")


def queue_app(tmp_path: Path, prefix: str) -> tuple[Path, dict[str, str], App]:
    """A fresh namespace's execution log, environment and app; its queue's replicas in sync."""
    log = tmp_path / "executions.log"
    env = cluster_env(prefix, IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    wait_in_sync([app.settings.topic("default")])
    return log, env, app


def tagged_load(tmp_path: Path, prefix: str, total: int, fault: Fault,
                rows: Rows | None = None) -> LoadResult:
    """Run ``total`` ``it.tag`` tasks through 3 workers while ``fault`` happens."""
    log, env, app = queue_app(tmp_path, prefix)
    topic, group = app.settings.topic("default"), app.settings.group_id("default")
    rows = rows or Rows()
    progress = Progress(log)
    sampler = threading.Thread(target=progress.run, daemon=True)
    started = time.monotonic()
    try:
        with workers_for(env, ["default"] * 3, log_dir=tmp_path, concurrency=8):
            sampler.start()
            ids = [app.send("it.tag", args=[f"t{i}"]).id for i in range(total // 2)]
            app.flush(timeout_s=120)
            wait_lines(log, total // 4, timeout_s=300)
            with fault(topic) as what:
                ids += [app.send("it.tag", args=[f"t{i}"]).id for i in range(total // 2, total)]
                app.flush(timeout_s=180)
            counts = rows.wait_states(ids, states.SUCCESS, timeout_s=400)
            wait_committed_to_high([(group, topic)], timeout_s=120)
            elapsed = time.monotonic() - started
    finally:
        progress.stop()
        rows.close()
        app.close()
    return LoadResult(total, dict(counts), pids_by_label(log), what,
                      progress.longest_stall(total), elapsed)

