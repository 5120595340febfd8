"""Command-line control: ``streamtasks schedules``, ``beat`` and ``revoke``.

Kept apart from :mod:`streamtasks.cli` (which adds these commands with
:func:`add_control_commands`): each handler takes the parsed arguments and a function
that builds the app from them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from streamtasks.control import REVOKE_EXPIRES_S
from streamtasks.errors import BackendError, ConfigError
from streamtasks.schedules import Scheduler, next_due_times, scoped

if TYPE_CHECKING:
    from streamtasks.app import App

AppOf = Callable[[argparse.Namespace], "App"]


def add_control_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser,
    app_of: AppOf, seconds: Callable[[str], float],
) -> None:
    """Add ``schedules``, ``beat`` and ``revoke`` to the command line."""
    p = sub.add_parser("schedules", parents=[common],
                       help="list the app's periodic tasks and their next due times")
    p.add_argument("--next", type=int, default=3, metavar="N", help="due times shown (3)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    p.set_defaults(handler=lambda ns: _cmd_schedules(ns, app_of))

    p = sub.add_parser("beat", parents=[common],
                       help="fire the app's periodic tasks from this process alone "
                       "(workers fire them too unless started with --no-beat)")
    p.set_defaults(handler=lambda ns: _cmd_beat(ns, app_of))

    p = sub.add_parser("revoke", parents=[common],
                       help="revoke tasks: not yet started ones end REVOKED without running")
    p.add_argument("task_ids", nargs="+", metavar="ID", help="task ids (or workflow ids)")
    p.add_argument("--terminate", action="store_true",
                   help="also stop them while running (async tasks, pool='process' tasks)")
    p.add_argument("--expires", type=seconds, default=float(REVOKE_EXPIRES_S),
                   metavar="SECONDS", help="how long the revoke is kept (default 3 h)")
    p.set_defaults(handler=lambda ns: _cmd_revoke(ns, app_of))


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def schedule_rows(app: App, count: int) -> list[dict[str, Any]]:
    """Return one row per schedule: what, when, its next due times and the last one fired."""
    rows = []
    for schedule in sorted(scoped(app, app.schedules.values()), key=lambda s: s.name):
        try:
            last = app.backend.last_fire(schedule.key)
        except (BackendError, NotImplementedError):
            last = None
        rows.append({
            "name": schedule.name, "task": schedule.task, "queue": schedule.queue,
            "when": schedule.spec, "catch_up": schedule.catch_up,
            "next": [_iso(ms) for ms in next_due_times(schedule, count)],
            "last_fired": _iso(last),
        })
    return rows


def _cmd_schedules(ns: argparse.Namespace, app_of: AppOf) -> int:
    if not ns.app:
        raise ConfigError("schedules needs --app module:app (schedules are declared there)")
    if ns.next < 1:
        raise ConfigError(f"--next must be at least 1, got {ns.next}")
    rows = schedule_rows(app_of(ns), ns.next)
    if ns.as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no periodic tasks declared")
        return 0
    for row in rows:
        print(f"{row['name']}  task={row['task']}  queue={row['queue']}  {row['when']}  "
              f"catch_up={row['catch_up']}  last_fired={row['last_fired'] or '-'}")
        print(f"    next: {', '.join(row['next'])}")
    return 0


def _cmd_beat(ns: argparse.Namespace, app_of: AppOf) -> int:
    if not ns.app:
        raise ConfigError("beat needs --app module:app (schedules are declared there)")
    app = app_of(ns)
    if not app.schedules:
        raise ConfigError("the app declares no periodic task (@app.periodic)")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Scheduler(app, f"beat@{socket.gethostname()}:{os.getpid()}").run(stop)
    return 0


def _cmd_revoke(ns: argparse.Namespace, app_of: AppOf) -> int:
    app = app_of(ns)
    app.revoke(ns.task_ids, terminate=ns.terminate, expires_s=ns.expires)
    for task_id in dict.fromkeys(ns.task_ids):
        print(f"revoked {task_id}")
    return 0
