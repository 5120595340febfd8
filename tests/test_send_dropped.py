"""A send not confirmed in time: reported once, dropped, never waited for again."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import pytest

from streamtasks import App
from streamtasks import app as app_module
from streamtasks.broker.base import DeliveryCallback
from streamtasks.broker.memory import MemoryBroker
from streamtasks.errors import SendError

PURGED = "Local: Purged in queue"


class UnconfirmingBroker(MemoryBroker):
    """Queues records and never confirms them; drop_queued fails them (as librdkafka's
    purge does: the reports come at the next poll or flush)."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[DeliveryCallback | None] = []
        self.purged: list[DeliveryCallback | None] = []
        self.drops = 0

    def send(self, topic: str, value: bytes, *, key: bytes | None = None,
             headers: Mapping[str, bytes] | None = None, partition: int | None = None,
             on_delivery: DeliveryCallback | None = None) -> None:
        self.queued.append(on_delivery)

    def poll(self, timeout_s: float = 0.0) -> int:
        served, self.purged = self.purged, []
        for callback in served:
            if callback is not None:
                callback(PURGED)
        return len(served)

    def flush(self, timeout_s: float) -> int:
        self.poll()
        return len(self.queued)  # what a real flush would still be waiting for

    def drop_queued(self) -> None:
        self.drops += 1
        self.purged += self.queued
        self.queued = []


def _app() -> tuple[App, UnconfirmingBroker, object]:
    broker = UnconfirmingBroker()
    app = App("dropped", broker=broker, backend="memory://")

    @app.task(name="t")
    def t() -> None:
        """Nothing."""

    return app, broker, t


def test_a_send_not_confirmed_in_time_is_reported_once_and_dropped() -> None:
    # Given two queued sends the broker does not confirm
    app, broker, t = _app()
    first, second = t.delay(), t.delay()  # type: ignore[attr-defined]
    # When a flush for the first one times out
    with pytest.raises(SendError) as raised:
        app.flush(timeout_s=0.01, only=[first.id])
    # Then the caller is told it was dropped, and every record still queued is dropped
    assert raised.value.failures == [
        (first.id, "not confirmed within 0.01s; dropped from the send queue")]
    assert broker.drops == 1 and broker.queued == []
    # and the other one is reported failed by the next flush (not lost silently), the
    # first one not again
    with pytest.raises(SendError) as again:
        app.flush(timeout_s=0.01)
    assert again.value.failures == [(second.id, PURGED)]
    # and nothing is left for a later flush (the one at exit) to wait for or report
    assert broker.flush(0.01) == 0
    app.flush(timeout_s=0.01)


def test_a_whole_flush_timing_out_reports_each_send_once_and_leaves_nothing_to_wait_for(
) -> None:
    app, broker, t = _app()
    ids = [t.delay().id for _ in range(3)]  # type: ignore[attr-defined]
    with pytest.raises(SendError) as raised:
        app.flush(timeout_s=0.01)
    assert sorted(tid for tid, _ in raised.value.failures) == sorted(ids)
    assert broker.drops == 1
    app.flush(timeout_s=0.01)  # the purge reports of the dropped records: not re-reported
    assert broker.flush(0.01) == 0


def test_a_send_confirmed_on_time_drops_nothing() -> None:
    app, broker, t = _app()
    t.delay()  # type: ignore[attr-defined]
    callback = broker.queued.pop()
    assert callback is not None
    callback(None)
    app.flush(timeout_s=0.01)
    assert broker.drops == 0


def test_a_confirm_waiting_is_woken_by_a_report_served_in_another_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a confirm waiting on a send, its own polls an hour apart (a report served
    # elsewhere must wake it: reports notify only when someone waits, so this pins it)
    monkeypatch.setattr(app_module, "CONFIRM_SLICE_S", 3600.0)
    app, broker, t = _app()
    sent = t.delay()  # type: ignore[attr-defined]
    callback = broker.queued.pop()
    assert callback is not None
    waiter = threading.Thread(target=app.confirm, args=([sent.id],), kwargs={"timeout_s": 7200},
                              daemon=True)
    waiter.start()
    while not app._confirming:  # the waiter is inside its wait
        time.sleep(0.001)
    # When another thread serves the report
    callback(None)
    # Then the waiter returns (it would sleep an hour on a missed notification)
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert app._confirming == 0


def test_reports_with_nobody_waiting_are_still_counted() -> None:
    app, broker, t = _app()
    ok, failed = t.delay(), t.delay()  # type: ignore[attr-defined]
    confirm_failed, confirm_ok = broker.queued.pop(), broker.queued.pop()
    assert confirm_ok is not None and confirm_failed is not None
    confirm_ok(None)
    confirm_failed("broker said no")
    app.confirm([ok.id], timeout_s=0.01)  # confirmed: returns, nothing raised
    with pytest.raises(SendError) as raised:
        app.confirm([failed.id], timeout_s=0.01)
    assert raised.value.failures == [(failed.id, "broker said no")]


def test_reports_are_served_as_tasks_are_sent_not_only_by_a_flush() -> None:
    # Given a broker whose reports wait for a poll (as Kafka's do)
    app = App("served", broker="memory://", backend="memory://")

    @app.task(name="t")
    def t() -> None:
        """Nothing."""

    app.broker.fail_next_sends(1, "refused")  # type: ignore[attr-defined]
    # When tasks are sent and nothing flushes
    refused = t.delay()
    taken = [t.delay() for _ in range(2 * app_module.POLL_EVERY_SENDS - 1)]
    # Then the sends served the reports in: only the refused one is still owed an answer
    assert app.abandon_unconfirmed() == [refused.id]
    assert refused.id not in {result.id for result in taken}
