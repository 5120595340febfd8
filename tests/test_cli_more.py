"""The command line beyond the basics: version, times, result fields, send, dlq, topics, purge."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
import types
from collections.abc import Iterator

import pytest

from streamtasks import App, Settings
from streamtasks.broker.base import TopicPartition
from streamtasks.cli import _time, main

MEM = ["--broker", "memory://", "--backend", "memory://"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors and --version
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def app() -> Iterator[App]:
    """A memory app the CLI reaches as ``--app cli_more_app:app`` (one broker for all calls)."""
    shared = App("clim", settings=Settings(broker="memory://", backend="memory://"))

    @shared.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @shared.task(name="boom")
    def boom() -> None:
        raise ValueError("kaput")

    @shared.task(name="mailer", queue="mail")
    def mailer() -> str:
        return "sent"

    module = types.ModuleType("cli_more_app")
    module.app = shared  # type: ignore[attr-defined]
    sys.modules["cli_more_app"] = module
    yield shared
    del sys.modules["cli_more_app"]


APP = ["--app", "cli_more_app:app"]


def test_version_is_the_installed_package_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"streamtasks {importlib.metadata.version('streamtasks')}"


@pytest.mark.parametrize(
    ("text", "back_ms"),
    [("-1.5h", 5_400_000), ("-90m", 5_400_000), ("-30s", 30_000), ("-.5d", 43_200_000),
     ("-2h", 7_200_000)],
)
def test_relative_times_may_be_fractional(text, back_ms):
    assert _time(text, now_ms=10**12) == 10**12 - back_ms


def test_tasks_takes_a_fractional_relative_time_after_the_flag(capsys, app):
    app.send("add", args=[1, 2])
    app.drain()
    code, out, err = run(capsys, "tasks", "--queue", "default", "--since", "-1.5h", *APP)
    assert code == 0, err
    assert [json.loads(line)["result"] for line in out.splitlines()] == [3]


def test_a_bad_relative_time_is_a_usage_error(capsys):
    code, _, err = run(capsys, "tasks", "--queue", "q", "--since", "-1.5x", *MEM)
    assert code == 2 and "--since" in err


def test_tasks_state_any_lists_every_state(capsys, app):
    app.send("add", args=[1, 2])
    app.send("boom")
    with pytest.raises(Exception):  # noqa: B017 - drain re-raises the task's error
        app.drain()
    app.drain()
    code, out, err = run(capsys, "tasks", "--queue", "default", "--state", "any", *APP)
    assert code == 0, err
    assert sorted(json.loads(line)["state"] for line in out.splitlines()) == [
        "FAILURE", "SUCCESS"]
    code, out, _ = run(capsys, "tasks", "--queue", "default", "--state", "failure", *APP)
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["boom"]


def test_result_shows_traceback_and_iso_utc_timestamps(capsys, app):
    failed = app.send("boom")
    with pytest.raises(Exception):  # noqa: B017 - drain re-raises the task's error
        app.drain()
    code, out, _ = run(capsys, "result", failed.id, *APP)
    body = json.loads(out)
    assert code == 1
    assert "ValueError: kaput" in body["traceback"]
    assert body["finished_at"].endswith("Z") and "T" in body["finished_at"]
    assert {"created_at", "started_at", "finished_at"} <= body.keys()


def test_send_wait_prints_the_result_like_result_does(capsys, app):
    import threading

    timer = threading.Timer(0.2, app.drain)
    timer.start()
    code, out, err = run(capsys, "send", "add", "--args", "[2, 5]", "--wait", "10", *APP)
    timer.join()
    task_id, row = out.splitlines()
    assert code == 0, err
    assert json.loads(row)["id"] == task_id and json.loads(row)["result"] == 7


def test_send_wait_exits_1_for_a_failed_task(capsys, app):
    import threading

    def drain() -> None:
        with pytest.raises(ValueError):
            app.drain()

    timer = threading.Timer(0.2, drain)
    timer.start()
    code, out, _ = run(capsys, "send", "boom", "--wait", "10", *APP)
    timer.join()
    assert code == 1 and json.loads(out.splitlines()[1])["state"] == "FAILURE"


def test_send_countdown_goes_through_a_delay_tier(capsys, app):
    code, _, err = run(capsys, "send", "add", "--args", "[1, 1]", "--countdown", "30",
                       "--expires", "120", *APP)
    assert code == 0, err
    assert app.broker.records(app.settings.topic("default")) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(("flag", "value"), [("--countdown", "-1"), ("--expires", "0"),
                                              ("--wait", "soon")])
def test_send_refuses_bad_seconds(capsys, flag, value):
    code, _, err = run(capsys, "send", "t", f"{flag}={value}", *MEM)
    assert code == 2 and flag in err


def test_send_without_app_or_queue_names_the_queue_it_used(capsys):
    code, _, err = run(capsys, "send", "t", *MEM)
    assert code == 0 and "queue 'default'" in err
    code, _, err = run(capsys, "send", "t", "--queue", "other", *MEM)
    assert code == 0 and err == ""


def test_send_with_app_uses_the_tasks_queue(capsys, app):
    code, _, err = run(capsys, "send", "mailer", *APP)
    assert code == 0 and err == ""
    assert len(app.broker.records(app.settings.topic("mail"))) == 1  # type: ignore[attr-defined]


def queue_topics(app: App, queue: str) -> dict[str, int]:
    return {s.name: app.broker.partition_count(s.name) for s in app.topic_specs(queue)}


def test_topics_create_reports_the_partitions_really_there(capsys, app):
    code, out, _ = run(capsys, "topics", "create", "--queue", "q", "--partitions", "2", *APP)
    assert code == 0 and "streamtasks.q: created (2 partitions)" in out
    code, out, _ = run(capsys, "topics", "create", "--queue", "q", "--partitions", "6", *APP)
    assert code == 0 and "streamtasks.q: exists (2 partitions; asked for 6)" in out


def test_topics_list_shows_queues_partitions_and_lag(capsys, app):
    run(capsys, "topics", "create", "--queue", "q", "--partitions", "2", *APP)
    for n in range(3):
        app.send("add", args=[n, n], queue="q")
    app.flush(5)
    code, out, _ = run(capsys, "topics", "list", *APP)
    header, *rows = out.splitlines()
    assert code == 0 and header.split("\t") == ["QUEUE", "TOPIC", "PARTITIONS", "GROUP", "LAG"]
    assert ["q", "streamtasks.q", "2", "streamtasks.q", "3"] in [r.split("\t") for r in rows]
    code, out, _ = run(capsys, "topics", "list", "--json", *APP)
    by_queue = {d["queue"]: d for d in map(json.loads, out.splitlines())}
    assert by_queue["q"]["lag"] == 3 and by_queue["q"]["partitions"] == 2
    assert not any(name.endswith(".dlq") or ".delay." in name for name in by_queue)


def test_topics_alter_grows_every_topic_of_the_queue(capsys, app):
    run(capsys, "topics", "create", "--queue", "q", "--partitions", "2", *APP)
    code, out, err = run(capsys, "topics", "alter", "--queue", "q", "--partitions", "4", *APP)
    assert code == 0, err
    assert set(queue_topics(app, "q").values()) == {4}
    assert "streamtasks.q: grown from 2 (4 partitions)" in out


def test_topics_alter_refuses_to_shrink(capsys, app):
    run(capsys, "topics", "create", "--queue", "q", "--partitions", "3", *APP)
    code, _, err = run(capsys, "topics", "alter", "--queue", "q", "--partitions", "2", *APP)
    assert code == 2 and "cannot shrink queue q to 2 partitions" in err
    assert set(queue_topics(app, "q").values()) == {3}


def test_topics_alter_of_a_queue_without_topic_names_the_command(capsys, app):
    code, _, err = run(capsys, "topics", "alter", "--queue", "nope", "--partitions", "2", *APP)
    assert code == 1 and "topics create --queue nope" in err


def send_waiting(app: App, count: int) -> None:
    for n in range(count):
        app.send("add", args=[n, n], queue="q")
    app.flush(5)


def test_purge_with_yes_deletes_the_waiting_records(capsys, app):
    run(capsys, "topics", "create", "--queue", "q", "--partitions", "2", *APP)
    send_waiting(app, 4)
    code, out, err = run(capsys, "purge", "--queue", "q", "--yes", *APP)
    assert code == 0, err
    assert out.strip() == "purged 4 record(s) from streamtasks.q (4 not yet run)"
    code, out, _ = run(capsys, "topics", "list", "--json", *APP)
    assert {d["queue"]: d["lag"] for d in map(json.loads, out.splitlines())}["q"] == 0


def test_purge_refuses_without_yes_when_stdin_is_not_a_terminal(capsys, app, monkeypatch):
    run(capsys, "topics", "create", "--queue", "q", "--partitions", "1", *APP)
    send_waiting(app, 2)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = run(capsys, "purge", "--queue", "q", *APP)
    assert code == 2 and "--yes" in err


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 0), ("n\n", 1, 2)])
def test_purge_asks_on_a_terminal(capsys, app, monkeypatch, answer, code, left):
    import io

    run(capsys, "topics", "create", "--queue", "q", "--partitions", "1", *APP)
    send_waiting(app, 2)
    fake = io.StringIO(answer)
    fake.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stdin", fake)
    got, _, err = run(capsys, "purge", "--queue", "q", *APP)
    assert got == code and "Delete the 2 record(s) of streamtasks.q" in err
    low, high = app.broker.watermarks(TopicPartition("streamtasks.q", 0))
    assert high - low == left


def test_purge_of_a_queue_without_topic_is_a_usage_error(capsys, app):
    code, _, err = run(capsys, "purge", "--queue", "nope", "--yes", *APP)
    assert code == 2 and "topics create --queue nope" in err


# -- settings: flags beside --app, bad files and values, secrets --------------------------


def test_flags_beside_app_win_over_its_settings(capsys, app):
    code, out, _ = run(capsys, "send", "add", "--args", "[1, 2]", *APP,
                       "--namespace", "flagged", "-l", "WARNING")
    assert code == 0, out
    assert app.settings.namespace == "flagged"
    assert len(app.broker.records("flagged.default")) == 1  # type: ignore[attr-defined]
    assert logging.getLogger().level == logging.WARNING


def test_config_beside_app_is_read_where_the_app_reads_its_environment(
    capsys, tmp_path, monkeypatch
):
    (tmp_path / "cfg_app_mod.py").write_text(
        "from streamtasks import App\n"
        "app = App('cfg', broker='memory://', backend='memory://')\n"
    )
    (tmp_path / "cfg.yaml").write_text("namespace: from-file\nconcurrency: 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("STREAMTASKS_CONCURRENCY", "5")
    monkeypatch.delitem(sys.modules, "cfg_app_mod", raising=False)
    code, _, err = run(capsys, "send", "x", "--app", "cfg_app_mod:app",
                       "--config", str(tmp_path / "cfg.yaml"), "--backend", "memory://")
    assert code == 0, err
    settings = sys.modules["cfg_app_mod"].app.settings
    assert settings.namespace == "from-file" and settings.concurrency == 5  # env over file
    import os

    assert "STREAMTASKS_CONFIG" not in os.environ  # the command leaves no trace


@pytest.mark.parametrize(("text", "message"), [
    ("concurrency: 4.5\n", "setting concurrency (from file"),
    ("concurrency: {a: 1}\n", "setting concurrency (from file"),
    ("log_level: loud\n", "setting log_level (from file"),
    ("concurrency: [4\n", "is not valid YAML"),
])
def test_a_bad_settings_file_is_a_usage_error(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "send", "t", "--config", str(path), *MEM)
    assert code == 2 and out == ""
    assert "configuration error" in err and message in err


def test_a_bad_log_level_flag_is_a_usage_error(capsys):
    code, _, err = run(capsys, "send", "t", "-l", "loud", *MEM)
    assert code == 2 and "-l/--log-level" in err and "loud" in err


def test_a_password_in_a_malformed_url_never_reaches_the_terminal(capsys, monkeypatch):
    secret = "s3cr3t-Pw"
    code, out, err = run(capsys, "send", "t", "--broker", f"kafka://app:{secret}@k:nope",
                         "--backend", "memory://")
    assert code == 2 and "broker URL" in err and secret not in out + err
    monkeypatch.setenv("STREAMTASKS_BACKEND", f"cassandra://app:{secret}/x@db/ks")
    code, out, err = run(capsys, "send", "t", "--broker", "memory://")
    assert code == 2 and "backend URL" in err and secret not in out + err


def test_ctrl_c_ends_a_send_waiting_for_the_broker_at_once_saying_nothing_was_sent(tmp_path):
    # (Ctrl-C while a queued send waits for Kafka's confirmation: integration/
    # test_failfast_kafka.py, which needs a broker that answers.)
    import os
    from pathlib import Path

    from tests.sigint import interrupt_cli

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTASKS_")}
    env.update(PYTHONPATH=str(repo), STREAMTASKS_CREATE_TOPICS="false")
    # Given a send waiting (up to 8 s) for a broker nobody runs to answer
    # When Ctrl-C comes
    ended = interrupt_cli(
        ["send", "t", "--broker", "kafka://127.0.0.1:1", "--backend", "memory://",
         "--queue", "default", "--log-format", "json", "-l", "debug"],
        env, tmp_path, "checking that a Kafka broker answers", timeout_s=20)
    # Then it ends (exit 130) saying that nothing was sent, with no traceback
    assert ended.code == 130, ended.err
    assert ended.out == ""
    assert "interrupted while waiting for the broker to answer; nothing was sent" in ended.err
    assert "Traceback" not in ended.err
