"""Structured logging (structlog): JSON lines in production, key=value lines on a console.

:func:`configure_logging` (the CLI calls it) sends structlog events and stdlib ``logging``
records (the Cassandra driver, librdkafka, a task's own ``logging.info``) through one
handler on stderr with one renderer, so JSON mode is all JSON, tracebacks included.
:func:`ensure_configured` (every :class:`~streamtasks.App` calls it) gives a program that
never configured structlog quiet defaults instead of structlog's own (which prints every
level, debug included, to stdout). :func:`task_context` binds a running task's fields
(task id, name, queue, attempt, partition, offset, trace id) to every line it emits:
one contextvar holds them, and :func:`merge_task_fields` (a processor in the chains
configured here; a program configuring structlog itself adds it) puts them on a line.
Secrets (passwords, SASL settings, tokens, ``user:password@`` in URLs) never reach a line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from streamtasks import tracing
from streamtasks.context import Running, reset_running, set_running
from streamtasks.errors import ConfigError
from streamtasks.settings import ENV_PREFIX, LOG_LEVELS, Settings

#: Key fragments whose values are secrets, redacted wherever they appear in an event.
SECRET_KEYS = ("password", "passwd", "secret", "token", "sasl.jaas", "sasl.oauthbearer",
               "credential", "api_key", "apikey", "private_key", "key.pem", "auth_provider")
_REDACTED = "***"
_URL_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@?#]*):[^\s@/?#]*@")
_SECRET_PARAM = re.compile(
    r"(?P<head>\b[\w.\-]*(?:password|passwd|secret|token|sasl\.jaas\.config)[\w.\-]*=)[^&\s;,'\"]+",
    re.IGNORECASE,
)
#: Stdlib loggers of libraries that are chatty at INFO: kept at WARNING unless debugging.
_QUIET_LIBRARIES = ("cassandra", "streamtasks.broker.librdkafka", "urllib3", "asyncio")

#: How long a repeated warning or error stays collapsed into its first line.
REPEAT_INTERVAL_S = 30.0
#: Stdlib loggers of the clients whose errors repeat for as long as a service is down.
_CLIENT_LOGGERS = ("streamtasks.broker.librdkafka", "streamtasks.backend.acsylla",
                   "cassandra", "cassandra.cluster", "cassandra.connection", "cassandra.pool",
                   "cassandra.io.asyncorereactor", "cassandra.io.libevreactor",
                   "cassandra.policies", "cassandra.metadata")
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b")


class RepeatGate:
    """One line per distinct warning or error per interval; repeats counted, not printed.

    A client retrying an unreachable service says the same thing many times a second for
    as long as it is down (librdkafka's error callback and log, the Cassandra driver's
    reconnection warnings). The first line of each distinct message is let through; the
    same message within ``interval_s`` is dropped and counted, and the next one let
    through after the interval says how many were suppressed. Lines below WARNING are
    never collapsed. Thread-safe; memory is one entry per distinct message.

    Args:
        interval_s: how long a message stays collapsed after it was shown.
        clock: the monotonic clock (tests pass their own).
    """

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._shown: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """Return None to drop this line, else how many like it were dropped before it."""
        if self.interval_s <= 0:
            return 0
        now = self._clock()
        with self._lock:
            shown = self._shown.get(key)
            if shown is not None and now - shown[0] < self.interval_s:
                self._shown[key] = (shown[0], shown[1] + 1)
                return None
            self._shown[key] = (now, 0)
            if len(self._shown) > 10_000:  # messages that never repeat: forget the oldest
                self._shown.pop(next(iter(self._shown)))
            return shown[1] if shown is not None else 0

    def processor(
        self, _logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: collapse repeated warnings and errors (see the class)."""
        if method not in ("warning", "warn", "error", "critical", "exception", "fatal"):
            return event_dict
        key = tuple(sorted((k, _DURATION.sub("N", str(v))) for k, v in event_dict.items()
                           if k not in ("timestamp", "exc_info", "exception")))
        suppressed = self.admit(key)
        if suppressed is None:
            raise structlog.DropEvent
        if suppressed:
            event_dict["suppressed_repeats"] = suppressed
        return event_dict

    def filter(self, record: logging.LogRecord) -> bool:
        """A stdlib filter: the same for ``logging`` records (each record judged once)."""
        if record.levelno < logging.WARNING or isinstance(record.msg, dict):
            return True  # structlog's own events were judged by the processor
        if getattr(record, "streamtasks_gated", False):
            return True
        record.streamtasks_gated = True
        text = record.getMessage()
        suppressed = self.admit((record.name, record.levelno, _DURATION.sub("N", text)))
        if suppressed is None:
            return False
        if suppressed:
            record.msg, record.args = (
                f"{text} [{suppressed} more like it in the last {self.interval_s:g}s]", ())
        return True


