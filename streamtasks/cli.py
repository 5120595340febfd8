"""The `streamtasks` command: worker, send, result, tasks, migrate, topics, dlq, replay, groups."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from streamtasks import states
from streamtasks.app import App
from streamtasks.backend.base import TaskMeta
from streamtasks.codec import to_json_text
from streamtasks.errors import ConfigError, ResultTimeout, StreamTasksError
from streamtasks.logs import configure_logging
from streamtasks.ops.control import add_control_commands
from streamtasks.settings import ENV_PREFIX, LOG_LEVELS
from streamtasks.timeutil import parse_time_ms

if TYPE_CHECKING:
    from streamtasks.ops.inspect import QueueReport
    from streamtasks.ops.replay import ReplayItem

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 3
#: Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130

#: ``tasks --state any``: list tasks of every state.
ANY_STATE = "ANY"

_TIME_HELP = "ISO time (UTC unless it names an offset)"


#: Commands that run a service (log at INFO unless told otherwise).
_SERVICE_COMMANDS = frozenset({"worker", "delayer", "beat"})


class CliError(Exception):
    """A bad argument value; printed with the usage hint and exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = _parser()
    raw = _glue_relative_times(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(raw)
    ns.argv = raw
    if not getattr(ns, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(ns.handler(ns))
    except CliError as err:
        print(f"streamtasks {ns.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as err:
        print(f"streamtasks {ns.command}: configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except StreamTasksError as err:
        print(f"streamtasks {ns.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML settings file")
    common.add_argument("--broker", help="broker URL, e.g. kafka://127.0.0.1:9092")
    common.add_argument("--backend", help="backend URL, e.g. cassandra://127.0.0.1:9042/ks")
    common.add_argument("--namespace", help="topic name prefix (default streamtasks)")
    common.add_argument("--app", help="module:attribute of your App (registers the tasks)")
    common.add_argument("-l", "--log-level", "--loglevel", type=str.lower, choices=LOG_LEVELS,
                        help="log level (default: setting log_level; else info for worker "
                        "and delayer, warning for other commands)")
    common.add_argument("--log-format", choices=("json", "console", "auto"),
                        help="log lines as JSON or for a console (default: setting "
                        "log_format; auto: JSON when stdout is not a terminal)")

    parser = argparse.ArgumentParser(
        prog="streamtasks", description="Distributed tasks on Kafka and Cassandra."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("worker", parents=[common], help="run a worker")
    p.add_argument("--queues", help="comma-separated queues (default: the app's task queues)")
    p.add_argument("--concurrency", type=_positive_int, help="tasks running at once")
    p.add_argument("--max-in-flight", type=_positive_int, help="records held before pausing")
    p.add_argument("--name", help="worker name in result rows (default host:pid)")
    p.add_argument("--processes", type=_positive_int, default=1,
                   help="worker processes, each a member of the queues' groups, supervised "
                   "(default 1; process i serves metrics on PORT + i)")
    p.add_argument("--no-beat", action="store_true",
                   help="do not fire the app's periodic tasks from this worker")
    _add_metrics_flags(p)
    p.set_defaults(handler=_cmd_worker)

    p = sub.add_parser("delayer", parents=[common],
                       help="forward delayed and retried tasks when due (alone)")
    p.add_argument("--queues", required=True, help="comma-separated queues")
    _add_metrics_flags(p)
    p.set_defaults(handler=_cmd_delayer)

    p = sub.add_parser("send", parents=[common], help="send a task by name; prints its id")
    p.add_argument("name", help="registered task name")
    p.add_argument("--args", default="[]", help="positional arguments as a JSON list")
    p.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    p.add_argument("--queue", help="queue (default: the app's default queue)")
    p.add_argument("--key", help="partition key")
    p.add_argument("--id", dest="task_id", help="task id to use")
    p.add_argument("--countdown", type=_non_negative_float, metavar="SECONDS",
                   help="run no earlier than SECONDS from now")
    p.add_argument("--expires", type=_positive_float, metavar="SECONDS",
                   help="do not run later than SECONDS from now")
    p.add_argument("--wait", type=_non_negative_float, metavar="SECONDS",
                   help="wait up to SECONDS for a final state and print it as `result` does "
                   "(exit code as `result`'s)")
    p.set_defaults(handler=_cmd_send)

    p = sub.add_parser("result", parents=[common], help="print a task's state and result")
    p.add_argument("task_id", help="task id")
    p.add_argument("--wait", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for a final state")
    p.set_defaults(handler=_cmd_result)

    p = sub.add_parser("tasks", parents=[common], help="list tasks by queue and state")
    p.add_argument("--queue", required=True)
    p.add_argument("--state", default=states.SUCCESS, type=str.upper,
                   choices=(*states.ALL_STATES, ANY_STATE),
                   help="the state tasks entered (ANY: every state; default SUCCESS)")
    p.add_argument("--since", type=_time, help=f"{_TIME_HELP} or -30m / -1.5h (default -1h)")
    p.add_argument("--until", type=_time, help=f"{_TIME_HELP} (default now)")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.set_defaults(handler=_cmd_tasks)

    p = sub.add_parser("migrate", parents=[common], help="create / upgrade the Cassandra schema")
    p.set_defaults(handler=_cmd_migrate)

    p = sub.add_parser("topics", parents=[common], help="manage topics")
    tsub = p.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    c = tsub.add_parser("create", parents=[common], help="create a queue's topics")
    c.add_argument("--queue", required=True, action="append", help="queue (repeatable)")
    c.add_argument("--partitions", type=_positive_int, help="partition count")
    c.set_defaults(handler=_cmd_topics_create)
    c = tsub.add_parser("list", parents=[common],
                        help="the namespace's queues: partitions and lag of their group")
    c.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    c.set_defaults(handler=_cmd_topics_list)
    c = tsub.add_parser("alter", parents=[common],
                        help="grow a queue's topics (task topic, delay tiers, DLQ) together")
    c.add_argument("--queue", required=True)
    c.add_argument("--partitions", type=_positive_int, required=True,
                   help="the new partition count (grow only)")
    c.set_defaults(handler=_cmd_topics_alter)

    p = sub.add_parser("purge", parents=[common],
                       help="delete the task records waiting in a queue (Celery's purge)")
    p.add_argument("--queue", required=True)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_cmd_purge)

    _add_ops_commands(sub, common)
    add_control_commands(sub, common, _app, _positive_float)
    return parser


def _version() -> str:
    """Return the installed package's version (``unknown`` when run from a bare tree)."""
    try:
        return importlib.metadata.version("streamtasks")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_number(int, 0, "a port"), metavar="PORT",
                   help="serve /metrics, /healthz, /readyz on PORT (default: setting "
                   "metrics_port; 0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", metavar="ADDR",
                   help="address those endpoints bind (default 0.0.0.0)")


def _metrics_port(ns: argparse.Namespace, app: App) -> int:
    port = ns.metrics_port if ns.metrics_port is not None else app.settings.metrics_port
    if not 0 <= port <= 65535:
        raise CliError(f"metrics port must be 0-65535, got {port}")
    return int(port)


def _add_ops_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("dlq", parents=[common], help="list, requeue or purge dead letters")
    dsub = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    c = dsub.add_parser("list", parents=[common], help="print a queue's dead letters")
    c.add_argument("--queue", required=True)
    c.add_argument("--limit", type=_positive_int, default=50)
    c.add_argument("--reason", help="only dead letters of this reason (e.g. unknown-task)")
    c.add_argument("--json", dest="as_json", action="store_true",
                   help="one JSON object per dead letter instead of a table")
    c.set_defaults(handler=_cmd_dlq_list)
    c = dsub.add_parser("requeue", parents=[common], help="send dead letters back to run again")
    c.add_argument("--queue", required=True)
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="task_id", help="requeue this task id")
    which.add_argument("--all", dest="all_", action="store_true", help="requeue every one")
    c.add_argument("--reason", help="only dead letters of this reason (e.g. unknown-task)")
    c.set_defaults(handler=_cmd_dlq_requeue)
    c = dsub.add_parser("purge", parents=[common], help="delete every dead letter of a queue")
    c.add_argument("--queue", required=True)
    c.set_defaults(handler=_cmd_dlq_purge)

    p = sub.add_parser("replay", parents=[common], help="send a range of a queue's tasks again")
    p.add_argument("--queue", required=True)
    p.add_argument("--since", type=_time,
                   help=f"{_TIME_HELP} or -30m: records stamped at or after")
    p.add_argument("--until", type=_time, help=f"{_TIME_HELP} or -5m: records stamped before "
                   "(default: up to the end)")
    p.add_argument("--from-offset", type=_partition_offset, metavar="P:O",
                   help="first record: partition P, offset O")
    p.add_argument("--to-offset", type=_partition_offset, metavar="P:O",
                   help="last record (inclusive), same partition")
    p.add_argument("--name", help="replay only tasks of this name")
    p.add_argument("--into", help="send to this queue (default: the same queue)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be sent (partition:offset, id, name) and count it "
                   "by name; send nothing")
    p.add_argument("--same-ids", action="store_true",
                   help="keep task ids (result rows are overwritten); default: new ids for "
                   "each task and everything its workflow produces")
    p.add_argument("--include-derived", action="store_true",
                   help="also replay retry attempts and what tasks sent (workflow steps, "
                   "callbacks, children); default: only records that started a task")
    p.set_defaults(handler=_cmd_replay)

    p = sub.add_parser("inspect", parents=[common],
                       help="per queue: group members, lag, delay-tier and DLQ depth")
    p.add_argument("--queues", help="comma-separated queues (default: the app's, or every "
                   "queue with a topic on Kafka)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("groups", parents=[common], help="manage consumer groups")
    gsub = p.add_subparsers(dest="groups_command", metavar="ACTION", required=True)
    c = gsub.add_parser(
        "migrate", parents=[common],
        help="copy an old group's committed offsets to each queue's group",
        description="Copy the committed offsets of a group of an older version (one per "
        "queue set: NS.a+b, NS.a+b.delayer) to the per-queue groups (NS.a, NS.a.delayer), "
        "only where the new group has no offset yet. Stop the new workers first.",
    )
    c.add_argument("--from-group", required=True, metavar="OLD", help="the old group")
    c.add_argument("--queues", required=True, help="comma-separated queues it served")
    c.add_argument("--dry-run", action="store_true", help="print what would be copied")
    c.set_defaults(handler=_cmd_groups_migrate)


# -- argument types --------------------------------------------------------------


def _number(kind: type[int] | type[float], minimum: float, what: str) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, "a whole number")
_non_negative_float = _number(float, 0, "seconds")
_positive_float = _number(float, 0.001, "seconds")


_TIME_FLAGS = ("--since", "--until")

#: A relative time: a minus, a (possibly fractional) amount and a unit: -30m, -1.5h, -.5d.
_RELATIVE = re.compile(r"^-(\d+(?:\.\d*)?|\.\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _glue_relative_times(argv: Sequence[str]) -> list[str]:
    """Turn ``--since -30m`` into ``--since=-30m``: argparse takes ``-30m`` for a flag."""
    out: list[str] = []
    for arg in argv:
        if _RELATIVE.match(arg) and out and out[-1] in _TIME_FLAGS:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _time(text: str, now_ms: int | None = None) -> int:
    """Parse an ISO-8601 time (naive: UTC) or a relative ``-1.5h`` into ms since the epoch."""
    relative = _RELATIVE.match(text)
    if relative:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - round(float(relative.group(1)) * _UNIT_S[relative.group(2)] * 1000)
    try:
        return parse_time_ms(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{err} (relative times may be fractional: -1.5h, -90m)") from None


def _partition_offset(text: str) -> tuple[int, int]:
    """Parse ``P:O`` (partition, offset) into a pair of whole numbers."""
    partition, sep, offset = text.partition(":")
    if sep and partition.isdigit() and offset.isdigit():
        return int(partition), int(offset)
    raise argparse.ArgumentTypeError(
        f"expected PARTITION:OFFSET as whole numbers (e.g. 0:1200), got {text!r}"
    )


def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"--{what} is not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, kind):
        raise CliError(f"--{what} must be a JSON {'list' if kind is list else 'object'}")
    return value


# -- app loading -----------------------------------------------------------------


def _app(ns: argparse.Namespace) -> App:
    """The app of a command: ``--app``'s, or one from the environment; flags win over both.

    With ``--app``, ``--config`` is put in ``$STREAMTASKS_CONFIG`` before the module is
    imported, so an app built from the environment (``App("x")``,
    ``App("x", broker=...)``) reads it in the documented order; ``--broker``,
    ``--backend`` and ``--namespace`` then replace the app's values.
    """
    flags = {"broker": ns.broker, "backend": ns.backend, "namespace": ns.namespace}
    flags = {name: value for name, value in flags.items() if value is not None}
    if ns.app:
        app = _import_app(ns.app, ns.config)
        if flags:
            app.settings = app.settings.replace(**flags)
    else:
        app = App.from_env(config_file=ns.config, **flags)
    # A worker or forwarder reports at INFO; every other command is a client: WARNING.
    default = "info" if ns.command in _SERVICE_COMMANDS else "warning"
    configure_logging(app.settings, log_format=ns.log_format, log_level=ns.log_level,
                      default_level=default)
    return app


def _import_app(spec: str, config_file: str | None = None) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--app must look like module:attribute, got {spec!r}")
    sys.path.insert(0, ".")
    before = os.environ.get(ENV_PREFIX + "CONFIG")
    if config_file:  # an app built from the environment reads the file in its place
        os.environ[ENV_PREFIX + "CONFIG"] = config_file
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"--app: cannot import {module_name!r}: {err}") from err
    finally:
        if config_file and before is None:
            del os.environ[ENV_PREFIX + "CONFIG"]
        elif config_file and before is not None:
            os.environ[ENV_PREFIX + "CONFIG"] = before
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise CliError(f"--app: {spec!r} is not a streamtasks App")
    return app


# -- commands --------------------------------------------------------------------


def _cmd_worker(ns: argparse.Namespace) -> int:
    if not ns.app:
        raise CliError("worker needs --app module:app (the tasks it runs are registered there)")
    app = _app(ns)
    if ns.processes > 1:
        return _supervise_workers(ns, app)
    from streamtasks.health import serve_worker
    from streamtasks.metrics import WorkerMetrics

    queues = [q.strip() for q in ns.queues.split(",") if q.strip()] if ns.queues else None
    port = _metrics_port(ns, app)
    metrics = WorkerMetrics() if port else None
    worker = app.worker(queues, concurrency=ns.concurrency, max_in_flight=ns.max_in_flight,
                        name=ns.name, observer=metrics, beat=not ns.no_beat)
    server = serve_worker(worker, metrics, port, ns.metrics_host) if metrics else None
    try:
        return worker.run(freeze_startup=True)
    finally:
        if server is not None:
            server.close()


def _supervise_workers(ns: argparse.Namespace, app: App) -> int:
    """``worker --processes N``: N ``worker`` children under a :class:`Supervisor`."""
    from streamtasks.worker.supervisor import Supervisor, child_command

    port = _metrics_port(ns, app)
    # A child that cannot reach Kafka exits after its check; the supervisor would start
    # it again and again: no broker is this command's error, not a child's.
    app.broker.check_reachable()
    own = ("--processes", "--metrics-port", "--name")
    base = child_command(ns.argv, lambda arg: arg.split("=")[0] in own)

    def command(index: int) -> list[str]:
        argv = [*base, "--metrics-port", str(port + index if port else 0)]
        if ns.name:  # one name in every row would hide which process ran what
            argv += ["--name", f"{ns.name}-{index}"]
        return argv

    return Supervisor(command, ns.processes, app.settings.shutdown_grace_s).run()


def _cmd_delayer(ns: argparse.Namespace) -> int:
    import signal
    import threading

    from streamtasks.health import serve_forwarder
    from streamtasks.metrics import WorkerMetrics
    from streamtasks.worker.delayer import DelayForwarder

    queues = [q.strip() for q in ns.queues.split(",") if q.strip()]
    if not queues:
        raise CliError("--queues names no queue")
    app = _app(ns)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    port = _metrics_port(ns, app)
    metrics = WorkerMetrics() if port else None
    forwarder = DelayForwarder(app, queues, observer=metrics)
    server = serve_forwarder(forwarder, metrics, port, ns.metrics_host) if metrics else None
    try:
        forwarder.run(stop)
    finally:
        if server is not None:
            server.close()
    return EXIT_OK


def _cmd_send(ns: argparse.Namespace) -> int:
    args = _json_arg(ns.args, "args", list)
    kwargs = _json_arg(ns.kwargs, "kwargs", dict)
    app = _app(ns)
    queue = ns.queue
    if queue is None and not ns.app:
        # Without the app, the task's own queue is unknown here: say where it went.
        queue = app.settings.default_queue
        print(f"streamtasks send: no --app and no --queue: sending {ns.name} to queue "
              f"{queue!r} (give --queue or --app to send it to the task's own queue)",
              file=sys.stderr)
    try:
        app.broker.check_reachable()
    except KeyboardInterrupt:
        print("streamtasks send: interrupted while waiting for the broker to answer; "
              "nothing was sent", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        result = app.send(ns.name, args=args, kwargs=kwargs, queue=queue, key=ns.key,
                          task_id=ns.task_id, countdown_s=ns.countdown, expires_s=ns.expires,
                          confirm=True)
    except KeyboardInterrupt:
        unconfirmed = app.abandon_unconfirmed()
        print(f"streamtasks send: interrupted: {1 - len(unconfirmed)} of 1 send(s) confirmed"
              + (f"; not confirmed (may or may not be in Kafka): {', '.join(unconfirmed)}"
                 if unconfirmed else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result.id, flush=True)
    if ns.wait is None:
        return EXIT_OK
    return _print_result(app, result.id, ns.wait)


def _meta_json(meta: TaskMeta) -> str:
    body = {
        "id": meta.task_id,
        "name": meta.name,
        "queue": meta.queue,
        "state": meta.state,
        "result": meta.result,
        "error": None if meta.error_type is None else f"{meta.error_type}: {meta.error_message}",
        "traceback": meta.traceback,
        "attempts": meta.attempts,
        "worker": meta.worker,
        "created_at": _iso_or_none(meta.created_ms),
        "started_at": _iso_or_none(meta.started_ms),
        "finished_at": _iso_or_none(meta.finished_ms),
    }
    return to_json_text(body)


def _cmd_result(ns: argparse.Namespace) -> int:
    return _print_result(_app(ns), ns.task_id, ns.wait)


def _print_result(app: App, task_id: str, wait_s: float) -> int:
    """Print a task's row as JSON (waiting up to ``wait_s`` for a final state).

    Returns the exit code: 0 done or still running, 1 failed or revoked, 3 unknown.
    """
    try:
        meta = app.backend.wait(task_id, wait_s) if wait_s else app.backend.fetch(task_id)
    except ResultTimeout:
        meta = app.backend.fetch(task_id)
    if meta is None:
        print(f"streamtasks result: no task with id {task_id} is known (yet)", file=sys.stderr)
        return EXIT_UNKNOWN
    print(_meta_json(meta))
    if meta.state in (states.FAILURE, states.REVOKED):
        return EXIT_FAILED
    return EXIT_OK


def _cmd_tasks(ns: argparse.Namespace) -> int:
    until = ns.until if ns.until is not None else int(time.time() * 1000)
    since = ns.since if ns.since is not None else until - 3600 * 1000
    if since >= until:
        raise CliError("--since must be before --until")
    app = _app(ns)
    wanted = states.ALL_STATES if ns.state == ANY_STATE else (ns.state,)
    found = [meta for state in wanted
             for meta in app.backend.list_tasks(ns.queue, state, since, until, ns.limit)]
    # One row per task (a row is listed under its current state), newest first.
    unique = {meta.task_id: meta for meta in found}.values()
    newest = sorted(unique, key=lambda m: m.finished_ms or m.started_ms or m.created_ms or 0,
                    reverse=True)
    for meta in newest[: ns.limit]:
        print(_meta_json(meta))
    return EXIT_OK


def _cmd_migrate(ns: argparse.Namespace) -> int:
    app = _app(ns)
    applied = app.backend.migrate()
    for name in applied:
        print(f"applied {name}")
    print(f"schema up to date ({len(applied)} migration(s) applied)")
    return EXIT_OK


def _cmd_topics_create(ns: argparse.Namespace) -> int:
    from streamtasks.control import control_topic_spec

    app = _app(ns)
    specs = [spec for q in ns.queue for spec in app.topic_specs(q, ns.partitions)]
    specs.append(control_topic_spec(app))  # revokes (docs/control.md); one per namespace
    created = app.broker.create_topics(specs)
    for spec in specs:
        # What is there, not what was asked: an existing topic keeps its own count.
        count = app.broker.partition_count(spec.name)
        asked = "" if count == spec.partitions else f"; asked for {spec.partitions}"
        print(f"{spec.name}: {'created' if spec.name in created else 'exists'} "
              f"({count} partitions{asked})")
    return EXIT_OK


def _cmd_topics_list(ns: argparse.Namespace) -> int:
    from streamtasks.ops.topics import list_queue_topics

    app = _app(ns)
    found = list_queue_topics(app)
    if ns.as_json:
        for q in found:
            print(to_json_text({"queue": q.queue, "topic": q.topic, "partitions": q.partitions,
                                "group": q.group, "lag": q.lag_total,
                                "lag_by_partition": {str(p.partition): p.lag for p in q.lag}}))
        return EXIT_OK
    if not found:
        print(f"streamtasks topics: no queue found in namespace {app.settings.namespace}",
              file=sys.stderr)
        return EXIT_OK
    print("\t".join(("QUEUE", "TOPIC", "PARTITIONS", "GROUP", "LAG")))
    for q in found:
        print("\t".join((q.queue, q.topic, str(q.partitions), q.group, str(q.lag_total))))
    return EXIT_OK


def _cmd_topics_alter(ns: argparse.Namespace) -> int:
    from streamtasks.ops.topics import ShrinkRefused, grow_queue

    app = _app(ns)
    try:
        changes = grow_queue(app, ns.queue, ns.partitions)
    except ShrinkRefused as err:
        raise CliError(str(err)) from err
    for topic, (before, after) in changes.items():
        what = ("created" if before == 0 else "unchanged" if before == after
                else f"grown from {before}")
        print(f"{topic}: {what} ({after} partitions)")
    return EXIT_OK


def _cmd_purge(ns: argparse.Namespace) -> int:
    from streamtasks.ops.queue_purge import purge_queue, waiting_records

    if not ns.yes and not sys.stdin.isatty():
        raise CliError("purge deletes tasks for good: give --yes when stdin is not a terminal")
    app = _app(ns)
    _require_topic(app, ns.queue, app.settings.topic(ns.queue))
    if not ns.yes:
        pending = waiting_records(app, ns.queue)
        print(f"Delete the {pending.deleted} record(s) of {pending.topic} "
              f"({pending.waiting} not yet run)? [y/N] ", end="", file=sys.stderr, flush=True)
        if input().strip().lower() not in ("y", "yes"):
            print("streamtasks purge: nothing deleted", file=sys.stderr)
            return EXIT_FAILED
    report = purge_queue(app, ns.queue)
    print(f"purged {report.deleted} record(s) from {report.topic} "
          f"({report.waiting} not yet run)")
    return EXIT_OK


# -- operator tools: dead letters and replay ---------------------------------------


def _require_topic(app: App, queue: str, topic: str) -> None:
    if not app.broker.topic_exists(topic):
        raise CliError(f"queue {queue} has no topic {topic}; "
                       f"create it with streamtasks topics create --queue {queue}")


def _progress(what: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        print(f"{what}: {done}/{total} records read", file=sys.stderr, flush=True)

    return show


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _iso_or_none(ms: int | None) -> str | None:
    """Return ``ms`` since the epoch as an ISO UTC time (``...Z``), or None."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def _one_line(text: str | None) -> str:
    return " ".join(text.split()) if text else "-"


#: The header line of ``dlq list`` (tab-separated, like its rows).
_DLQ_COLUMNS = ("TASK_ID", "NAME", "REASON", "ERROR", "DEAD_AT")


def _cmd_dlq_list(ns: argparse.Namespace) -> int:
    from streamtasks.ops import list_dead_letters

    app = _app(ns)
    _require_topic(app, ns.queue, app.settings.dlq_topic(ns.queue))
    letters = list_dead_letters(app, ns.queue, ns.limit, reason=ns.reason)
    if ns.as_json:
        for letter in letters:
            print(to_json_text({**dataclasses.asdict(letter),
                                "dead_at": _iso_or_none(letter.dead_at_ms)}))
        return EXIT_OK
    print("\t".join(_DLQ_COLUMNS))
    for letter in letters:
        fields = (letter.task_id, letter.task_name, letter.reason, letter.error)
        print("\t".join([*(_one_line(f) for f in fields), _iso(letter.dead_at_ms)]))
    return EXIT_OK


def _cmd_dlq_requeue(ns: argparse.Namespace) -> int:
    from streamtasks.ops import DeadLetter, requeue

    app = _app(ns)
    topic = app.settings.dlq_topic(ns.queue)
    _require_topic(app, ns.queue, topic)
    skipped: list[DeadLetter] = []

    def skip(letter: DeadLetter, why: str) -> None:
        skipped.append(letter)
        print(f"skipped {letter.partition}:{letter.offset} (id {letter.task_id or '-'}): "
              f"cannot decode: {_one_line(why)}", file=sys.stderr)

    count = requeue(app, ns.queue, task_id=ns.task_id, all_=ns.all_, reason=ns.reason,
                    progress=_progress("requeue"), on_skip=skip)
    print(f"requeued {count}")
    if skipped:
        print(f"skipped {len(skipped)} undecodable dead letter(s)", file=sys.stderr)
    if ns.task_id is not None and count == 0 and not skipped:
        print(f"streamtasks dlq: no dead letter with id {ns.task_id} in {topic}",
              file=sys.stderr)
        return EXIT_UNKNOWN
    return EXIT_OK


def _cmd_dlq_purge(ns: argparse.Namespace) -> int:
    from streamtasks.ops import purge

    app = _app(ns)
    topic = app.settings.dlq_topic(ns.queue)
    _require_topic(app, ns.queue, topic)
    print(f"purged {purge(app, ns.queue)} dead letter(s) from {topic}")
    return EXIT_OK


def _replay_range(ns: argparse.Namespace) -> dict[str, Any]:
    """Check the replay range flags; return the matching keyword arguments of replay()."""
    by_time = ns.since is not None or ns.until is not None
    by_offset = ns.from_offset is not None or ns.to_offset is not None
    if by_time and by_offset:
        raise CliError("use --since/--until or --from-offset/--to-offset, not both")
    if by_offset:
        if ns.from_offset is None or ns.to_offset is None:
            raise CliError("an offset range needs both --from-offset P:O and --to-offset P:O")
        (p1, o1), (p2, o2) = ns.from_offset, ns.to_offset
        if p1 != p2:
            raise CliError(f"--from-offset and --to-offset must name the same partition "
                           f"(got {p1} and {p2})")
        if o1 > o2:
            raise CliError(f"--from-offset ({p1}:{o1}) is after --to-offset ({p2}:{o2})")
        return {"from_offsets": {p1: o1}, "to_offsets": {p2: o2}}
    if ns.since is None:
        raise CliError("give a range: --since T [--until T] or --from-offset P:O --to-offset P:O")
    if ns.until is not None and ns.since >= ns.until:
        raise CliError("--since must be before --until")
    return {"since_ms": ns.since, "until_ms": ns.until}


def _cmd_replay(ns: argparse.Namespace) -> int:
    from streamtasks.ops import RangeError, replay

    window = _replay_range(ns)
    app = _app(ns)
    _require_topic(app, ns.queue, app.settings.topic(ns.queue))
    if ns.into and not app.settings.create_topics:
        _require_topic(app, ns.into, app.settings.topic(ns.into))
    listing = _print_replay_item if ns.dry_run else None
    try:
        report = replay(app, ns.queue, name=ns.name, into=ns.into, dry_run=ns.dry_run,
                        same_ids=ns.same_ids, include_derived=ns.include_derived,
                        progress=_progress("replay"), listing=listing, **window)
    except RangeError as err:
        raise CliError(str(err)) from err
    if ns.dry_run:
        for name, count in sorted(report.by_name.items()):
            print(f"{count:>8}  {name}")
    sent = f"would send {report.matched}" if ns.dry_run else f"sent {report.sent}"
    left_out = []
    if report.derived:
        left_out.append(f"{report.derived} derived (retries, workflow steps, callbacks, "
                        "children: --include-derived replays them)")
    if report.repeated:
        left_out.append(f"{report.repeated} repeated id(s)")
    print(f"read {report.read}, matched {report.matched}, {sent}"
          + (f"; left out {' and '.join(left_out)}" if left_out else ""))
    if report.skipped:
        print(f"skipped {report.skipped} undecodable record(s)", file=sys.stderr)
    if report.partial_chords:
        print(f"{len(report.partial_chords)} chord(s) only partly in the range: their bodies "
              "will not run (replay a range holding all their members):", file=sys.stderr)
        for group, (replayed, size) in sorted(report.partial_chords.items()):
            print(f"  group {group}: {replayed} of {size} members", file=sys.stderr)
    return EXIT_OK


def _print_replay_item(item: ReplayItem) -> None:
    print(f"{item.partition}:{item.offset}\t{item.task_id}\t{item.name}")


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from streamtasks.ops.inspect import inspect_queues, list_queues

    app = _app(ns)
    app.broker.check_reachable()  # its admin clients for group members are its own
    if ns.queues:
        queues = [q.strip() for q in ns.queues.split(",") if q.strip()]
    else:
        queues = app.queues() if ns.app else list_queues(app.settings)
    if not queues:
        print(f"streamtasks inspect: no queue found in namespace {app.settings.namespace}",
              file=sys.stderr)
        return EXIT_UNKNOWN
    reports = inspect_queues(app, queues)
    if ns.as_json:
        print(json.dumps({"namespace": app.settings.namespace,
                          "queues": [r.as_dict() for r in reports]}, indent=2))
        return EXIT_OK
    for report in reports:
        _print_inspection(report)
    return EXIT_OK


def _print_inspection(report: QueueReport) -> None:
    group, forwarder = report.group, report.forwarder
    print(f"queue {report.queue}: {report.total} waiting (lag {report.lag_total}, "
          f"delay tiers {report.delay_total}), {report.dlq} dead letter(s)")
    print(f"  group {group.group}: {group.state}, {group.count} member(s)")
    for m in group.members or []:
        owned = " ".join(f"{t}{ps}".replace(" ", "") for t, ps in m.partitions.items())
        print(f"    {m.client_id} on {m.host.lstrip('/')}: {owned or 'no partition'}")
    print("  lag: " + (", ".join(f"p{p.partition}={p.lag}" for p in report.lag) or "-"))
    print(f"  delay tiers (group {forwarder.group}: {forwarder.state}, {forwarder.count} "
          "member(s)): " + ", ".join(f"{t}={n}" for t, n in report.delay.items()))
    if report.missing_topics:
        print(f"  missing topics: {', '.join(report.missing_topics)}")


def _cmd_groups_migrate(ns: argparse.Namespace) -> int:
    from streamtasks.ops import migrate_group

    queues = [q.strip() for q in ns.queues.split(",") if q.strip()]
    if not queues:
        raise CliError("--queues names no queue")
    app = _app(ns)
    legacy = app.settings.topology.legacy_group_ids(queues)
    if ns.from_group not in legacy:
        print(f"note: {ns.from_group} is not the old group of queues {','.join(queues)} "
              f"({' or '.join(legacy)}); copying what it has on their topics",
              file=sys.stderr)
    report = migrate_group(app, ns.from_group, queues, dry_run=ns.dry_run)
    if report.old_members:
        print(f"warning: {ns.from_group} still has {report.old_members} active member(s); "
              "offsets it commits from now on are not carried over", file=sys.stderr)
    verb = "would copy" if ns.dry_run else "copied"
    for item in report.offsets:
        where = f"{item.tp.topic}[{item.tp.partition}]"
        if item.copies:
            print(f"{verb} {where} offset {item.offset} -> {item.to_group}")
        else:
            print(f"kept {where} offset {item.existing} in {item.to_group} "
                  f"(it has its own; {ns.from_group} has {item.offset})")
    for topic, why in report.ignored.items():
        print(f"ignored {topic}: {why}", file=sys.stderr)
    print(f"{verb} {len(report.copied)} offset(s), kept {len(report.offsets) - len(report.copied)}"
          f" from {ns.from_group}")
    if not report.offsets and not report.ignored:
        print(f"streamtasks groups: {ns.from_group} has no committed offset on the topics of "
              f"queues {','.join(queues)}", file=sys.stderr)
        return EXIT_UNKNOWN
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
