"""Plain functions the control tests register as tasks (``pool="process"`` children import
them from here: a process task must live in an importable module)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from streamtasks.worker.procpool import SoftTimeLimitExceeded


def spin() -> None:
    """Loop for ever (only a kill ends it)."""
    while True:
        pass


def square(x: int) -> int:
    """Return ``x`` squared."""
    return x * x


def tidy(path: str) -> str:
    """Wait for ever; on the soft time limit, write ``path`` and return."""
    try:
        while True:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        Path(path).write_text("cleaned up")
        return "cleaned up"


def hold(path: str) -> None:
    """Write ``path`` (the task started), then sleep for ever."""
    Path(path).write_text("started")
    while True:
        time.sleep(0.05)


async def hold_async(path: str) -> None:
    """Write ``path`` (the task started), then sleep for ever on the loop."""
    Path(path).write_text("started")
    while True:
        await asyncio.sleep(0.05)
