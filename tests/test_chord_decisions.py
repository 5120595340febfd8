"""A chord's trigger row decides once, and every member defers to it (issue 9, 4–6).

memory:// only; the same rules run against Cassandra in the backend contract suite and
against real workers in ``integration/test_delivery_kafka.py``.
"""

from __future__ import annotations

import pytest

from streamtasks import App, TaskFailed, chord
from streamtasks.backend.base import GROUP_FAILED, GROUP_FIRED
from streamtasks.broker.memory import MemoryBroker
from streamtasks.headers import TASK_ID
from streamtasks.ops.replay import replay
from tests.workflow_fixtures import Calls


def _run(app: App, patience_s: float | None = None, timeout_s: float = 10.0) -> None:
    app.flush()
    worker = app.worker()
    if patience_s is not None:
        worker.flows.claim_patience_s = patience_s
    try:
        worker.run_until_idle(timeout_s)
    finally:
        worker.close()


def _totals(calls: Calls) -> int:
    return sum(1 for name, _ in calls if name == "total")


def test_a_chord_decided_failed_never_fires_even_when_every_member_succeeds(
    app: App, calls: Calls
) -> None:
    # Given a chord whose trigger already says failed (a member failed, then was
    # delivered again and succeeded: finding 4)
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(4)], total.s()).apply_async()
    app.backend.claim_group(result.parent.id, "elsewhere/0@1", GROUP_FAILED,
                            "member 2 failed: boom").result()
    # When every member succeeds and completes the group
    _run(app, patience_s=0.0)
    # Then the body never ran, and the chord reads FAILURE with the recorded reason
    assert _totals(calls) == 0
    with pytest.raises(TaskFailed, match="member 2 failed"):
        result.get(timeout=1)
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and claim.outcome == GROUP_FAILED and claim.settled


def test_a_fired_chord_whose_claimer_died_unconfirmed_is_fired_by_a_completer(
    app: App, calls: Calls
) -> None:
    # Given a trigger claimed "fired" by a record whose worker died before the body's
    # send was confirmed (finding 5: that record may come back only as another attempt)
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(4)], total.s()).apply_async()
    app.backend.claim_group(result.parent.id, "dead/0@7", GROUP_FIRED).result()
    # When the members complete the group after the claimer's patience ran out
    _run(app, patience_s=0.0)
    # Then one completer sends the body, which runs once, and the trigger is settled
    assert result.get(timeout=1) == sum(2 * i for i in range(4))
    assert _totals(calls) == 1
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and claim.claimer == "dead/0@7" and claim.settled


def test_a_fresh_unsettled_decision_of_another_claimer_is_waited_for(
    app: App, calls: Calls
) -> None:
    # Given a trigger claimed "fired" a moment ago by another record, not settled
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(3)], total.s()).apply_async()
    app.backend.claim_group(result.parent.id, "busy/0@3", GROUP_FIRED).result()
    app.settings.shutdown_grace_s = 0.2  # the waiting completer holds its partition
    # When the members complete within the claimer's patience
    with pytest.raises(Exception, match="not drained"):
        _run(app, patience_s=60.0, timeout_s=1.5)
    # Then nobody else sent the body: the completer waits (its offset not committed)
    assert _totals(calls) == 0
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and not claim.settled


def test_members_delivered_again_after_the_chord_settled_send_nothing(
    app: App, calls: Calls
) -> None:
    # Given a chord that fired and settled
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(4)], total.s()).apply_async()
    _run(app)
    assert _totals(calls) == 1
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and claim.settled
    # When every member record is delivered again, the claimer's included (a crash
    # before the commit: finding 6)
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    broker._groups[app.settings.group_id("default")].committed.clear()
    _run(app)
    # Then the members ran again, but the body did not
    assert sum(1 for name, _ in calls if name == "add") == 8
    assert _totals(calls) == 1


def test_a_duplicate_body_record_is_skipped_once_the_body_is_final(
    app: App, calls: Calls
) -> None:
    # Given a chord that fired, ran its body and settled
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(3)], total.s()).apply_async()
    _run(app)
    assert _totals(calls) == 1
    # When the body's record arrives again (a completer re-sent it, or the body's own
    # record was delivered twice)
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    topic = app.settings.topic("default")
    body = [r for r in broker.records(topic) if r.headers.get(TASK_ID) == result.id.encode()]
    assert len(body) == 1
    record = body[0]
    broker.send(topic, record.value or b"", key=record.key, headers=record.headers,
                partition=record.partition)
    _run(app)
    # Then it is not run again
    assert _totals(calls) == 1


def test_an_operator_replay_of_a_chord_body_with_the_same_ids_runs_it_again(
    app: App, calls: Calls
) -> None:
    # Given a chord that fired and ran its body
    add, total = app.tasks["add"], app.tasks["total"]
    chord([add.s(i, i) for i in range(3)], total.s()).apply_async()
    _run(app)
    assert _totals(calls) == 1
    # When an operator replays the queue keeping the ids (the body's row is final)
    replay(app, "default", since_ms=0, name="total", same_ids=True, include_derived=True)
    _run(app)
    # Then the body runs again: only the chord machinery's duplicates are skipped
    assert _totals(calls) == 2
