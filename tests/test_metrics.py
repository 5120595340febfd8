"""Metrics and health endpoints of a worker, on memory:// (no real services)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from streamtasks import App, Settings, states
from streamtasks.errors import BackendError
from streamtasks.health import Health, OpsServer, stall_seconds
from streamtasks.metrics import CachedProbe, WorkerMetrics
from streamtasks.worker.consumer import Worker

QUEUE = "default"
GROUP = f"metrics.{QUEUE}"


def make_app(**settings: Any) -> App:
    values: dict[str, Any] = {
        "broker": "memory://", "backend": "memory://", "namespace": "metrics",
        "partitions": 3, "commit_interval_s": 0.0, "delay_tiers": "50ms,200ms",
        "shutdown_grace_s": 2.0,
    }
    values.update(settings)
    return App("metrics", settings=Settings(**values))


@pytest.fixture
def app() -> Iterator[App]:
    application = make_app()
    yield application
    application.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Served(NamedTuple):
    worker: Worker
    metrics: WorkerMetrics
    clock: FakeClock
    server: OpsServer


def sample(metrics: WorkerMetrics, metric: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def samples(metrics: WorkerMetrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for metric in metrics.registry.collect():
        for s in metric.samples:
            if s.name == family:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def step_until(cond: Callable[[], bool], worker: Worker, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker._step(0.01)
        if worker.delayer is not None:
            worker.delayer.step(0.0)
        if cond():
            return
    raise AssertionError(f"condition not met within {timeout_s}s")


# -- the observer -----------------------------------------------------------------


def test_the_observer_counts_outcomes_retries_dead_letters_and_latencies(app: App) -> None:
    @app.task(name="ok")
    def ok(i: int) -> int:
        return i

    @app.task(name="flaky", max_retries=1, backoff="fixed", backoff_s=0.01)
    def flaky() -> None:
        raise ValueError("always")

    for i in range(3):
        ok.delay(i)
    flaky.delay()
    app.send("nobody-registered-this")
    app.flush()
    metrics = WorkerMetrics()
    worker = app.worker([QUEUE], observer=metrics)
    try:
        worker.run_until_idle(10)
    finally:
        worker.close()

    assert sample(metrics, "streamtasks_tasks_total", queue=QUEUE, name="ok",
                  state=states.SUCCESS) == 3
    assert sample(metrics, "streamtasks_tasks_total", queue=QUEUE, name="flaky",
                  state=states.RETRY) == 1
    assert sample(metrics, "streamtasks_tasks_total", queue=QUEUE, name="flaky",
                  state=states.FAILURE) == 1
    assert sample(metrics, "streamtasks_retries_total", queue=QUEUE, name="flaky") == 1
    assert sample(metrics, "streamtasks_dead_letters_total", queue=QUEUE,
                  reason="retries-exhausted") == 1
    assert sample(metrics, "streamtasks_dead_letters_total", queue=QUEUE,
                  reason="unknown-task") == 1
    assert sample(metrics, "streamtasks_task_duration_seconds_count", queue=QUEUE,
                  name="ok") == 3
    # every run whose effects became durable is timed (3 ok, the retry, the failure)
    assert sample(metrics, "streamtasks_result_write_seconds_count") == 5
    # the retry waited in the 50ms tier and was forwarded
    assert sample(metrics, "streamtasks_forward_lateness_seconds_count", queue=QUEUE,
                  tier="50ms") == 1
    # idle() commits synchronously
    assert sample(metrics, "streamtasks_commit_seconds_count", group=GROUP) >= 1
    assert metrics.turned("worker") and metrics.turned("forwarder")


def test_registries_are_per_worker() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.task_finished("q", "t", states.SUCCESS, 0.1)
    assert sample(a, "streamtasks_tasks_total", queue="q", name="t", state="SUCCESS") == 1
    assert sample(b, "streamtasks_tasks_total", queue="q", name="t", state="SUCCESS") == 0


def test_an_expired_task_is_counted_but_not_timed() -> None:
    metrics = WorkerMetrics()
    metrics.task_finished("q", "t", states.REVOKED, 0.0)
    assert sample(metrics, "streamtasks_tasks_total", queue="q", name="t", state="REVOKED") == 1
    assert sample(metrics, "streamtasks_task_duration_seconds_count", queue="q", name="t") == 0


# -- scrape-time gauges -------------------------------------------------------------


def test_the_collector_shows_lag_and_in_flight_of_a_memory_worker(app: App) -> None:
    release = threading.Event()

    @app.task(name="wait")
    def wait() -> None:
        release.wait(10)

    for _ in range(4):
        wait.delay()
    app.flush()
    metrics = WorkerMetrics()
    worker = app.worker([QUEUE], observer=metrics)
    collector = metrics.watch_worker(worker)
    collector.lag.ttl_s = 0.0
    try:
        worker.start()
        # Given four tasks taken in and running, nothing committed
        step_until(lambda: worker.outstanding == 4, worker)
        lag = samples(metrics, "streamtasks_consumer_lag")
        main = {k: v for k, v in lag.items() if ("group", GROUP) in k}
        assert sum(main.values()) == 4
        assert len(main) == 3  # one series per owned partition
        assert sample(metrics, "streamtasks_tasks_in_flight", queue=QUEUE) == 4
        assert sample(metrics, "streamtasks_assigned_partitions", group=GROUP) == 3
        # When they finish and the worker commits
        release.set()
        worker.run_until_idle(10)
        # Then the lag is 0, including the delay tiers' group
        lag = samples(metrics, "streamtasks_consumer_lag")
        assert lag and not any(lag.values())
        assert any(("group", f"{GROUP}.delayer") in k for k in lag)
        assert sample(metrics, "streamtasks_tasks_in_flight", queue=QUEUE) == 0
    finally:
        release.set()
        worker.close()


def test_lag_counts_from_the_low_watermark_when_nothing_is_committed(app: App) -> None:
    from streamtasks.broker.base import TopicPartition
    from streamtasks.metrics import group_lag

    app.ensure_queue(QUEUE)
    for _ in range(5):
        app.broker.send(app.settings.topic(QUEUE), b"x", partition=1)
    app.broker.flush(1)
    tp = TopicPartition(app.settings.topic(QUEUE), 1)
    assert [x.lag for x in group_lag(app.broker, "nobody", [tp])] == [5]
    app.broker.delete_records({tp: 2})
    assert [x.lag for x in group_lag(app.broker, "nobody", [tp])] == [3]


def test_a_cached_probe_runs_one_look_up_at_a_time_and_never_hangs() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def slow() -> int:
        calls.append(1)
        gate.wait(5)
        return len(calls)

    probe = CachedProbe(slow, ttl_s=60, wait_s=0.05)
    first = probe.get()
    assert first.late and first.value is None
    assert probe.get().late and len(calls) == 1  # the running look-up is shared
    gate.set()
    deadline = time.monotonic() + 5
    while probe.get().late and time.monotonic() < deadline:
        time.sleep(0.01)
    answer = probe.get()
    assert answer.value == 1 and answer.error is None and not answer.late
    assert len(calls) == 1  # fresh within its ttl: not looked up again


def test_a_cached_probe_keeps_the_error() -> None:
    def broken() -> int:
        raise BackendError("down")

    answer = CachedProbe(broken, ttl_s=0, wait_s=1).get()
    assert isinstance(answer.error, BackendError) and answer.value is None


# -- the endpoints ------------------------------------------------------------------


def get(server: OpsServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def served(app: App) -> Iterator[Served]:
    @app.task(name="ok")
    def ok() -> None:
        return None

    clock = FakeClock()
    metrics = WorkerMetrics(clock=clock)
    worker = app.worker([QUEUE], observer=metrics)
    metrics.watch_worker(worker)
    health = Health.of_worker(worker, metrics, stall_s=30.0, startup_s=10.0, ttl_s=0.0,
                              wait_s=1.0)
    server = OpsServer(metrics, health, 0, "127.0.0.1").start()
    try:
        yield Served(worker, metrics, clock, server)
    finally:
        server.close()
        worker.close()


def test_healthz_and_readyz_answer_ok_for_a_running_worker(served: Served) -> None:
    served.worker.start()
    step_until(lambda: bool(served.worker.runtimes[0].assigned), served.worker)
    code, body = get(served.server, "/healthz")
    assert code == 200, body
    assert json.loads(body)["status"] == "ok"
    assert set(json.loads(body)["checks"]) == {"worker_loop", "forwarder_loop"}
    code, body = get(served.server, "/readyz")
    assert code == 200, body
    checks = json.loads(body)["checks"]
    assert checks["kafka"]["ok"] and checks["cassandra"]["ok"]
    assert checks["partitions"]["assigned"] == {GROUP: 3}
    code, text = get(served.server, "/metrics")
    assert code == 200 and "streamtasks_consumer_lag{" in text
    assert get(served.server, "/nothing")[0] == 404


def test_healthz_is_503_naming_the_loop_that_stalled(served: Served) -> None:
    served.worker.start()
    step_until(lambda: bool(served.worker.runtimes[0].assigned), served.worker)
    # Given the worker loop last turned 31 s ago, while the forwarder kept turning
    served.clock.now += 31
    assert served.worker.delayer is not None
    served.worker.delayer.step(0.0)
    code, body = get(served.server, "/healthz")
    assert code == 503
    answer = json.loads(body)
    assert answer["status"] == "fail"
    assert answer["checks"]["worker_loop"]["ok"] is False
    assert answer["checks"]["forwarder_loop"]["ok"] is True
    assert len(answer["reasons"]) == 1 and "worker loop" in answer["reasons"][0]
    # When the loop turns again, it is healthy again
    served.worker._step(0.0)
    assert get(served.server, "/healthz")[0] == 200


def test_a_loop_that_never_turned_counts_from_the_start(served: Served) -> None:
    assert get(served.server, "/healthz")[0] == 200
    served.clock.now += 31
    code, body = get(served.server, "/healthz")
    assert code == 503 and len(json.loads(body)["reasons"]) == 2


def test_readyz_is_503_without_partitions_after_the_startup_window(served: Served) -> None:
    served.worker.app.ensure_queue(QUEUE)
    # not started: no partitions, but still in the startup window
    assert get(served.server, "/readyz")[0] == 200
    served.clock.now += 11
    code, body = get(served.server, "/readyz")
    assert code == 503
    assert "no partition assigned" in json.loads(body)["reasons"][0]


def test_readyz_is_503_naming_cassandra_when_the_backend_fails(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.worker.start()
    step_until(lambda: bool(served.worker.runtimes[0].assigned), served.worker)

    def down(task_id: str) -> None:
        raise BackendError("cannot reach Cassandra at 127.0.0.1:1")

    monkeypatch.setattr(served.worker.app.backend, "fetch", down)
    code, body = get(served.server, "/readyz")
    assert code == 503
    answer = json.loads(body)
    assert answer["checks"]["cassandra"]["ok"] is False
    assert answer["reasons"] == ["cassandra: BackendError: cannot reach Cassandra at 127.0.0.1:1"]


def test_readyz_is_503_when_kafka_does_not_answer_in_time(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.worker.start()
    step_until(lambda: bool(served.worker.runtimes[0].assigned), served.worker)
    gate = threading.Event()

    def hangs(topic: str) -> int:
        gate.wait(10)
        return 3

    monkeypatch.setattr(served.worker.app.broker, "partition_count", hangs)
    try:
        code, body = get(served.server, "/readyz")
        assert code == 503
        assert "kafka: no answer within 1s" in json.loads(body)["reasons"]
    finally:
        gate.set()


def test_a_forwarder_alone_checks_its_loop_and_kafka_only() -> None:
    from streamtasks.worker.delayer import DelayForwarder

    app = make_app()
    metrics = WorkerMetrics()
    forwarder = DelayForwarder(app, [QUEUE], observer=metrics)
    metrics.watch_forwarder(forwarder)
    health = Health.of_forwarder(forwarder, metrics, ttl_s=0.0)
    try:
        forwarder.start()
        forwarder.step(0.01)
        assert health.liveness().ok
        assert set(health.liveness().checks) == {"forwarder_loop"}
        ready = health.readiness()
        assert ready.ok, ready.reasons
        assert "cassandra" not in ready.checks
        assert sample(metrics, "streamtasks_assigned_partitions",
                      group=f"metrics.{QUEUE}.delayer") == 6  # two tiers of 3
    finally:
        forwarder.close()
        app.close()


def test_the_stall_limit_covers_a_revoke_within_the_grace() -> None:
    assert stall_seconds(5) == 30
    assert stall_seconds(60) == 120


def test_a_taken_port_is_a_configuration_error(served: Served) -> None:
    from streamtasks.errors import ConfigError

    with pytest.raises(ConfigError, match="choose another --metrics-port"):
        OpsServer(served.metrics, served.server.health, served.server.port, "127.0.0.1")


def test_the_worker_command_refuses_a_bad_metrics_port(capsys: pytest.CaptureFixture[str]) -> None:
    from streamtasks.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["worker", "--app", "x:y", "--metrics-port", "-1"])
    assert exited.value.code == 2
    assert "--metrics-port" in capsys.readouterr().err
