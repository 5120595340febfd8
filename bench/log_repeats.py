"""Lines a worker writes while its broker is unreachable, with and without collapsing.

Usage: python -m bench.log_repeats [seconds]

Starts ``streamtasks worker`` against ``kafka://127.0.0.1:1`` (nothing listens there;
topics not created, so the clients retry for ever) for ``seconds`` (default 20), once with
``log_repeat_interval_s=0`` (collapsing off) and once with the default 30 s, and counts
the stderr lines of each. Decisions: docs/operations.md, "Repeated errors are collapsed".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lines_in(seconds: float, interval_s: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTASKS_")}
    env.update(STREAMTASKS_BROKER="kafka://127.0.0.1:1", STREAMTASKS_BACKEND="memory://",
               STREAMTASKS_CREATE_TOPICS="false", STREAMTASKS_LOG_FORMAT="json",
               STREAMTASKS_LOG_REPEAT_INTERVAL_S=interval_s)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app",
         "integration.worker_app:app"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    return len(err.splitlines())


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    for interval in ("0", "30"):
        print(f"log_repeat_interval_s={interval:>2}: {lines_in(seconds, interval)} stderr lines "
              f"in {seconds:g} s")


if __name__ == "__main__":
    main()
