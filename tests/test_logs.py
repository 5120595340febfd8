"""Logs: one format per process (JSON lines or console), task fields on task lines, no secrets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from streamtasks import App, Settings
from streamtasks.errors import ConfigError
from streamtasks.logs import (
    _CLIENT_LOGGERS,
    RepeatGate,
    _GateFilter,
    configure_logging,
    ensure_configured,
    merge_task_fields,
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
    for name in _CLIENT_LOGGERS:
        gates = logging.getLogger(name).filters
        gates[:] = [f for f in gates if not isinstance(f, _GateFilter)]


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


def test_a_program_configuring_structlog_itself_gets_task_fields_by_the_processor(
    app: App, restore_logging: None
) -> None:
    # Given a program's own structlog configuration with merge_task_fields first
    seen: list[dict[str, Any]] = []

    def keep(_logger: Any, _method: str, event: Any) -> Any:
        seen.append(dict(event))
        raise structlog.DropEvent

    structlog.reset_defaults()
    structlog.configure(processors=[merge_task_fields, structlog.contextvars.merge_contextvars,
                                    keep])

    @app.task(name="mine")
    def mine() -> None:
        structlog.get_logger().info("inside")
        structlog.get_logger().info("own queue", queue="named-by-the-line")

    result = mine.delay()
    app.drain()
    structlog.get_logger().info("outside")
    inside, named, outside = [e for e in seen if e["event"] in ("inside", "own queue",
                                                                "outside")]
    # Then lines in the run carry its fields, a field the line names itself wins,
    # and nothing is left after the run
    assert inside["task_id"] == result.id and inside["task"] == "mine"
    assert inside["queue"] == "default" and len(inside["span_id"]) == 16
    assert named["queue"] == "named-by-the-line" and named["task_id"] == result.id
    assert not {"task_id", "task", "queue", "trace_id"} & set(outside)


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
    out = run_client(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "configured" not in out.stderr and "pw" not in out.stderr


def test_librdkafkas_load_in_progress_retries_print_nothing_in_a_client_program(
    tmp_path: Path,
) -> None:
    # Given a program that never configures logging and gets librdkafka's lines, as right
    # after Kafka started: a transient "load in progress: retrying" and a real warning
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import logging
        from streamtasks.broker.kafka import librdkafka_logger

        logger = librdkafka_logger()
        logger.log(logging.WARNING, "%s [%s] %s", "GETPID", "rdkafka#producer-1",
                   "Failed to acquire idempotence PID from broker 127.0.0.1:9092/1: "
                   "Broker: Coordinator load in progress: retrying")
        logger.log(logging.WARNING, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                   "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed")
    """))
    # When it runs, Then only the real warning reaches stderr (Python's last resort)
    out = run_client(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "load in progress" not in out.stderr
    assert "Connect to ipv4#127.0.0.1:9092 failed" in out.stderr


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



# -- levels: clients quiet unless asked, workers at INFO ---------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_client(script: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a client program against this tree's streamtasks (not whatever is installed)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTASKS_")}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=90, cwd=cwd, env={**clean, "PYTHONPATH": str(REPO), **env})


def test_a_client_logs_nothing_below_warning_unless_asked(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import structlog
        from streamtasks import App
        app = App("c", broker="memory://", backend="memory://")
        structlog.get_logger("streamtasks.app").info("an info line")
        structlog.get_logger("streamtasks.app").warning("a warning line")
    """))
    quiet = run_client(script, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "a warning line" in quiet.stderr and "an info line" not in quiet.stderr
    asked = run_client(script, tmp_path, STREAMTASKS_LOG_LEVEL="info")
    assert "an info line" in asked.stderr and asked.stdout == ""


def test_a_level_left_to_its_default_is_not_asked_for() -> None:
    assert resolve_level(Settings(), env={}, default="warning") == logging.WARNING
    assert resolve_level(Settings(), env={}) == logging.INFO  # a worker
    assert resolve_level(Settings(log_level="info"), env={}, default="warning") == logging.INFO
    from_env = Settings.from_env(env={"STREAMTASKS_LOG_LEVEL": "debug"})
    assert resolve_level(from_env, env={}, default="warning") == logging.DEBUG
    changed = Settings().replace(broker="memory://")  # App(broker=...) over settings
    assert resolve_level(changed, env={}, default="warning") == logging.WARNING
    with pytest.raises(ConfigError, match=r"'loud'.*not one of debug, info"):
        resolve_level(Settings(), env={"STREAMTASKS_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match=r"'jsn'.*not one of json, console, auto"):
        resolve_format(Settings(), env={"STREAMTASKS_LOG_FORMAT": "jsn"})


def test_cli_commands_are_clients_and_the_worker_logs_at_info(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from streamtasks.cli import main

    assert main(["send", "t", "--broker", "memory://", "--backend", "memory://"]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert main(["send", "t", "--broker", "memory://", "--backend", "memory://",
                 "-l", "info"]) == 0
    assert logging.getLogger().level == logging.INFO


def test_one_info_line_per_finished_task(
    app: App, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(app.settings, log_format="json", default_level="info")

    @app.task(name="fine")
    def fine() -> int:
        return 1

    @app.task(name="broken")
    def broken() -> None:
        raise KeyError("gone")

    ok, bad = fine.delay(), broken.delay()
    with pytest.raises(KeyError):
        app.drain()
    lines = [line for line in _json_lines(capsys.readouterr().err)
             if line["event"] == "task finished"]
    by_id = {line["id"]: line for line in lines}
    assert len(lines) == 2 and set(by_id) == {ok.id, bad.id}
    assert by_id[ok.id]["state"] == "SUCCESS" and by_id[ok.id]["task"] == "fine"
    assert by_id[bad.id]["state"] == "FAILURE" and "KeyError" in by_id[bad.id]["error"]
    for line in lines:
        assert line["level"] == "info" and line["duration_s"] >= 0
        assert line["queue"] == "default" and line["attempt"] == 1


# -- repeated client errors are collapsed ------------------------------------------------


def test_the_gate_shows_a_message_once_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    gate = RepeatGate(10.0, clock=lambda: now[0])
    assert gate.admit("refused") == 0
    assert [gate.admit("refused") for _ in range(77)] == [None] * 77
    assert gate.admit("other") == 0  # a distinct message is shown at once
    now[0] = 10.5
    assert gate.admit("refused") == 77  # shown again, with the count of the suppressed
    assert gate.admit("refused") is None
    assert RepeatGate(0).admit("x") == 0 and RepeatGate(0).admit("x") == 0  # 0: off


def test_repeated_warnings_are_collapsed_stdlib_and_structlog_alike(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(Settings(log_format="json"), default_level="info")
    for attempt in range(50):
        structlog.get_logger("streamtasks.broker.kafka").warning(
            "kafka client error", error="Connection refused")
        logging.getLogger("cassandra.pool").warning(
            "Error attempting to reconnect to 10.0.0.1 (after %dms)", attempt)
        logging.getLogger("streamtasks.broker.librdkafka").error("FAIL: connect refused")
        logging.getLogger("other.library").warning("disk almost full")
        structlog.get_logger("streamtasks.worker").info("task finished", n=1)
    lines = _json_lines(capsys.readouterr().err)
    events = [line["event"] for line in lines]
    assert events.count("kafka client error") == 1
    assert len([e for e in events if e.startswith("Error attempting to reconnect")]) == 1
    assert events.count("FAIL: connect refused") == 1
    assert events.count("disk almost full") == 1  # any library, through the handler
    assert events.count("task finished") == 50  # INFO is never collapsed


def test_an_unreachable_broker_prints_a_line_per_distinct_error_not_a_stream(
    tmp_path: Path
) -> None:
    # Given a client sending to a port nothing listens on, topics not created (so the
    # producer retries the connection for as long as it waits)
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        from streamtasks import App, SendError
        app = App("c", broker="kafka://127.0.0.1:1", backend="memory://")

        @app.task(name="add")
        def add(a: int, b: int) -> int:
            return a + b

        # as if Kafka had answered at the start and gone since (a client that finds no
        # broker at all fails within seconds: integration/test_failfast_kafka.py)
        app.broker.check_reachable = lambda: None
        add.delay(1, 1)
        try:
            app.flush(4)
        except SendError:
            print("not confirmed")
        import os
        os._exit(0)  # skip the exit flush: its wait is not what this test is about
    """))
    out = run_client(script, tmp_path, STREAMTASKS_CREATE_TOPICS="false")
    # Then the program's output is its own and the errors are a handful of lines, not
    # one per reconnection (librdkafka retries every ~50 ms: about 80 lines in 4 s)
    assert out.stdout == "not confirmed\n"
    refused = [line for line in out.stderr.splitlines() if "Connection refused" in line]
    assert 1 <= len(refused) <= 2, out.stderr  # the librdkafka log line, the error callback


