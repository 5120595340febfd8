"""`make demo` with a service it cannot reach: one line saying which, exit 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_with_an_unreachable_cassandra_says_so_in_one_line() -> None:
    env = {**os.environ, "STREAMTASKS_BACKEND": "cassandra://127.0.0.1:1/ks",
           "STREAMTASKS_BROKER": "kafka://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("demo: BackendError: Cassandra at 127.0.0.1:1")
    assert done.stdout == ""
