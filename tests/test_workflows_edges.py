"""Workflow edge cases (chain, group, chord, callbacks) on memory:// only.

They come from a review of the first version. Tests marked ``# Regression`` failed
then: their comments say what docs/workflows.md promises, what happened instead, and
where the cause was. The others pin behaviour the review checked and found correct.
"""

from __future__ import annotations

import time

import pytest

from streamtasks import (
    App,
    ChainResult,
    ConfigError,
    GroupResult,
    TaskFailed,
    chain,
    chord,
    group,
    states,
)
from streamtasks.errors import TaskRevoked, WorkflowError
from streamtasks.signature import Signature
from tests.workflow_fixtures import Calls, drain_expecting_failure


def names(calls: Calls, name: str) -> list[tuple[object, ...]]:
    return [args for n, args in calls if n == name]


# -- error callbacks: how many times ------------------------------------------------


def test_chain_on_error_runs_once_when_a_member_of_its_implicit_chord_fails(
    app: App, calls: Calls
) -> None:
    # Regression: the callback runs twice.
    # docs: "chain(...).on_error(cb) ... gives every task in them the callback. The
    # callback runs once, for the task that failed."
    # Cause: _add_error_callbacks (signature.py) gives the callback to the failing
    # member AND to the chord body's first task; on failure the member runs its own
    # copy (workflow.on_failure) and the chord failure runs the body's copy
    # (workflow.chord_error_callbacks).
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    result = chain(group(add.s(1, 1), boom.si()), total.s()).on_error(on_error.s()).apply_async()
    drain_expecting_failure(app)
    with pytest.raises(TaskFailed, match="chord member 1 of 2"):
        result.get(timeout=1)
    errors = names(calls, "on_error")
    assert len(errors) == 1, errors


def test_chain_on_error_runs_once_when_a_member_of_an_explicit_chord_step_fails(
    app: App, calls: Calls
) -> None:
    # Regression: same cause as above, with a chord step inside a chain.
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    workflow = chain(add.s(1, 1), chord([add.s(1), boom.s()], total.s()), add.s(1))
    workflow.on_error(on_error.s()).apply_async()
    drain_expecting_failure(app)
    assert len(names(calls, "on_error")) == 1, names(calls, "on_error")


def test_group_on_error_runs_once_when_a_member_chord_fails(app: App, calls: Calls) -> None:
    # Regression: a group member may be a chord; group(...).on_error(cb) gives cb
    # to the chord's body too, so a failing chord member runs cb twice.
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    group(chord([boom.si(), add.s(1, 1)], total.s()), add.s(2, 2)).on_error(
        on_error.s()
    ).apply_async()
    drain_expecting_failure(app)
    assert len(names(calls, "on_error")) == 1, names(calls, "on_error")


def test_a_failure_inside_a_chord_that_is_a_member_fails_the_outer_chord(
    app: App, calls: Calls
) -> None:
    # Regression: the outer chord's error callback never runs, and the outer
    # chord is never claimed (no trigger row).
    # docs: "chord(...).on_error(cb) runs when a member fails"; a member that can never
    # produce a result "fails the chord in the same way".
    # Cause: the inner chord's body is CHAIN[total, JOIN(outer)]. When an inner member
    # fails, FollowUps._chord_failure_step -> _store_failed only marks the rows of
    # task_nodes(inner body) (which walks into the outer JOIN's body) FAILURE;
    # nothing fails the outer JOIN: no claim_group(outer, FAILED), no
    # on_chord_failure(outer join). The same happens for a chord member that is
    # chain(x, chord(...)).
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    inner = chord([boom.si(), add.s(1, 1)], total.s())
    result = chord([inner, add.s(2, 2)], total.s()).on_error(on_error.s()).apply_async()
    drain_expecting_failure(app)
    with pytest.raises(TaskFailed):
        result.get(timeout=1)
    assert result.parent is not None
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and claim.outcome == "failed", claim
    assert len(names(calls, "on_error")) == 1, names(calls, "on_error")