# -- module loggers: built once per configuration, reconfiguration still applies ---------

def test_a_module_logger_is_built_once_and_follows_a_reconfiguration(
    restore_logging: None
) -> None:
    from streamtasks.logs import get_logger

    first: list[str] = []
    second: list[str] = []

    def into(seen: list[str]) -> Any:
        def keep(_l: object, _m: str, event: dict[str, Any]) -> str:
            seen.append(event["event"])
            return ""
        return keep

    log = get_logger("streamtasks.test")
    structlog.configure(processors=[into(first)], logger_factory=structlog.ReturnLoggerFactory(),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    log.info("one")
    built = log._logger()
    log.debug("dropped by the level")
    log.info("two")
    assert log._logger() is built  # not assembled again while the configuration holds
    structlog.configure(processors=[into(second)],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    log.debug("three")
    log.bind(extra=1).info("four")
    assert first == ["one", "two"]
    assert second == ["three", "four"]


def test_the_cassandra_c_drivers_repeated_lines_are_collapsed_in_a_client_program(
    caplog: pytest.LogCaptureFixture, restore_logging: None
) -> None:
    # A program with its own handlers (here pytest's) that stores results while Cassandra
    # is down: the C/C++ driver (acsylla writer) says the same thing at each reconnect.
    from types import SimpleNamespace

    from streamtasks.backend.cassandra.fastwrite import driver_log

    ensure_configured(Settings())
    line = SimpleNamespace(log_level="ERROR", message="Unable to establish a control "
                           "connection to host 127.0.0.1 because of the following error: "
                           "Underlying connection error: Connect error 'connection refused'")
    with caplog.at_level(logging.WARNING, logger="streamtasks.backend.acsylla"):
        for _ in range(40):
            driver_log(line)
    assert len([r for r in caplog.records if "control connection" in r.getMessage()]) == 1