class _GateFilter(logging.Filter):
    """A logger's filter delegating to a :class:`RepeatGate` (replaced on reconfiguration)."""

    def __init__(self, gate: RepeatGate) -> None:
        super().__init__()
        self.gate = gate

    def filter(self, record: logging.LogRecord) -> bool:
        return self.gate.filter(record)


def _gate_client_loggers(gate: RepeatGate) -> None:
    """Collapse repeats on the clients' own loggers, whatever handler prints them."""
    for name in _CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _GateFilter)]:
            logger.removeFilter(old)
        logger.addFilter(_GateFilter(gate))



@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:  # field names are few: each is judged once
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_KEYS)


def redact_text(text: str) -> str:
    """Return ``text`` with URL passwords (``user:pass@``) and ``password=…`` values hidden."""
    # Most fields (ids, names, states) hold neither form: two substring tests skip the
    # regular expressions, which were half the cost of a log line.
    if "@" in text and "://" in text:
        text = _URL_USERINFO.sub(r"\g<head>:" + _REDACTED + "@", text)
    if "=" in text:
        text = _SECRET_PARAM.sub(r"\g<head>" + _REDACTED, text)
    return text


def redact_value(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets hidden: under secret-looking keys, in URLs, nested."""
    if key and _secret_key(key) and value not in (None, "", False):
        return _REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Hide secrets in every field of an event (a structlog processor; see :func:`redact_value`)."""
    for key, value in list(event_dict.items()):
        if isinstance(value, str | Mapping | list | tuple):
            event_dict[key] = redact_value(value, key)
        elif _secret_key(key) and value is not None:
            event_dict[key] = _REDACTED
    return event_dict


def resolve_format(
    settings: Settings, log_format: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Return ``json`` or ``console``.

    The first given of: ``log_format`` (``--log-format``), ``$STREAMTASKS_LOG_FORMAT`` (the
    worker's environment wins over settings an app module builds in code), the
    ``log_format`` setting. ``auto`` (or nothing): JSON when stdout is not a terminal.

    Raises:
        ConfigError: the format is not ``json``, ``console`` or ``auto``.
    """
    env = os.environ if env is None else env
    chosen = log_format or env.get(ENV_PREFIX + "LOG_FORMAT") or settings.log_format or "auto"
    chosen = chosen.strip().lower()
    if chosen == "auto":
        return "console" if _isatty(sys.stdout) else "json"
    if chosen not in ("json", "console"):
        raise ConfigError(f"log format {chosen!r} (from {ENV_PREFIX}LOG_FORMAT, log_format or "
                          "--log-format) is not one of json, console, auto")
    return chosen


def resolve_level(
    settings: Settings,
    log_level: str | None = None,
    env: Mapping[str, str] | None = None,
    default: str = "info",
) -> int:
    """Return the stdlib level of a process.

    The first given of: ``log_level`` (``-l``), ``$STREAMTASKS_LOG_LEVEL``, the settings'
    ``log_level`` when it was set (not its default), ``default`` (``info`` for a worker,
    ``warning`` for a client: a program that only sends tasks logs nothing below WARNING
    unless asked).

    Raises:
        ConfigError: the level is not one of :data:`~streamtasks.settings.LOG_LEVELS`.
    """
    env = os.environ if env is None else env
    chosen = settings.log_level if "log_level" in settings.model_fields_set else None
    name = log_level or env.get(ENV_PREFIX + "LOG_LEVEL") or chosen or default
    if name.strip().lower() not in LOG_LEVELS:  # never a silent INFO for a typo
        raise ConfigError(f"log level {name!r} (from {ENV_PREFIX}LOG_LEVEL, log_level or -l) "
                          f"is not one of {', '.join(LOG_LEVELS)}")
    return int(logging.getLevelName(name.strip().upper()))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


#: The running task's log fields (see :func:`task_context`), None outside a run.
_task_fields: ContextVar[Mapping[str, object] | None] = ContextVar(
    "streamtasks_task_fields", default=None)


def merge_task_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: put the running task's fields on a line (see :func:`task_context`).

    A field the line names itself wins; a task's field wins over one the program bound
    with ``structlog.contextvars`` (this runs before ``merge_contextvars``). A program
    that configures structlog itself puts it first in its processors to see the fields.
    """
    fields = _task_fields.get()
    if fields is not None:
        for key, value in fields.items():
            if key not in event_dict:
                event_dict[key] = value
    return event_dict


def _shared_processors(json: bool, stdlib: bool = True) -> list[structlog.typing.Processor]:
    processors: list[structlog.typing.Processor] = [
        merge_task_fields, structlog.contextvars.merge_contextvars]
    if stdlib:  # loggers are stdlib loggers: they have a name
        processors.append(structlog.stdlib.add_logger_name)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:  # a traceback is one string field: one line per event
        processors.append(structlog.processors.format_exc_info)
    processors.append(redact_secrets)
    return processors


def _renderer(json: bool) -> structlog.typing.Processor:
    if json:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is now (tests and daemons replace it)."""

    streamtasks_owned = True

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(
    settings: Settings,
    *,
    log_format: str | None = None,
    log_level: str | None = None,
    default_level: str = "info",
) -> None:
    """Configure structlog and stdlib logging for a streamtasks process (worker, CLI).

    Every line goes to stderr; stdout stays the command's output. The root logger gets
    one handler (replacing one installed here before); chatty libraries stay at WARNING
    unless the level is DEBUG. Repeated warnings and errors are collapsed
    (:class:`RepeatGate`, the ``log_repeat_interval_s`` setting).

    Args:
        settings: ``log_format``, ``log_level`` and ``log_repeat_interval_s`` are read.
        log_format: ``json``, ``console`` or ``auto``, over the settings and environment.
        log_level: ``debug``, ``info``, ``warning``, ``error``, over settings and environment.
        default_level: the level when none is asked for (``info`` for a worker,
            ``warning`` for a command that is a client).
    """
    json = resolve_format(settings, log_format) == "json"
    level = resolve_level(settings, log_level, default=default_level)
    shared = _shared_processors(json)
    gate = RepeatGate(settings.log_repeat_interval_s)
    _gate_client_loggers(gate)
    structlog.configure(
        processors=[gate.processor, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler(sys.stderr)
    handler.addFilter(_GateFilter(gate))  # every other library's records too
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(json)],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "streamtasks_owned", False)]:
        root.removeHandler(old)
    if json:  # JSON mode is JSON only: a plain console handler (basicConfig) goes
        for other in [h for h in root.handlers if type(h) is logging.StreamHandler
                      and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]:
            root.removeHandler(other)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else
                                         max(level, logging.WARNING))
    logging.captureWarnings(True)


def ensure_configured(settings: Settings) -> None:
    """Give structlog quiet defaults when the program has not configured it.

    Unconfigured, structlog prints every event, debug included, to stdout: a client
    program that only sends tasks would print the library's debug lines. Here: WARNING
    unless a level is asked for (``$STREAMTASKS_LOG_LEVEL`` or the ``log_level``
    setting), stderr, repeated warnings and errors collapsed (the clients' own stdlib
    loggers too, see :class:`RepeatGate`), and the program's stdlib handlers left alone.
    A program that configures structlog itself (before or after) wins.
    """
    gate = RepeatGate(settings.log_repeat_interval_s)
    _gate_client_loggers(gate)
    if structlog.is_configured():
        return
    json = resolve_format(settings) == "json"
    structlog.configure(
        processors=[gate.processor, *_shared_processors(json, stdlib=False), _renderer(json)],
        wrapper_class=structlog.make_filtering_bound_logger(
            resolve_level(settings, default="warning")),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # Resolve sys.stderr per logger, so a replaced stream (tests, daemons) is followed.
    return structlog.PrintLogger(sys.stderr)


class CachedLogger:
    """A module's logger that assembles its bound logger once per structlog configuration.

    ``structlog.get_logger()`` returns a lazy proxy that, with
    ``cache_logger_on_first_use=False`` (kept so that a reconfiguration, e.g. a test's or
    the CLI's after import, takes effect), builds a fresh logger at every call: a factory
    call, a context and a wrapper per line, even a line dropped by its level. This one
    keeps the logger it built until the configuration changes (processors, wrapper class
    with its level, logger factory, context class), checked by identity at each call.
    Bound fields from :func:`task_context` still apply: they are merged when a line is
    processed, not when the logger is built.

    Args:
        name: the stdlib logger name (``streamtasks.worker``).
    """

    __slots__ = ("_bound", "_key", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._key: tuple[object, ...] = ()
        self._bound: Any = None

    def _logger(self) -> Any:
        config = structlog.get_config()
        processors, wrapper = config["processors"], config["wrapper_class"]
        factory, context = config["logger_factory"], config["context_class"]
        cached = self._key
        # Compared by identity, spelled out: a generator over zip() cost a microsecond
        # per line (one per task sent: App.publish's debug line).
        if not (cached and cached[0] is processors and cached[1] is wrapper
                and cached[2] is factory and cached[3] is context):
            self._bound = structlog.get_logger(self._name).bind()
            self._key = (processors, wrapper, factory, context)
        return self._bound

    def bind(self, **values: Any) -> Any:
        """Return the current logger with ``values`` bound (structlog's ``bind``)."""
        return self._logger().bind(**values)

    def __getattr__(self, method: str) -> Any:
        return getattr(self._logger(), method)


def get_logger(name: str) -> CachedLogger:
    """Return a cheap module-level logger for ``name`` (see :class:`CachedLogger`)."""
    return CachedLogger(name)


class TaskScope:
    """One run's scope: its request, trace and log fields current, then put back.

    A plain class (not a generator context manager): entered once per task run, on the
    worker's hot path, at the cost of three contextvar sets (no structlog binding of
    each field; :func:`merge_task_fields` reads them when a line is emitted).

    Args:
        name: the task name.
        context: what the worker knows of the run: ``task_id``, ``queue``, ``attempt``,
            ``partition``, ``offset`` (logged), ``traceparent`` (the record's, traced);
            None: no trace and no fields (the request alone is made current).
        running: the run's request (``current_task().request``), or None.
    """

    __slots__ = ("_context", "_name", "_otel", "_running", "_tokens")

    def __init__(self, name: str, context: Mapping[str, object] | None,
                 running: Running | None = None) -> None:
        self._name, self._context, self._running = name, context, running
        self._otel: contextlib.ExitStack | None = None
        self._tokens: tuple[Any, Any, Any] = (None, None, None)  # running, trace, fields

    def __enter__(self) -> tracing.TraceContext | None:
        """Make the run current; return its trace context (None without a context)."""
        running = None if self._running is None else set_running(self._running)
        context = self._context
        if context is None:
            self._tokens = (running, None, None)
            return None
        fields = {k: v for k, v in context.items() if k != "traceparent" and v is not None}
        traceparent = context.get("traceparent")
        parent = traceparent if isinstance(traceparent, str) else None
        begun = tracing.enter_run(parent)
        if begun is not None:
            run, trace = begun
        else:  # OpenTelemetry makes the span: its own context manager
            self._otel, trace = contextlib.ExitStack(), None
            run = self._otel.enter_context(tracing.task_run(self._name, parent, fields))
        fields = {"task": self._name, "trace_id": run.trace_id, "span_id": run.span_id,
                  **fields}
        self._tokens = (running, trace, _task_fields.set(fields))
        return run

    def __exit__(self, *exc: object) -> None:
        running, trace, fields = self._tokens
        if fields is not None:
            _task_fields.reset(fields)
        if trace is not None:
            tracing.exit_run(trace)
        if self._otel is not None:
            self._otel.close()
            self._otel = None
        if running is not None:
            reset_running(running)


@contextlib.contextmanager
def task_context(name: str, context: Mapping[str, object]) -> Iterator[tracing.TraceContext]:
    """Within the block, a task runs: its trace is current and its fields are on every line.

    Args:
        name: the task name.
        context: what the worker knows of the run: ``task_id``, ``queue``, ``attempt``,
            ``partition``, ``offset`` (logged), ``traceparent`` (the record's, traced).

    Yields:
        The run's trace context (what the worker gives the task's follow-ups).
    """
    with TaskScope(name, context) as run:
        assert run is not None
        yield run