def test_chord_on_error_runs_once_for_a_failed_chain_step_in_a_member(
    app: App, calls: Calls
) -> None:
    # passes: the rest of the member chain is FAILURE, the chord fails once
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    member = chain(boom.si(), add.s(1))
    result = chord([member, add.s(1, 1)], total.s()).on_error(on_error.s()).apply_async()
    drain_expecting_failure(app)
    with pytest.raises(TaskFailed, match=r"chord member 0 of 2 .*ValueError: boom"):
        result.get(timeout=1)
    assert isinstance(result.parent, GroupResult)
    member_result = result.parent.results[0]
    assert isinstance(member_result, ChainResult)
    with pytest.raises(TaskFailed, match="upstream task"):
        member_result.get(timeout=1)
    [(task_id, error)] = names(calls, "on_error")
    assert task_id == member_result.steps[0].id and error == "ValueError: boom"
    assert not names(calls, "total")


def test_a_failed_member_of_a_chord_nested_in_a_chain_fails_the_rest(
    app: App, calls: Calls
) -> None:
    # passes
    add, boom, total, on_error = (app.tasks[n] for n in ("add", "boom", "total", "on_error"))
    workflow = chain(add.s(1, 1), chord([add.s(1), boom.s()], total.s()).on_error(on_error.s()),
                     add.s(5))
    result = workflow.apply_async()
    drain_expecting_failure(app)
    assert isinstance(result, ChainResult)
    with pytest.raises(TaskFailed, match="chord member 1 of 2"):
        result.get(timeout=1)
    assert [s.state for s in result.steps][-2:] == [states.FAILURE, states.FAILURE]
    assert len(names(calls, "on_error")) == 1
    assert names(calls, "add") == [(1, 1), (1, 2)]


# -- expired / unknown members ----------------------------------------------------------


def test_an_expired_member_fails_the_chord_and_calls_back_once(app: App, calls: Calls) -> None:
    # passes (the chord fails, callback once with (member id, "TaskExpired: ..."))
    add, total, on_error = app.tasks["add"], app.tasks["total"], app.tasks["on_error"]
    members = [add.s(1, 1), add.s(2, 2).set(expires_s=0.001)]
    result = chord(members, total.s()).on_error(on_error.s()).apply_async()
    time.sleep(0.05)
    app.drain()
    with pytest.raises(TaskFailed, match="chord member 1 of 2"):
        result.get(timeout=1)
    [(task_id, error)] = names(calls, "on_error")
    assert isinstance(result.parent, GroupResult)
    assert task_id == result.parent.results[1].id
    assert str(error).startswith("TaskExpired: ")
    with pytest.raises(TaskRevoked):
        result.parent.get(timeout=1)


def test_a_group_with_an_expired_member_reports_failure(app: App, calls: Calls) -> None:
    # Regression: GroupResult.state is PENDING for ever and failed() is False once a
    # member expired, although ready() is True and get() raises TaskRevoked.
    # Cause: result.GroupResult.state only looks for FAILURE / all-SUCCESS; REVOKED
    # (what Worker._expired writes) falls through to PENDING.
    # Fix: treat REVOKED like FAILURE in state (or return REVOKED), so failed() holds.
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(1, 1), add.s(2, 2).set(expires_s=0.001)], total.s()).apply_async()
    time.sleep(0.05)
    app.drain()
    parent = result.parent
    assert isinstance(parent, GroupResult) and parent.ready()
    assert parent.state != states.PENDING
    assert parent.failed()


def test_an_unknown_task_member_fails_the_chord(app: App, calls: Calls) -> None:
    # passes
    add, total, on_error = app.tasks["add"], app.tasks["total"], app.tasks["on_error"]
    result = chord([add.s(1, 1), Signature("no_such_task")], total.s()).on_error(
        on_error.s()
    ).apply_async()
    app.drain()
    with pytest.raises(TaskFailed, match=r"chord member 1 of 2 .*UnknownTaskError"):
        result.get(timeout=1)
    [(_, error)] = names(calls, "on_error")
    assert str(error).startswith("UnknownTaskError: ")


# -- retries ----------------------------------------------------------------------------


