"""Fail fast and say why: commands against a broker or store that is not there end by
themselves within seconds, naming the host; a send Kafka did not confirm in time is
reported once and not waited for again at exit.

The unreachable services are a port nothing listens on (127.0.0.1:1) and a name that
never resolves (``.invalid``); the shared Kafka answers where a test needs a broker.
Each subprocess is bounded by a timeout; the bound on the elapsed time is generous
(the promise is "ends by itself within about 10 s", the check waits 8 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration._services import REPO
from integration._workers import kafka_bootstrap, new_namespace
from tests.sigint import interrupt_cli

#: Elapsed time a command may take against a missing broker (its check waits 8 s).
ENDS_WITHIN_S = 20.0
#: A command still running after this long is killed and fails the test.
KILL_AFTER_S = 60.0

DEAD_BROKERS = {"kafka://127.0.0.1:1": "127.0.0.1:1",
                "kafka://no-such-host.invalid:9092": "no-such-host.invalid:9092"}
DEAD_STORES = {"cassandra://127.0.0.1:1/ks": "127.0.0.1:1",
               "cassandra://no-such-host.invalid:9042/ks": "no-such-host.invalid:9042"}

APP = ["--app", "integration.worker_app:app"]
#: Every command that talks to Kafka, with arguments that get it that far.
BROKER_COMMANDS = [
    ["worker", *APP, "--queues", "ff"],
    ["worker", *APP, "--queues", "ff", "--processes", "2"],
    ["delayer", "--queues", "ff"],
    ["send", "it.count", "--args", "[1]", "--queue", "ff"],
    ["topics", "list"],
    ["topics", "create", "--queue", "ff"],
    ["topics", "alter", "--queue", "ff", "--partitions", "3"],
    ["purge", "--queue", "ff", "--yes"],
    ["dlq", "list", "--queue", "ff"],
    ["replay", "--queue", "ff", "--since", "-1h", "--dry-run"],
    ["groups", "migrate", "--from-group", "old", "--queues", "ff"],
    ["inspect"],
    ["revoke", "some-id"],
]


@dataclass
class Ended:
    argv: list[str]
    code: int | None  # None: killed after KILL_AFTER_S
    elapsed_s: float
    out: str
    err: str


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTASKS_")}
    env.update(PYTHONPATH=str(REPO), STREAMTASKS_NAMESPACE=new_namespace("ff"), **extra)
    return env


def _run(argv: list[str], env: dict[str, str]) -> Ended:
    began = time.monotonic()
    command = [sys.executable, "-m", "streamtasks.cli", *argv]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=KILL_AFTER_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as late:
        return Ended(argv, None, time.monotonic() - began, str(late.stdout or ""),
                     str(late.stderr or ""))
    return Ended(argv, done.returncode, time.monotonic() - began, done.stdout, done.stderr)


def _run_all(runs: list[tuple[list[str], dict[str, str]]]) -> list[Ended]:
    # four at a time: the machine is small and each mostly waits
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda run: _run(*run), runs))


def _problems(ended: Ended, host: str) -> list[str]:
    """What is wrong with how a command ended against a dead ``host`` (empty: nothing)."""
    lines = [line for line in ended.err.splitlines() if line.strip()]
    found = []
    if ended.code is None:
        found.append(f"still running after {KILL_AFTER_S:.0f}s")
    elif ended.code == 0:
        found.append("exit code 0")
    if ended.elapsed_s > ENDS_WITHIN_S:
        found.append(f"took {ended.elapsed_s:.1f}s")
    if not lines or host not in lines[-1]:
        found.append(f"the last line does not name {host}")
    if len(lines) > 2:
        found.append(f"{len(lines)} stderr lines")
    if "Traceback" in ended.err:
        found.append("a traceback")
    return found


@pytest.mark.timeout(600)
@pytest.mark.parametrize("create_topics", ["false", "true"])
def test_every_kafka_command_ends_within_seconds_naming_a_dead_or_unknown_broker(
    create_topics: str,
) -> None:
    # Given each command, pointed at a port nothing listens on and at a name that never
    # resolves, with topics created by the library or not
    runs = [([*argv, "--broker", url, "--backend", "memory://"],
             _env(STREAMTASKS_CREATE_TOPICS=create_topics))
            for url in DEAD_BROKERS for argv in BROKER_COMMANDS]
    # When they run
    ended = _run_all(runs)
    # Then each ends by itself, non-zero, within seconds, its last line naming the host,
    # in one or two lines and with no traceback
    wrong = [(e, problems) for e in ended
             if (problems := _problems(e, DEAD_BROKERS[e.argv[e.argv.index("--broker") + 1]]))]
    assert not wrong, "\n".join(f"{' '.join(e.argv)}: {', '.join(p)}\n{e.err[-600:]}"
                                for e, p in wrong)
    # and says why (connection refused, or the name that does not resolve)
    for e in ended:
        if "kafka://127.0.0.1:1" in e.argv:
            assert "Connection refused" in e.err, e.err
        else:
            assert "Failed to resolve" in e.err and "host name" in e.err, e.err


@pytest.mark.timeout(300)
def test_result_commands_end_at_once_naming_a_dead_or_unknown_cassandra() -> None:
    # Given the commands that read or set up the result store, pointed at no Cassandra
    runs = [([*argv, "--broker", "kafka://" + kafka_bootstrap(), "--backend", url], _env())
            for url in DEAD_STORES
            for argv in (["migrate"], ["result", "some-id"], ["tasks", "--queue", "ff"])]
    ended = _run_all(runs)
    # Then each ends non-zero in one line naming the host, with no traceback (the
    # driver's own records of the failed connect are not printed)
    wrong = {" ".join(e.argv): problems for e in ended
             if (problems := _problems(e, DEAD_STORES[e.argv[e.argv.index("--backend") + 1]]))}
    assert not wrong, wrong
    for e in ended:
        assert len(e.err.strip().splitlines()) == 1, e.err
        assert ("Connection refused" if "127.0.0.1:1" in e.err
                else "resolves to an address") in e.err, e.err


def _missing_topic_broker() -> str:
    # Kafka answers, but the task's topic does not exist and may not be created: the
    # producer waits for it (30 s) and the send is never confirmed in time.
    return f"kafka://{kafka_bootstrap()}?allow.auto.create.topics=false"


@pytest.mark.timeout(120)
def test_a_send_not_confirmed_in_time_is_reported_once_and_exit_does_not_wait_again(
    tmp_path: Path,
) -> None:
    # Given a program whose flush times out (2 s) for a task Kafka cannot take
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import time
        from streamtasks import App, SendError

        app = App("c")

        @app.task(name="t", queue="nowhere")
        def t() -> None:
            pass

        sent = t.delay()
        try:
            app.flush(timeout_s=2)
        except SendError as err:
            print(f"reported {[tid for tid, _ in err.failures]} {err}", flush=True)
        print(f"sent {sent.id}", flush=True)
    """))
    env = _env(STREAMTASKS_BROKER=_missing_topic_broker(), STREAMTASKS_BACKEND="memory://",
               STREAMTASKS_CREATE_TOPICS="false")
    began = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=KILL_AFTER_S)
    elapsed = time.monotonic() - began
    # Then the flush names the task as dropped, the program ends without a second wait
    # (before: 30 s more at exit, then the same task reported again)
    task_id = done.stdout.rsplit("sent ", 1)[-1].strip()
    assert done.returncode == 0, done.stderr
    assert f"reported ['{task_id}']" in done.stdout, done.stdout
    assert "dropped from the send queue" in done.stdout
    assert task_id not in done.stderr, done.stderr  # not reported again at exit
    assert elapsed < ENDS_WITHIN_S, (elapsed, done.stderr)


@pytest.mark.timeout(120)
def test_ctrl_c_ends_a_send_waiting_for_its_confirmation_reporting_it_unconfirmed() -> None:
    # Given `send` waiting for Kafka to confirm a task it cannot take (up to 30 s, then
    # 30 more at exit before)
    # When Ctrl-C comes
    ended = interrupt_cli(
        ["send", "t", "--broker", _missing_topic_broker(), "--backend", "memory://",
         "--queue", "nowhere", "--log-format", "json", "-l", "debug"],
        _env(STREAMTASKS_CREATE_TOPICS="false"), REPO, '"task queued"')
    # Then it ends (exit 130) saying that the send was not confirmed, naming it
    assert ended.code == 130, ended.err
    assert ended.out == ""
    assert "interrupted: 0 of 1 send(s) confirmed" in ended.err
    assert "not confirmed" in ended.err and "Traceback" not in ended.err
    assert ended.after_signal_s < ENDS_WITHIN_S, ended.after_signal_s
