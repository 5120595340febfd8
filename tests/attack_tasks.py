"""Tasks that break their child process in the ways production does (``pool="process"``
children import them from here)."""

from __future__ import annotations

import os
import threading


class TwoPartError(Exception):
    """Pickles, but cannot be unpickled (``__init__`` needs two arguments)."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


def exit_hard() -> None:
    """End the child process at once, as a C extension calling exit() would."""
    os._exit(3)


def raise_unreadable() -> None:
    """Raise an error the parent cannot unpickle."""
    raise TwoPartError("disk", "full")


def return_lock() -> object:
    """Return something that cannot be pickled."""
    return threading.Lock()


def nap(seconds: float) -> float:
    """Sleep ``seconds``; return them."""
    import time

    time.sleep(seconds)
    return seconds


def hold_once(path: str) -> str:
    """The first run writes ``path`` and sleeps for ever; a later run returns at once."""
    import time
    from pathlib import Path

    if Path(path).exists():
        return "second run"
    Path(path).write_text("started")
    while True:
        time.sleep(0.05)