def test_a_retried_member_fires_the_chord_once_with_its_final_result(
    app: App, calls: Calls
) -> None:
    # passes
    attempts: list[int] = []

    @app.task(name="flaky", max_retries=0)
    def flaky(n: int) -> int:
        attempts.append(n)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return n * 100

    add, total = app.tasks["add"], app.tasks["total"]
    sig = flaky.s(7).set(max_retries=3, backoff="fixed", backoff_s=0.01)
    result = chord([add.s(1, 1), sig, add.s(2, 2)], total.s()).apply_async()
    app.drain(timeout_s=30)
    assert result.get(timeout=1) == 2 + 700 + 4
    assert names(calls, "total") == [([2, 700, 4], 0)]


# -- argument passing -----------------------------------------------------------------


def test_delay_args_go_to_the_first_tasks_of_chains_groups_and_chords(
    app: App, calls: Calls
) -> None:
    # passes
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    assert_ = chain(add.s(1), mul.s(10)).delay(2)
    g = group(add.s(1), add.s(2), add.si(5, 5)).delay(10)
    c = chord([add.s(1), mul.s(3)], total.s()).delay(4)
    ch = chain(group(add.s(1), add.s(2)), total.s()).delay(100)
    app.drain()
    assert assert_.get(timeout=1) == 30
    assert g.get(timeout=1) == [11, 12, 10]
    assert c.get(timeout=1) == 5 + 12
    assert ch.get(timeout=1) == 101 + 102


def test_a_group_after_a_chain_step_gets_the_result_in_every_member(
    app: App, calls: Calls
) -> None:
    # passes
    add, mul = app.tasks["add"], app.tasks["mul"]
    result = chain(add.s(1, 1), group(add.s(1), chain(mul.s(3), add.s(1)), add.si(0, 0)))
    handle = result.apply_async()
    app.drain()
    assert handle.get(timeout=1) == [3, 7, 0]


def test_error_callback_arguments_and_immutable_error_callback(app: App, calls: Calls) -> None:
    # passes
    boom, on_error, record = app.tasks["boom"], app.tasks["on_error"], app.tasks["record"]
    failed = boom.s().on_error(on_error.s()).on_error(record.si("x")).apply_async()
    drain_expecting_failure(app)
    assert names(calls, "on_error") == [(failed.id, "ValueError: boom")]
    assert names(calls, "record") == [("x",)]


# -- result handles -----------------------------------------------------------------


def test_chain_steps_reach_every_part_of_a_chord_whose_body_is_a_chord(
    app: App, calls: Calls
) -> None:
    # Regression: docs: "`.steps` holds one result per step, so every id can
    # be reached". For a chord step whose body is itself a chord, result_of (signature.py,
    # CHAIN branch) adds the outer group, then result_of(body) which returns only the
    # inner body's AsyncResult: the inner group's results are not in .steps.
    # Fix: in the CHAIN branch loop while step["kind"] == CHORD (append each group).
    add, total = app.tasks["add"], app.tasks["total"]
    workflow = chain(add.s(1, 1), chord([add.s(1), add.s(2)],
                                        chord([total.s(), total.s(plus=1)], total.s())))
    result = workflow.apply_async()
    app.drain()
    assert result.get(timeout=1) == 7 + 8
    assert isinstance(result, ChainResult)
    groups = [s for s in result.steps if isinstance(s, GroupResult)]
    assert [g.get(timeout=1) for g in groups] == [[3, 4], [7, 8]]


# -- misuse gives a clear ConfigError ---------------------------------------------------


def test_group_refuses_a_member_that_is_not_a_signature(app: App, calls: Calls) -> None:
    # Regression: group(a.s(), task) silently DROPS the task (no error): the group
    # runs with one member. Cause: signature.group() filters
    # `m for m in members if isinstance(m, Canvas)`. Fix: raise ConfigError naming the
    # bad member (e.g. "got a Task; use task.s(...)").
    add, total = app.tasks["add"], app.tasks["total"]
    with pytest.raises(ConfigError):
        group(add.s(1, 1), total)  # type: ignore[arg-type]


def test_a_task_instead_of_a_signature_is_refused_with_config_error(
    app: App, calls: Calls
) -> None:
    # Regression: a Task (not task.s()) as a chord body, a chain step, a chord
    # header item or a callback raises AttributeError("'Task' object has no attribute
    # '_freeze'") at apply_async. Fix: check isinstance(x, Canvas) in Chain/Group/Chord
    # and on_success/on_error and raise ConfigError.
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    with pytest.raises(ConfigError):
        chord([add.s(1, 1)], total).apply_async()  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        chain(add.s(1, 1), mul).apply_async()  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        add.s(1, 1).on_success(total).apply_async()  # type: ignore[arg-type]


