"""Structured logging (structlog): JSON lines in production, key=value lines on a console.

:func:`configure_logging` (the CLI calls it) sends structlog events and stdlib ``logging``
records (the Cassandra driver, librdkafka, a task's own ``logging.info``) through one
handler on stderr with one renderer, so JSON mode is all JSON, tracebacks included.
:func:`ensure_configured` (every :class:`~streamtasks.App` calls it) gives a program that
never configured structlog quiet defaults instead of structlog's own (which prints every
level, debug included, to stdout). :func:`task_context` binds a running task's fields
(task id, name, queue, attempt, partition, offset, trace id) to every line it emits.
Secrets (passwords, SASL settings, tokens, ``user:password@`` in URLs) never reach a line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import structlog

from streamtasks import tracing
from streamtasks.settings import ENV_PREFIX, Settings

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


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_KEYS)


def redact_text(text: str) -> str:
    """Return ``text`` with URL passwords (``user:pass@``) and ``password=…`` values hidden."""
    text = _URL_USERINFO.sub(r"\g<head>:" + _REDACTED + "@", text)
    return _SECRET_PARAM.sub(r"\g<head>" + _REDACTED, text)


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
    """
    env = os.environ if env is None else env
    chosen = log_format or env.get(ENV_PREFIX + "LOG_FORMAT") or settings.log_format or "auto"
    chosen = chosen.strip().lower()
    if chosen == "auto":
        return "console" if _isatty(sys.stdout) else "json"
    return "json" if chosen == "json" else "console"


def resolve_level(
    settings: Settings, log_level: str | None = None, env: Mapping[str, str] | None = None
) -> int:
    """Return the stdlib level: ``log_level``, else ``$STREAMTASKS_LOG_LEVEL``, else settings."""
    env = os.environ if env is None else env
    name = log_level or env.get(ENV_PREFIX + "LOG_LEVEL") or settings.log_level or "info"
    level = logging.getLevelName(name.strip().upper())
    return level if isinstance(level, int) else logging.INFO


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _shared_processors(json: bool, stdlib: bool = True) -> list[structlog.typing.Processor]:
    processors: list[structlog.typing.Processor] = [structlog.contextvars.merge_contextvars]
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
    settings: Settings, *, log_format: str | None = None, log_level: str | None = None
) -> None:
    """Configure structlog and stdlib logging for a streamtasks process (worker, CLI).

    Every line goes to stderr; stdout stays the command's output. The root logger gets
    one handler (replacing one installed here before); chatty libraries stay at WARNING
    unless the level is DEBUG.

    Args:
        settings: ``log_format`` and ``log_level`` are read.
        log_format: ``json``, ``console`` or ``auto``, over the settings and environment.
        log_level: ``debug``, ``info``, ``warning``, ``error``, over settings and environment.
    """
    json = resolve_format(settings, log_format) == "json"
    level = resolve_level(settings, log_level)
    shared = _shared_processors(json)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler(sys.stderr)
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
    program that only sends tasks would print the library's debug lines. Here: the
    ``log_level`` setting (INFO by default), stderr, and the program's stdlib logging
    left alone. A program that configures structlog itself (before or after) wins.
    """
    if structlog.is_configured():
        return
    json = resolve_format(settings) == "json"
    structlog.configure(
        processors=[*_shared_processors(json, stdlib=False), _renderer(json)],
        wrapper_class=structlog.make_filtering_bound_logger(resolve_level(settings)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # Resolve sys.stderr per logger, so a replaced stream (tests, daemons) is followed.
    return structlog.PrintLogger(sys.stderr)


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
    fields = {k: v for k, v in context.items() if k != "traceparent" and v is not None}
    traceparent = context.get("traceparent")
    with tracing.task_run(
        name, traceparent if isinstance(traceparent, str) else None, fields
    ) as run:
        # bind, then reset by the tokens: restores what was bound before without reading
        # the whole context first (structlog's bound_contextvars does, once per task)
        tokens = structlog.contextvars.bind_contextvars(
            task=name, trace_id=run.trace_id, span_id=run.span_id, **fields
        )
        try:
            yield run
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
