"""The worker on the real Kafka and Cassandra: flow, bad input, crash, outages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from integration._rows import Rows
from integration._services import REPO, kafka_bootstrap, require_restartable, services
from integration._workers import (
    WorkerProcess,
    executions,
    make_app,
    new_namespace,
    wait_lines,
    worker_env,
    workers,
)
from integration.test_ops_http_kafka import free_port, wait_for
from streamtasks import TaskFailed, states

pytestmark = pytest.mark.integration


def dlq_records(topic: str, expected: int, timeout_s: float = 30) -> list:
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap(), "group.id": f"read-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            out.append(msg)
    consumer.close()
    return out


@pytest.mark.timeout(240)
def test_tasks_run_on_a_worker_process_and_results_are_read_back() -> None:
    env = worker_env(new_namespace("flow"))
    app = make_app(env)
    with workers(env, 1) as procs:
        results = [app.send("it.add", args=[i, i]) for i in range(200)]
        app.flush()
        assert [r.get(timeout=120) for r in results] == [2 * i for i in range(200)]
        # SIGTERM drains and exits 0
        assert procs[0].terminate() == 0
    meta = results[0].meta()
    assert meta is not None and meta.state == states.SUCCESS and meta.worker
    app.close()


@pytest.mark.timeout(240)
def test_cli_send_and_result() -> None:
    env = worker_env(new_namespace("cli"))
    cli = [sys.executable, "-m", "streamtasks.cli"]
    run_env = {**__import__("os").environ, **env}
    with workers(env, 1):
        sent = subprocess.run([*cli, "send", "it.add", "--args", "[20, 22]"], env=run_env,
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        got = subprocess.run([*cli, "result", task_id, "--wait", "60"], env=run_env, cwd=REPO,
                             capture_output=True, text=True, timeout=90)
    assert got.returncode == 0, got.stderr
    body = json.loads(got.stdout)
    assert body["state"] == "SUCCESS" and body["result"] == 42
    bad = subprocess.run([*cli, "send", "it.add", "--args", "{not json"], env=run_env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--args is not valid JSON" in bad.stderr
    unknown = subprocess.run([*cli, "result", "no-such-id"], env=run_env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode != 0 and "no task with id" in unknown.stderr


@pytest.mark.timeout(240)
def test_bad_input_is_dead_lettered_and_the_worker_keeps_serving() -> None:
    env = worker_env(new_namespace("dlq"))
    app = make_app(env)
    app.ensure_queue("default")
    topic, dlq = app.settings.topic("default"), app.settings.dlq_topic("default")
    with workers(env, 1):
        app.broker.send(topic, b"\xc3\x01not-really-avro", key=b"corrupt")
        unknown = app.send("it.nobody-has-this")
        wrong = app.send("it.add", args=["one", 2])
        good = app.send("it.add", args=[1, 2])
        app.flush()
        assert good.get(timeout=120) == 3
        with pytest.raises(TaskFailed, match="UnknownTaskError"):
            unknown.get(timeout=60)
        with pytest.raises(TaskFailed, match="ArgumentError"):
            wrong.get(timeout=60)
        dead = dlq_records(dlq, 3)
    reasons = sorted(dict(m.headers())["dlq-reason"].decode() for m in dead)
    assert reasons == ["bad-arguments", "decode-error", "unknown-task"]
    corrupt = next(m for m in dead if m.key() == b"corrupt")
    assert corrupt.value() == b"\xc3\x01not-really-avro"
    headers = dict(corrupt.headers())
    assert headers["dlq-original-topic"].decode() == topic
    assert headers["dlq-consumer-group"].decode() == app.settings.group_id("default")
    app.close()


@pytest.mark.timeout(900)
def test_a_worker_killed_mid_run_loses_nothing(tmp_path: Path) -> None:
    # Given 3 workers on a 6-partition queue and 20,000 tasks
    total = 20_000
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("crash"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    app.ensure_queue("default")
    rows = Rows()
    with workers(env, 3, concurrency=8) as procs:
        ids = [app.send("it.count", args=[i]).id for i in range(total)]
        app.flush(timeout_s=120)
        # When one worker is SIGKILLed mid-run and started again
        wait_lines(log, total // 4, timeout_s=300)
        procs[0].kill()
        procs.append(WorkerProcess(env))
        # Then every task ends with one SUCCESS row, none lost
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=600)
    rows.close()
    runs = executions(log)
    repeated = sum(n - 1 for n in runs.values())
    print(f"\n{total} tasks, 1 of 3 workers SIGKILLed: {counts[states.SUCCESS]} SUCCESS rows, "
          f"{len(runs)} distinct executed, {repeated} repeated executions "
          f"({100 * repeated / total:.2f}%)")
    assert counts[states.SUCCESS] == total
    assert len(runs) == total
    app.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("service", ["cassandra", "kafka"])
def test_an_outage_under_load_loses_nothing(service: str, tmp_path: Path) -> None:
    require_restartable(service)
    total = 3_000
    port = free_port()
    env = worker_env(new_namespace(f"outage-{service}"), STREAMTASKS_LOG_LEVEL="info",
                     STREAMTASKS_METRICS_PORT=str(port))
    app = make_app(env)
    app.ensure_queue("default")
    rows = Rows()
    worker_log = tmp_path / "worker.log"
    with workers(env, 1, concurrency=4, log_path=worker_log) as procs:
        # Given about 40 s of work (3,000 tasks of 50 ms, 4 at a time)
        ids = [app.send("it.sleep", args=[50, i]).id for i in range(total)]
        app.flush(timeout_s=120)
        time.sleep(3)
        ready_before = wait_for(port, "/readyz", 200, procs[0].proc, worker_log)
        # When the service stops for 20 s under load, then starts again
        services(f"{service}-stop")
        stopped = time.monotonic()
        # (the worker's /readyz says so, naming the service)
        down = wait_for(port, "/readyz", 503, procs[0].proc, worker_log, timeout_s=18)
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        services(f"{service}-start")
        # Then the worker recovers by itself and every task succeeds
        counts = rows.wait_states(ids, states.SUCCESS, timeout_s=600)
        ready_after = wait_for(port, "/readyz", 200, procs[0].proc, worker_log, timeout_s=60)
    rows.close()
    print(f"/readyz before {ready_before}, during {down}, after {ready_after}")
    assert service in json.dumps(down).lower()
    print(f"\n{service} outage of 20 s: {counts[states.SUCCESS]}/{total} SUCCESS")
    if counts[states.SUCCESS] != total:
        print("--- worker log, last 200 lines ---")
        print("\n".join(worker_log.read_text(errors="replace").splitlines()[-200:]))
    assert counts[states.SUCCESS] == total
    app.close()