def test_a_chord_header_that_is_one_signature_is_refused_with_config_error(
    app: App, calls: Calls
) -> None:
    # Regression: chord(add.s(1, 1), body) raises TypeError("'Signature' object is
    # not iterable") from Group(header); chord(chain(...), body) likewise.
    add, total = app.tasks["add"], app.tasks["total"]
    with pytest.raises(ConfigError):
        chord(add.s(1, 1), total.s())  # type: ignore[arg-type]


def test_a_group_of_lists_is_refused(app: App, calls: Calls) -> None:
    # Regression: group([a, b], [c]) drops both lists, then says "a group needs at
    # least one member" (misleading) -- or with one Canvas beside, runs silently.
    add = app.tasks["add"]
    with pytest.raises(ConfigError, match=r"(?i)signature|member 1"):
        group(add.s(1, 1), [add.s(2, 2)])


def test_a_chord_whose_body_is_a_chord_keeps_both_groups_reachable(
    app: App, calls: Calls
) -> None:
    # Regression: result_of (signature.py, CHORD branch) sets
    # body.parent = outer group, overwriting the inner chord's parent (its group), so
    # the inner group's member ids cannot be reached from the handle at all.
    # Fix: attach the outer group at the end of the parent chain
    # (inner_group.parent = outer_group) instead of overwriting.
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(1, 1), add.s(2, 2)],
                   chord([total.s(), total.s(plus=1)], total.s())).apply_async()
    app.drain()
    assert result.get(timeout=1) == 6 + 7
    found = []
    handle = result.parent
    while handle is not None:
        assert isinstance(handle, GroupResult)
        found.append(handle.get(timeout=1))
        handle = handle.parent
    assert sorted(found) == [[2, 4], [6, 7]], found


# -- failure of the follow-ups themselves ---------------------------------------------


def test_a_bad_option_value_is_refused_when_the_workflow_is_built(app: App, calls: Calls) -> None:
    # Regression: option *values* are not checked by Signature.set / apply_async
    # for steps after the first (workflow._task_message / retry.call_options only run
    # when the step is launched, on the worker). Here apply_async succeeds and the
    # first step, which succeeded, is later marked FAILURE with ConfigError.
    # Fix: validate values in Signature.__post_init__ (numbers for countdown_s,
    # expires_s, backoff_s; int >= 0 for max_retries; backoff in BACKOFFS; str for
    # queue / key) and raise ConfigError there.
    add = app.tasks["add"]
    with pytest.raises(ConfigError):
        chain(add.s(1, 1), add.s(1).set(backoff="nope")).apply_async()


def test_an_unexpected_error_while_building_follow_ups_does_not_wedge_the_record(
    app: App, calls: Calls
) -> None:
    # Regression: a non-FOLLOW_UP_ERRORS exception raised while building
    # a task's follow-ups (here TypeError from int(timedelta * 1000) in
    # workflow._task_message) escapes Worker._ran (consumer.py), which only catches
    # FOLLOW_UP_ERRORS; the executor's done-callback swallows it, so the record is
    # never marked done: the step's own row stays PENDING for ever, the partition's
    # watermark never advances past it, and a redelivery repeats the same hang.
    # Expected: the task fails visibly (its row FAILURE, the rest of the chain FAILURE)
    # and the record is done. Fix: validate options at set() (see above) AND catch
    # Exception around flows.after_success / after_failure in _ran, treating it as a
    # final failure of the task.
    from datetime import timedelta

    from streamtasks import Settings

    # (a short grace: closing a worker that holds a wedged record waits the whole grace)
    quick = App("quick", settings=Settings(broker="memory://", backend="memory://",
                                           partitions=3, commit_interval_s=0.0,
                                           shutdown_grace_s=0.5))

    @quick.task(name="inc")
    def inc(a: int, b: int = 1) -> int:
        return a + b

    # set() refuses such a value now; a producer built on another version (or a
    # hand-made message) can still carry one, so it is put in the message directly
    from streamtasks.message import TaskMessage

    bad_step = {"kind": "task", "id": "step-2", "name": "inc", "args": [], "kwargs": {},
                "immutable": False, "options": {"countdown_s": str(timedelta(seconds=1))},
                "link": [], "link_error": []}
    try:
        quick.publish(TaskMessage(id="step-1", name="inc", queue="default", args=[1],
                                  chain=[bad_step]))
        with pytest.raises(WorkflowError, match="cannot be built"):
            quick.drain(timeout_s=2)
        first, second = quick.result("step-1"), quick.result("step-2")
        assert first.state == states.FAILURE and second.state == states.FAILURE
        assert isinstance(result_error(first), str)
    finally:
        quick.close()


