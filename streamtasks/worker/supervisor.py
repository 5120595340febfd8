"""``streamtasks worker --processes N``: N worker processes under one supervisor.

Python runs one thread of Python at a time, and a worker's loop (decode, carry out,
write) is Python: a second process uses the second core. Each child is an ordinary
``streamtasks worker`` — a member of every queue's consumer group, with its own delay
forwarder — started with the same arguments. The supervisor:

- restarts a child that exits without being asked to (logged with its exit code),
  with a back-off; a child that keeps dying within seconds of its start (a bad
  setting, an import error) ends the supervisor with exit code 1 instead;
- on SIGTERM / SIGINT passes the signal on and waits for every child to drain
  (``shutdown_grace_s`` plus a margin), then exits 0 if every child did; a second
  signal kills the children at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

log = structlog.get_logger("streamtasks.worker")

#: A child that exits within this long of its start counts as a failed start.
_EARLY_EXIT_S = 10.0
#: Failed starts in a row after which the supervisor gives up.
_MAX_EARLY_EXITS = 5
#: First wait before restarting a child that failed to start (doubles, up to 30 s).
_RESTART_BACKOFF_S = 0.5


class Supervisor:
    """Runs ``count`` copies of a command and keeps them running until told to stop.

    Args:
        command: the command line of child number ``index`` (``argv``), e.g.
            ``python -m streamtasks.cli worker ...``.
        count: how many children.
        grace_s: how long a stop waits for the children to drain before killing them.
        env: the children's environment (default: this process's).
    """

    def __init__(self, command: Callable[[int], list[str]], count: int, grace_s: float,
                 env: dict[str, str] | None = None) -> None:
        self.command = command
        self.count = count
        self.grace_s = grace_s
        self.env = env
        self._children: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._early_exits = [0] * count
        self._stop = threading.Event()
        self._killing = False

    def run(self, install_signals: bool = True) -> int:
        """Start the children, supervise them, and return the exit code after a stop."""
        if install_signals:
            self._install_signals()
        for index in range(self.count):
            self._start(index)
        log.info("worker processes started", processes=self.count,
                 pids=[c.pid for c in self._children if c is not None])
        code = 0
        while not self._stop.wait(0.2):
            code = self._check()
            if code:
                self.stop()
        return self._wait_all() or code

    def stop(self) -> None:
        """Ask every child to drain and exit (thread-safe)."""
        self._stop.set()
        for child in self._children:
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def pids(self) -> list[int]:
        """The pids of the children running now."""
        return [c.pid for c in self._children if c is not None and c.poll() is None]

    def _start(self, index: int) -> None:
        self._children[index] = subprocess.Popen(self.command(index), env=self.env)
        self._started_at[index] = time.monotonic()

    def _check(self) -> int:
        """Restart children that exited; return 1 when one keeps failing to start."""
        for index, child in enumerate(self._children):
            if child is None or child.poll() is None or self._stop.is_set():
                continue
            lived_s = time.monotonic() - self._started_at[index]
            if lived_s < _EARLY_EXIT_S:
                self._early_exits[index] += 1
            else:
                self._early_exits[index] = 0
            if self._early_exits[index] >= _MAX_EARLY_EXITS:
                log.critical("a worker process keeps exiting right after its start; stopping",
                             index=index, exit_code=child.returncode,
                             failed_starts=self._early_exits[index])
                return 1
            failed = self._early_exits[index]
            delay_s = min(30.0, _RESTART_BACKOFF_S * 2 ** (failed - 1)) if failed else 0.0
            log.error("worker process exited; restarting it", index=index, pid=child.pid,
                      exit_code=child.returncode, lived_s=round(lived_s, 1),
                      restart_in_s=delay_s)
            if self._stop.wait(delay_s):
                return 0
            self._start(index)
        return 0

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.grace_s + 10
        code = 0
        for child in self._children:
            if child is None:
                continue
            left = max(0.1, deadline - time.monotonic())
            try:
                child.wait(left)
            except subprocess.TimeoutExpired:
                log.error("worker process did not drain in time; killing it", pid=child.pid)
                child.kill()
                child.wait()
            if child.returncode != 0:
                code = 1
        log.info("worker processes stopped", exit_code=code)
        return code

    def _install_signals(self) -> None:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                log.warning("second signal: killing the worker processes", signal=signum)
                for child in self._children:
                    if child is not None and child.poll() is None:
                        child.kill()
                os._exit(1)
            log.info("signal received: draining the worker processes", signal=signum)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def child_command(argv: Sequence[str], drop: Callable[[str], bool]) -> list[str]:
    """Return ``python -m streamtasks.cli`` plus ``argv`` without the supervisor's flags.

    ``drop(arg)`` says which flags (with their value) to leave out.
    """
    out: list[str] = [sys.executable, "-m", "streamtasks.cli"]
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if drop(arg):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
