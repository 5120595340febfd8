"""Ctrl-C a ``streamtasks`` command at a known point (unit and integration tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Interrupted:
    """How a command ended after SIGINT: exit code, output, seconds from the signal."""

    code: int
    out: str
    err: str
    after_signal_s: float


def interrupt_cli(argv: list[str], env: dict[str, str], cwd: Path, marker: str,
                  timeout_s: float = 30.0) -> Interrupted:
    """Run ``streamtasks ARGV``; send SIGINT once a stderr line holds ``marker``.

    The command must log that line (e.g. with ``-l debug``); if it never does, the
    signal comes when its stderr ends. The command is killed after ``timeout_s``.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", *argv], cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends with the process at the latest
            if marker in line:
                break
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout_s)
        return Interrupted(proc.returncode, out, err, time.monotonic() - began)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