def result_error(result: object) -> str | None:
    meta = result.meta()  # type: ignore[attr-defined]
    return None if meta is None else meta.error_message


def test_a_chord_whose_body_is_too_large_runs_its_error_callbacks(calls: Calls) -> None:
    # Regression: when the body cannot be sent (results over max_message_bytes),
    # FollowUps._join_step.fire marks the body FAILURE but never starts the chord's
    # error callbacks, and the trigger row keeps outcome "fired" although the chord
    # failed. docs: "the chord fails and says so"; a failed chord runs its error
    # callbacks once. Fix: in fire(), on FOLLOW_UP_ERRORS, also launch
    # on_chord_failure(join, msg, err) (and record the outcome as failed).
    from streamtasks import Settings

    small = App("small", settings=Settings(broker="memory://", backend="memory://",
                                           partitions=3, commit_interval_s=0.0,
                                           max_message_bytes=4000))
    errors: list[tuple[str, str]] = []

    @small.task(name="big")
    def big(i: int) -> str:
        return "x" * 1500

    @small.task(name="count")
    def count(parts: list[str]) -> int:
        return len(parts)

    @small.task(name="on_error")
    def on_error(task_id: str, error: str) -> None:
        errors.append((task_id, error))

    try:
        result = chord([big.s(i) for i in range(4)], count.s()).on_error(
            on_error.s()
        ).apply_async()
        small.drain()
        with pytest.raises(TaskFailed, match="MessageTooLargeError"):
            result.get(timeout=1)
        assert len(errors) == 1, errors
    finally:
        small.close()


# -- more checks that pass ------------------------------------------------------------


def test_a_member_failing_after_its_retries_fails_the_chord_once(
    app: App, calls: Calls
) -> None:
    # passes: RETRY attempts start no callbacks; the final failure starts them once
    add, total, on_error = app.tasks["add"], app.tasks["total"], app.tasks["on_error"]
    attempts: list[int] = []

    @app.task(name="always_fails", max_retries=0)
    def always_fails() -> None:
        attempts.append(1)
        raise ValueError("boom")

    member = always_fails.si().set(max_retries=2, backoff="fixed", backoff_s=0.01)
    result = chord([add.s(1, 1), member.on_error(on_error.s())], total.s()).on_error(
        on_error.s()
    ).apply_async()
    with pytest.raises(ValueError):
        app.drain(timeout_s=30)
    assert len(attempts) == 3
    with pytest.raises(TaskFailed, match="chord member 1 of 2"):
        result.get(timeout=1)
    assert len(names(calls, "on_error")) == 2  # the member's own + the chord's, once each
    assert not names(calls, "total")


def test_a_member_with_bad_arguments_fails_the_chord(app: App, calls: Calls) -> None:
    # passes: add(1, 2, 3) cannot bind -> dead letter -> the chord fails
    add, total = app.tasks["add"], app.tasks["total"]
    result = chain(add.s(1, 2), chord([add.s(1), add.s(1, 2)], total.s())).apply_async()
    app.drain()
    with pytest.raises(TaskFailed, match=r"chord member 1 of 2 .*ArgumentError"):
        result.get(timeout=1)


def test_a_group_member_that_is_a_chord_after_a_chain_step(app: App, calls: Calls) -> None:
    # passes: 2 -> [total([2+1, 2+2]), 2+5]
    add, total = app.tasks["add"], app.tasks["total"]
    result = chain(add.s(1, 1), group(chord([add.s(1), add.s(2)], total.s()), add.s(5)),
                   total.s()).apply_async()
    app.drain()
    assert result.get(timeout=1) == 7 + 7
