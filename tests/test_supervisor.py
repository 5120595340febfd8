"""``worker --processes N``: the supervisor restarts dead children and drains on stop."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from streamtasks.worker import supervisor as supervisor_module
from streamtasks.worker.supervisor import Supervisor, child_command

# A child that records its start, dies with code 3 on its first start (when asked to),
# and otherwise runs until SIGTERM, then exits 0.
CHILD = """
import signal, sys, time, pathlib
log = pathlib.Path(sys.argv[1]); index = sys.argv[2]; die_first = sys.argv[3] == "1"
starts = log.read_text().split() if log.exists() else []
with log.open("a") as f:
    f.write(f"start-{index} ")
if die_first and f"start-{index}" not in starts:
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.05)
"""


def _starts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _wait(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_child_that_dies_is_restarted_and_a_stop_drains_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "_RESTART_BACKOFF_S", 0.01)
    log = tmp_path / "starts"
    sup = Supervisor(lambda i: [sys.executable, "-c", CHILD, str(log), str(i),
                                "1" if i == 0 else "0"], 2, grace_s=5)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(sup.run(install_signals=False)))
    runner.start()
    try:
        # child 0 dies once and is started again; child 1 runs on
        _wait(lambda: _starts(log).count("start-0") == 2 and len(sup.pids()) == 2)
        assert _starts(log).count("start-1") == 1
    finally:
        sup.stop()
        runner.join(20)
    assert codes == [0]
    assert sup.pids() == []


def test_a_child_that_keeps_failing_to_start_ends_the_supervisor_non_zero(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "_RESTART_BACKOFF_S", 0.01)
    sup = Supervisor(lambda i: [sys.executable, "-c", "import sys; sys.exit(2)"], 1, grace_s=1)
    started = time.monotonic()
    assert sup.run(install_signals=False) == 1
    assert time.monotonic() - started < 20


def test_the_child_command_drops_the_supervisors_own_flags() -> None:
    argv = ["worker", "--app", "m:app", "--processes", "2", "--metrics-port=9100",
            "--queues", "a,b"]
    command = child_command(argv, lambda a: a.split("=")[0] in ("--processes",
                                                                "--metrics-port"))
    assert command[1:] == ["-m", "streamtasks.cli", "worker", "--app", "m:app",
                           "--queues", "a,b"]
