import json

import pytest

from streamtasks.cli import main

MEM = ["--broker", "memory://", "--backend", "memory://"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_send_prints_an_id_and_result_of_an_unknown_id_is_an_error(capsys):
    code, out, _ = run(capsys, "send", "anything", "--args", "[1, 2]", *MEM)
    assert code == 0 and len(out.strip()) == 36
    code, _, err = run(capsys, "result", "no-such-task", *MEM)
    assert code == 3 and "no task with id no-such-task" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["send", "t", "--args", "{oops"], "--args is not valid JSON"),
        (["send", "t", "--args", '{"a": 1}'], "--args must be a JSON list"),
        (["send", "t", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
        (["worker"], "worker needs --app"),
        (["worker", "--app", "nocolon"], "module:attribute"),
        (["worker", "--app", "no_such_module_xyz:app"], "cannot import"),
        (["tasks", "--queue", "q", "--since", "yesterday"], "expected an ISO-8601 time"),
        (["tasks", "--queue", "q", "--since", "2026-01-02", "--until", "2026-01-01"],
         "--since must be before --until"),
        (["worker", "--app", "x:y", "--concurrency", "0"], "must be at least 1"),
        (["result", "id", "--wait", "soon"], "expected seconds"),
    ],
)
def test_bad_arguments_get_a_message_and_exit_2(capsys, argv, message):
    extra = MEM if argv[0] in ("send", "tasks") else []
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2
    assert message in err


def test_bad_settings_are_named(capsys, monkeypatch):
    monkeypatch.setenv("STREAMTASKS_CONCURRENCY", "lots")
    code, _, err = run(capsys, "send", "t", *MEM)
    assert code == 2 and "concurrency" in err


def test_result_prints_json_for_a_finished_task(capsys, tmp_path, monkeypatch):
    # A worker and the CLI sharing one memory app: register, send, drain, then read.
    from streamtasks import App, Settings

    app = App("cli", settings=Settings(broker="memory://", backend="memory://"))

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    sent = add.delay(2, 3)
    app.drain()
    module = tmp_path / "cli_app_mod.py"
    module.write_text("app = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import cli_app_mod  # type: ignore[import-not-found]

    cli_app_mod.app = app
    code, out, _ = run(capsys, "result", sent.id, "--app", "cli_app_mod:app")
    assert code == 0
    assert json.loads(out)["result"] == 5 and json.loads(out)["state"] == "SUCCESS"


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch):
    """Run a test with the process's local zone five hours behind UTC (in winter)."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_naive_cli_times_are_utc_whatever_the_local_zone(new_york) -> None:
    from datetime import UTC, datetime

    from streamtasks.cli import _parser
    from streamtasks.timeutil import epoch_ms, parse_time_ms

    midnight_utc = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    ns = _parser().parse_args(["tasks", "--queue", "q", "--since", "2026-01-01T00:00",
                               "--until", "2026-01-01T02:00+02:00"])
    assert ns.since == midnight_utc
    assert ns.until == midnight_utc  # an explicit offset is kept
    assert parse_time_ms("2026-01-01") == midnight_utc
    assert parse_time_ms("2026-01-01T00:00:00Z") == midnight_utc
    assert parse_time_ms("-30m", now_ms=midnight_utc) == midnight_utc - 30 * 60_000
    assert parse_time_ms("-2d", now_ms=midnight_utc) == midnight_utc - 2 * 86_400_000
    assert epoch_ms(datetime(2026, 1, 1)) == midnight_utc
    with pytest.raises(ValueError, match="without an offset it is UTC"):
        parse_time_ms("-30 minutes")
