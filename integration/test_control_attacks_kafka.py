"""Attacks on docs/control.md's promises on the real Kafka and Cassandra.

The same attacks on memory://, and more: ``tests/test_control_attacks.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from integration._workers import make_app, new_namespace, worker_env
from streamtasks.broker.base import TopicPartition
from streamtasks.control import ControlListener, RevokedIds
from streamtasks.errors import SendError
from streamtasks.message import TaskMessage
from streamtasks.schedules import Scheduler, scoped
from tests import control_tasks

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_a_due_time_claimed_on_cassandra_but_refused_by_kafka_fires_after_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = worker_env(new_namespace("restart"))
    before, after = make_app(env), make_app(env)
    try:
        for app in (before, after):
            app.periodic(every=2, args=(3,), name="sq")(control_tasks.square)
        [schedule] = scoped(before, before.schedules.values())

        def refused(*_args: Any, **_kwargs: Any) -> None:
            raise SendError([("x", "Broker: Not enough in-sync replicas")])

        monkeypatch.setattr(before, "send", refused)
        start = int(time.time() * 1000) // 2000 * 2000
        first = Scheduler(before, "w-before-restart")
        first.tick(start + 1000)
        assert first.tick(start + 2000) == []  # claimed by an LWT, never sent
        claim = before.backend.fire_claim(schedule.key, start + 2000)
        assert claim is not None and claim.claimer == "w-before-restart" and not claim.sent

        restarted = Scheduler(after, "w-after-restart")
        assert restarted.tick(start + 2500) == []
        monkeypatch.setattr("streamtasks.schedules.time.monotonic",
                            lambda: time.time() + 3600)
        assert restarted.tick(start + 3000) == [schedule.task_id(start + 2000)]
        claim = after.backend.fire_claim(schedule.key, start + 2000)
        assert claim is not None and claim.claimer == "w-after-restart" and claim.sent
        topic = after.settings.topic("default")
        high = sum(after.broker.watermarks(TopicPartition(topic, p))[1]
                   for p in range(after.settings.partitions))
        assert high == 1  # the task went out once
    finally:
        before.close()
        after.close()


@pytest.mark.timeout(120)
def test_a_worker_starting_on_a_control_topic_emptied_by_retention_is_not_held() -> None:
    app = make_app(worker_env(new_namespace("ctlgone")))
    listener: ControlListener | None = None
    try:
        app.revoke(["old-1", "old-2", "old-3"])
        tp = TopicPartition(app.settings.topology.control_topic(), 0)
        app.broker.delete_records({tp: app.broker.watermarks(tp)[1]})  # as retention does
        low, high = app.broker.watermarks(tp)
        assert low == high == 3
        revoked = RevokedIds()
        listener = ControlListener(app, revoked)
        assert listener.start(catch_up_s=20.0), "the start waited for deleted records"
        app.revoke(["new-1"])  # and later revokes still arrive
        deadline = time.monotonic() + 30
        new = TaskMessage(id="new-1", name="t", queue="q")
        while revoked.match(new) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert revoked.match(new) is not None
        assert revoked.match(TaskMessage(id="old-1", name="t", queue="q")) is None
    finally:
        if listener is not None:
            listener.close()
        app.close()
