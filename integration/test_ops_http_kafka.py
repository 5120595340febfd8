"""/metrics, /healthz, /readyz of real worker and delayer processes, and `streamtasks inspect`.

On the real Kafka and Cassandra; each test has its own namespace. Nothing here stops a
service: an unreachable Cassandra is a worker pointed at a port where none listens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration._services import REPO
from integration._workers import make_app, new_namespace, worker_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "streamtasks.cli"]
TASKS = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(env: dict[str, str], argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([*CLI, *argv], cwd=REPO, env={**os.environ, **env},
                                stdout=out, stderr=out)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def serving(env: dict[str, str], command: str, port: int, log: Path,
            *extra: str) -> Any:
    return process(env, [command, *extra, "--queues", "default", "--metrics-port", str(port),
                         "--metrics-host", "127.0.0.1"], log)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for(port: int, path: str, status: int, proc: subprocess.Popen[bytes], log: Path,
             timeout_s: float = 60,
             until: Callable[[dict[str, Any]], bool] = lambda body: True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            last = get(port, path)
        except OSError:  # not listening yet
            time.sleep(0.2)
            continue
        body: dict[str, Any] = json.loads(last[1])
        if last[0] == status and until(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} not {status} within {timeout_s}s; last {last}")


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample, by sample name and sorted labels."""
    status, text = get(port, "/metrics")
    assert status == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[str, dict[Any, float]], sample: str, **where: str) -> float:
    return sum(v for labels, v in samples.get(sample, {}).items()
               if all((k, w) in labels for k, w in where.items()))


def test_a_scrape_under_load_agrees_with_the_task_count(tmp_path: Path) -> None:
    ns = new_namespace("http")
    env = worker_env(ns)
    group = f"{ns}.default"
    port = free_port()
    log = tmp_path / "worker.log"
    app = make_app(env)
    try:
        with serving(env, "worker", port, log, "--app", "integration.worker_app:app",
                     "--concurrency", "4") as proc:
            # Given a worker that is ready (a member with partitions, Kafka and Cassandra up)
            ready = wait_for(port, "/readyz", 200, proc, log,
                             until=lambda b: b["checks"]["partitions"]["assigned"][group] == 6)
            assert ready["checks"]["kafka"]["ok"] and ready["checks"]["cassandra"]["ok"]
            # When 500 tasks of 40 ms each arrive (about 5 s of work at concurrency 4)
            for i in range(TASKS):
                app.send("it.sleep", args=[40, i])
            app.flush()
            # Then the scrapes see lag, then the counters reach 500 and the lag 0
            lags: list[float] = []
            deadline = time.monotonic() + 90
            while True:
                samples = scrape(port)
                lag = total(samples, "streamtasks_consumer_lag", group=group)
                lags.append(lag)
                done = total(samples, "streamtasks_tasks_total", queue="default")
                if done == TASKS and lag == 0:
                    break
                assert time.monotonic() < deadline, f"done {done}, lag {lag}"
                time.sleep(0.5)
            assert max(lags) > 0, lags
            assert total(samples, "streamtasks_tasks_total", name="it.sleep",
                         state="SUCCESS") == TASKS
            assert total(samples, "streamtasks_task_duration_seconds_count",
                         name="it.sleep") == TASKS
            assert total(samples, "streamtasks_result_write_seconds_count") == TASKS
            assert total(samples, "streamtasks_tasks_in_flight") == 0
            # the forwarder's group is reported apart, on its tier topics
            tier_series = samples["streamtasks_consumer_lag"]
            assert any(("group", f"{group}.delayer") in labels for labels in tier_series)
            assert get(port, "/healthz")[0] == 200
            assert get(port, "/readyz")[0] == 200
            # And inspect shows the group, its member, and nothing waiting
            shown = subprocess.run([*CLI, "inspect", "--queues", "default", "--json"],
                                   env={**os.environ, **env}, cwd=REPO, capture_output=True,
                                   text=True, timeout=120, check=False)
            assert shown.returncode == 0, shown.stderr
            [queue] = json.loads(shown.stdout)["queues"]
            assert queue["group"]["group"] == group
            assert queue["group"]["count"] == 1
            [member] = queue["group"]["members"]
            assert sorted(member["partitions"][group]) == list(range(6))
            assert queue["lag"]["total"] == 0
            assert len(queue["lag"]["partitions"]) == 6
            assert sum(p["high"] for p in queue["lag"]["partitions"]) == TASKS
            assert queue["delay"]["total"] == 0 and queue["dlq"] == 0
            assert queue["total"] == 0 and queue["missing_topics"] == []
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        app.close()


def test_readyz_is_not_ready_naming_cassandra_when_it_cannot_be_reached(
    tmp_path: Path,
) -> None:
    env = worker_env(new_namespace("http"),
                     STREAMTASKS_BACKEND="cassandra://127.0.0.1:1/streamtasks")
    port = free_port()
    log = tmp_path / "worker.log"
    with serving(env, "worker", port, log, "--app", "integration.worker_app:app") as proc:
        answer = wait_for(port, "/readyz", 503, proc, log)
        deadline = time.monotonic() + 60
        # the first probes may still be waiting for an answer: Kafka's cached probe reads
        # "no answer" at first, while Cassandra's refusal comes back at once
        while not (answer["checks"].get("cassandra", {}).get("error", "").startswith(
                "cassandra: BackendError") and answer["checks"]["kafka"]["ok"]) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            answer = json.loads(get(port, "/readyz")[1])
        assert answer["status"] == "fail"
        assert answer["checks"]["kafka"]["ok"] is True
        assert answer["checks"]["cassandra"]["ok"] is False
        assert any(r.startswith("cassandra: BackendError") for r in answer["reasons"]), answer
        # the process itself is alive: Kubernetes keeps it, but sends it no traffic
        assert get(port, "/healthz")[0] == 200


def test_a_delayer_alone_serves_health_and_its_tier_lag(tmp_path: Path) -> None:
    ns = new_namespace("http")
    env = worker_env(ns)
    port = free_port()
    log = tmp_path / "delayer.log"
    with serving(env, "delayer", port, log) as proc:
        delayer = f"{ns}.default.delayer"
        ready = wait_for(port, "/readyz", 200, proc, log,
                         until=lambda b: b["checks"]["partitions"]["assigned"][delayer] > 0)
        assert "cassandra" not in ready["checks"]
        health = wait_for(port, "/healthz", 200, proc, log)
        assert set(health["checks"]) == {"forwarder_loop"}
        samples = scrape(port)
        groups = {dict(labels)["group"] for labels in samples["streamtasks_consumer_lag"]}
        assert groups == {delayer}
    assert proc.returncode == 0, log.read_text()[-3000:]
