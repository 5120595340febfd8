"""`streamtasks inspect` on memory:// (the Kafka path: integration/test_ops_http_kafka.py)."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from streamtasks import App, Settings
from streamtasks.cli import main
from streamtasks.errors import BrokerError
from streamtasks.ops.inspect import _described, inspect_queues, list_queues, queues_of_topics

QUEUE = "default"


@pytest.fixture
def app() -> Iterator[App]:
    application = App("inspect", settings=Settings(
        broker="memory://", backend="memory://", namespace="insp", partitions=3,
        commit_interval_s=0.0, delay_tiers="50ms,200ms"))

    @application.task(name="ok")
    def ok(i: int) -> int:
        return i

    yield application
    application.close()


def given_work_in_every_place(app: App) -> None:
    """Dead letter 1, then (no worker running) lag 2 and one countdown in a tier."""
    ok = app.get_task("ok")
    for i in range(3):
        ok.delay(i)
    app.send("nobody-registered-this")
    app.drain([QUEUE])
    ok.delay(3)
    ok.delay(4)
    ok.apply_async([5], countdown_s=60)
    app.flush()


def test_a_report_shows_lag_delay_tiers_dead_letters_and_total(app: App) -> None:
    given_work_in_every_place(app)
    [report] = inspect_queues(app, [QUEUE])
    assert report.lag_total == 2
    assert len(report.lag) == 3
    assert {p.partition for p in report.lag} == {0, 1, 2}
    # partitions fed only after the drain (keyless records spread at random) have none
    assert any(p.committed is not None for p in report.lag)
    assert report.delay == {"50ms": 0, "200ms": 1}
    assert report.dlq == 1
    assert report.total == 3
    assert report.group.group == "insp.default" and report.group.count == 0
    assert report.forwarder.group == "insp.default.delayer"
    assert report.missing_topics == []


def test_a_queue_without_topics_is_reported_missing(app: App) -> None:
    [report] = inspect_queues(app, ["never"])
    assert report.total == 0 and report.dlq == 0
    assert "insp.never" in report.missing_topics
    assert "insp.never.dlq" in report.missing_topics


def test_members_of_a_running_worker_are_counted(app: App) -> None:
    app.get_task("ok").delay(1)
    app.flush()
    worker = app.worker([QUEUE])
    try:
        worker.run_until_idle(5)
        [report] = inspect_queues(app, [QUEUE])
        assert report.group.count == 1 and report.group.state == "Stable"
        assert report.forwarder.count == 1
        assert report.total == 0
    finally:
        worker.close()


@pytest.fixture
def app_module(app: App, monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("inspect_app_mod")
    module.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inspect_app_mod", module)
    return "inspect_app_mod:app"


def test_the_command_prints_json(app: App, app_module: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    given_work_in_every_place(app)
    capsys.readouterr()  # the drain's log lines
    assert main(["inspect", "--app", app_module, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["namespace"] == "insp"
    [queue] = answer["queues"]
    assert queue["queue"] == QUEUE
    assert queue["lag"]["total"] == 2
    assert queue["delay"]["tiers"] == {"50ms": 0, "200ms": 1}
    assert queue["dlq"] == 1 and queue["total"] == 3
    assert queue["group"]["group"] == "insp.default"


def test_the_command_prints_text(app: App, app_module: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    given_work_in_every_place(app)
    capsys.readouterr()
    assert main(["inspect", "--app", app_module, "--queues", QUEUE]) == 0
    out = capsys.readouterr().out
    assert "queue default: 3 waiting (lag 2, delay tiers 1), 1 dead letter(s)" in out
    assert "group insp.default: Empty, 0 member(s)" in out
    assert "200ms=1" in out


def test_without_queues_on_memory_the_command_asks_for_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["inspect", "--broker", "memory://", "--backend", "memory://"]) == 1
    assert "name them with --queues" in capsys.readouterr().err


def test_queues_are_found_among_topics_without_their_derived_topics() -> None:
    settings = Settings(namespace="ns", delay_tiers="1s,5s")
    topics = ["ns.a", "ns.a.dlq", "ns.a.delay.1s", "ns.a.delay.5s", "ns.b.c", "ns.b.c.dlq",
              "other.x", "__consumer_offsets"]
    assert queues_of_topics(settings, topics) == ["a", "b.c"]


def test_list_queues_needs_kafka() -> None:
    with pytest.raises(BrokerError, match="--queues"):
        list_queues(Settings(broker="memory://"))


def test_kafka_members_are_shown_with_their_partitions() -> None:
    tp = SimpleNamespace
    description = SimpleNamespace(
        state=SimpleNamespace(name="STABLE"),
        members=[SimpleNamespace(
            client_id="streamtasks", host="/10.0.0.7", member_id="m-1",
            assignment=SimpleNamespace(topic_partitions=[tp(topic="ns.a", partition=2),
                                                         tp(topic="ns.a", partition=0)]))],
    )
    info = _described("ns.a", description)
    assert info.state == "Stable" and info.count == 1
    assert info.members is not None
    assert info.members[0].partitions == {"ns.a": [0, 2]}
    assert info.members[0].host == "/10.0.0.7"
