"""Logs: one format per process (JSON lines or console), task fields on task lines, no secrets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from streamtasks import App, Settings
from streamtasks.logs import (
    configure_logging,
    redact_secrets,
    redact_text,
    resolve_format,
    resolve_level,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line must parse


# -- redaction ---------------------------------------------------------------------------


def test_secret_keys_and_url_passwords_are_redacted() -> None:
    event = {
        "event": "connecting to cassandra://app:c4ss-pw@db:9042/ks",
        "config": {"bootstrap.servers": "k:9092", "sasl.password": "k4fka-pw",
                   "sasl.username": "svc", "ssl.key.password": "k3y-pw",
                   "sasl.jaas.config": "... password=\"j44s-pw\";"},
        "password": "p4ss",
        "url": "kafka://k:9092?security.protocol=SASL_SSL&sasl.password=q-pw&x=1",
        "urls": ["https://u:l1st-pw@host/x"],
        "secret": 12345,
        "attempt": 3,
    }
    out = redact_secrets(None, "info", dict(event))
    text = json.dumps(out)
    for secret in ("c4ss-pw", "k4fka-pw", "k3y-pw", "j44s-pw", "p4ss", "q-pw", "l1st-pw",
                   "12345"):
        assert secret not in text, secret
    # what is not secret stays readable
    assert out["config"]["sasl.username"] == "svc"
    assert out["config"]["bootstrap.servers"] == "k:9092"
    assert "cassandra://app:***@db:9042/ks" in out["event"]
    assert out["url"].endswith("sasl.password=***&x=1")
    assert out["attempt"] == 3


def test_redact_text_leaves_plain_urls_alone() -> None:
    assert redact_text("kafka://k1:9092,k2:9092") == "kafka://k1:9092,k2:9092"
    assert redact_text("cassandra://db:9042/ks") == "cassandra://db:9042/ks"


# -- format and level --------------------------------------------------------------------


def test_format_flag_beats_environment_beats_settings() -> None:
    console, json_settings = Settings(log_format="console"), Settings(log_format="json")
    assert resolve_format(console, env={}) == "console"
    assert resolve_format(json_settings, env={}) == "json"
    assert resolve_format(console, env={"STREAMTASKS_LOG_FORMAT": "json"}) == "json"
    assert resolve_format(json_settings, "console", env={"STREAMTASKS_LOG_FORMAT": "json"}) \
        == "console"
    # auto: JSON unless stdout is a terminal (it is not under pytest's capture)
    assert resolve_format(console, env={"STREAMTASKS_LOG_FORMAT": "auto"}) == "json"
    assert resolve_level(Settings(), env={}) == logging.INFO
    assert resolve_level(Settings(), env={"STREAMTASKS_LOG_LEVEL": "debug"}) == logging.DEBUG


def test_json_mode_is_all_json_stdlib_and_tracebacks_included(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(Settings(log_format="json", log_level="info"))
    structlog.get_logger("streamtasks.test").info("hello", password="s3cret")
    structlog.get_logger("streamtasks.test").debug("not at info")
    logging.getLogger("cassandra.cluster").warning("host %s down", "db1")
    logging.getLogger("cassandra.cluster").info("chatty driver line")
    try:
        raise RuntimeError("driver failed at cassandra://u:dr1ver-pw@db/ks")
    except RuntimeError:
        logging.getLogger("cassandra.pool").exception("connection error")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = _json_lines(captured.err)
    assert [line["event"] for line in lines] == ["hello", "host db1 down", "connection error"]
    assert lines[0]["password"] == "***" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "cassandra.cluster" and lines[1]["level"] == "warning"
    assert "RuntimeError" in lines[2]["exception"]
    assert "dr1ver-pw" not in captured.err


def test_console_mode_is_key_value(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(Settings(log_format="console"), log_level="warning")
    structlog.get_logger("streamtasks.test").warning("careful", queue="q1")
    structlog.get_logger("streamtasks.test").info("hidden")
    err = capsys.readouterr().err
    assert "careful" in err and "queue=q1" in err and "hidden" not in err


def test_every_line_of_a_running_task_carries_its_fields(
    app: App, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(app.settings, log_format="json", log_level="info")

    @app.task(name="chatty")
    def chatty(n: int) -> int:
        logging.getLogger("my.tasks").info("stdlib line %d", n)
        structlog.get_logger("my.tasks").info("structlog line", n=n)
        return n

    result = chatty.delay(3)
    app.drain()
    structlog.get_logger("my.tasks").info("after the run")
    lines = [line for line in _json_lines(capsys.readouterr().err)
             if line.get("logger") == "my.tasks"]
    assert [line["event"] for line in lines] == ["stdlib line 3", "structlog line",
                                                 "after the run"]
    for line in lines[:2]:
        assert line["task_id"] == result.id and line["task"] == "chatty"
        assert line["queue"] == "default" and line["attempt"] == 1
        assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
        assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
    # nothing leaks out of the run
    assert not {"task_id", "task", "trace_id", "offset"} & set(lines[2])


def test_fields_bound_around_a_run_are_back_after_it(
    app: App, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(app.settings, log_format="json", log_level="info")

    @app.task(name="quiet")
    def quiet() -> None:
        structlog.get_logger("my.tasks").info("inside")

    # Given fields a program bound itself, one of them also a task field
    structlog.contextvars.bind_contextvars(task="outer", request_id="r-1")
    try:
        quiet.delay()
        app.drain()
        structlog.get_logger("my.tasks").info("after")
    finally:
        structlog.contextvars.unbind_contextvars("task", "request_id")
    inside, after = [line for line in _json_lines(capsys.readouterr().err)
                     if line.get("logger") == "my.tasks"]
    # Then the run saw its own, and after it the program's are as they were
    assert inside["task"] == "quiet"
    assert after["task"] == "outer" and after["request_id"] == "r-1"
    assert "task_id" not in after and "span_id" not in after


def test_task_fields_in_async_tasks(
    app: App, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(app.settings, log_format="json", log_level="info")

    @app.task(name="chatty_async")
    async def chatty_async(n: int) -> int:
        logging.getLogger("my.tasks").info("async line %d", n)
        return n

    result = chatty_async.delay(2)
    app.drain()
    lines = [line for line in _json_lines(capsys.readouterr().err)
             if line.get("logger") == "my.tasks"]
    assert len(lines) == 1 and lines[0]["task_id"] == result.id
    assert lines[0]["task"] == "chatty_async" and "offset" in lines[0]


# -- client programs ---------------------------------------------------------------------


def test_a_client_program_that_sends_prints_nothing(tmp_path: Path) -> None:
    # Given a program that never configures logging, builds a Kafka broker (its debug
    # "configured" line) and sends a task
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        from streamtasks import App
        kafka = App("c", broker="kafka://user:pw@127.0.0.1:1", backend="memory://")
        kafka.broker  # built, never connected
        app = App("d", broker="memory://", backend="memory://")

        @app.task(name="add")
        def add(a: int, b: int) -> int:
            return a + b

        add.delay(1, 2)
        app.flush()
    """))
    # When it runs, Then it prints nothing: no debug line, no config dict
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "configured" not in out.stderr and "pw" not in out.stderr


def test_a_program_that_configured_structlog_keeps_its_configuration(
    restore_logging: None
) -> None:
    seen: list[dict[str, Any]] = []

    def keep(_l: object, _m: str, event: dict[str, Any]) -> str:
        seen.append(event)
        return ""

    structlog.configure(processors=[keep], logger_factory=structlog.ReturnLoggerFactory())
    App("mine", broker="memory://", backend="memory://")
    structlog.get_logger().info("mine")
    assert seen and seen[0]["event"] == "mine"
