"""Workflows on the memory broker and backend: chains, groups, chords, callbacks."""

from __future__ import annotations

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
from streamtasks.message import TaskMessage
from streamtasks.workflow import JOIN, on_success
from tests.workflow_fixtures import drain_expecting_failure


def test_a_chain_appends_each_result_to_the_next_steps_arguments(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, mul = app.tasks["add"], app.tasks["mul"]
    result = chain(add.s(1, 2), mul.s(10), add.s(5), mul.s(2)).apply_async()
    app.drain()
    # ((1 + 2) * 10 + 5) * 2
    assert result.get(timeout=1) == 70
    assert isinstance(result, ChainResult)
    assert [step.get(timeout=1) for step in result.steps] == [3, 30, 35, 70]
    assert [c for c in calls if c[0] in ("add", "mul")] == [
        ("add", (1, 2)), ("mul", (10, 3)), ("add", (5, 30)), ("mul", (2, 35))
    ]


def test_an_immutable_step_ignores_the_previous_result(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, const = app.tasks["add"], app.tasks["const"]
    result = (add.s(1, 1) | const.si(7) | add.s(1)).apply_async()
    app.drain()
    assert result.get(timeout=1) == 8
    assert ("const", (7,)) in calls


def test_the_chains_id_is_its_last_steps_and_steps_know_their_parent(app: App) -> None:
    @app.task(name="inc")
    def inc(x: int) -> int:
        return x + 1

    result = chain(inc.s(0), inc.s(), inc.s()).apply_async(task_id="wf-1")
    assert result.id == "wf-1"
    app.drain()
    last = app.backend.fetch("wf-1")
    first = app.backend.fetch(result.steps[0].id)
    assert last is not None and first is not None
    assert last.result == 3 and last.root_id == "wf-1"
    assert last.parent_id == result.steps[1].id


def test_a_group_returns_results_in_group_order(app: App, calls: object) -> None:
    add = app.tasks["add"]
    result = group(add.s(i, i) for i in range(10)).apply_async()
    assert isinstance(result, GroupResult)
    assert result.completed_count() == 0 and not result.ready()
    app.drain()
    assert result.get(timeout=1) == [2 * i for i in range(10)]
    assert result.completed_count() == 10 and result.ready() and result.successful()


def test_a_group_may_hold_chains(app: App, calls: object) -> None:
    add, mul = app.tasks["add"], app.tasks["mul"]
    result = group(chain(add.s(i, 1), mul.s(3)) for i in range(4)).apply_async()
    app.drain()
    assert result.get(timeout=1) == [(i + 1) * 3 for i in range(4)]


def test_a_chord_calls_back_once_with_every_result_in_order(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, total = app.tasks["add"], app.tasks["total"]
    result = chord([add.s(i, i) for i in range(100)], total.s(plus=1)).apply_async()
    app.drain()
    assert result.get(timeout=1) == sum(2 * i for i in range(100)) + 1
    totals = [c for c in calls if c[0] == "total"]
    assert totals == [("total", ([2 * i for i in range(100)], 1))]
    assert isinstance(result.parent, GroupResult)
    assert result.parent.get(timeout=1)[:3] == [0, 2, 4]
    claim = app.backend.group_claim(result.parent.id)
    assert claim is not None and claim.outcome == "fired"


def test_a_group_inside_a_chain_is_an_implicit_chord(app: App, calls: object) -> None:
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    # 1+1 = 2 -> each member adds it -> [2+0, 2+1, 2+2] -> total 9 -> *10
    result = chain(add.s(1, 1), group(add.s(i) for i in range(3)), total.s(), mul.s(10))
    handle = result.apply_async()
    app.drain()
    assert handle.get(timeout=1) == 90
    assert isinstance(handle, ChainResult)
    assert isinstance(handle.steps[1], GroupResult)
    assert handle.steps[1].get(timeout=1) == [2, 3, 4]


def test_a_nested_chain_of_group_and_chord(app: App, calls: object) -> None:
    add, total = app.tasks["add"], app.tasks["total"]
    # the group's list [2, 4] goes to each chord member; the body sums their results
    workflow = chain(
        group(add.s(1, 1), add.s(2, 2)),
        chord([total.s(), total.s(plus=10)], total.s()),
    )
    handle = workflow.apply_async()
    app.drain()
    assert handle.get(timeout=1) == (2 + 4) + (2 + 4 + 10)
    assert isinstance(handle, ChainResult)
    groups = [step for step in handle.steps if isinstance(step, GroupResult)]
    assert [g.get(timeout=1) for g in groups] == [[2, 4], [6, 16]]


def test_a_chain_result_can_start_a_group_whose_members_are_chains(
    app: App, calls: object
) -> None:
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    workflow = chain(
        add.s(2, 3),
        chord([chain(add.s(1), mul.s(2)), mul.s(10)], total.s()),
    )
    handle = workflow.apply_async()
    app.drain()
    # 5 -> [(5+1)*2, 5*10] -> 12 + 50
    assert handle.get(timeout=1) == 62


def test_link_and_link_error_callbacks(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, boom = app.tasks["add"], app.tasks["boom"]
    record, on_error = app.tasks["record"], app.tasks["on_error"]
    ok = add.s(2, 2).on_success(record.s("ok")).apply_async()
    bad = boom.s().on_error(on_error.s()).on_success(record.s("never")).apply_async()
    drain_expecting_failure(app)
    assert ok.get(timeout=1) == 4
    assert ("record", ("ok", 4)) in calls
    assert ("on_error", (bad.id, "ValueError: boom")) in calls
    assert not any(c == ("record", ("never", None)) for c in calls)
    with pytest.raises(TaskFailed, match="boom"):
        bad.get(timeout=1)


def test_a_failed_step_fails_the_rest_of_the_chain_visibly(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, boom = app.tasks["add"], app.tasks["boom"]
    on_error = app.tasks["on_error"]
    handle = chain(add.s(1, 1), boom.s(), add.s(1), add.s(2)).on_error(on_error.s())
    result = handle.apply_async()
    drain_expecting_failure(app)
    with pytest.raises(TaskFailed, match=r"upstream task .* failed: ValueError: boom"):
        result.get(timeout=1)
    assert isinstance(result, ChainResult)
    assert result.steps[0].get(timeout=1) == 2
    assert [c[0] for c in calls].count("on_error") == 1
    assert [c for c in calls if c[0] == "add"] == [("add", (1, 1))]


def test_a_failed_member_fails_the_chord_and_runs_its_error_callback_once(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, boom, total = app.tasks["add"], app.tasks["boom"], app.tasks["total"]
    on_error = app.tasks["on_error"]
    members = [add.s(i, i) for i in range(5)] + [boom.s()]
    result = chord(members, total.s()).on_error(on_error.s()).apply_async()
    drain_expecting_failure(app)
    with pytest.raises(TaskFailed, match=r"chord member 5 of 6 .* ValueError: boom"):
        result.get(timeout=1)
    assert result.state == states.FAILURE
    assert not any(c[0] == "total" for c in calls)
    errors = [c for c in calls if c[0] == "on_error"]
    assert len(errors) == 1 and errors[0][1][1] == "ValueError: boom"
    assert isinstance(result.parent, GroupResult) and result.parent.failed()


def test_a_repeated_member_does_not_fire_the_chord_twice(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, total = app.tasks["add"], app.tasks["total"]
    workflow = chord([add.s(i, 0) for i in range(3)], total.s())
    result = workflow.apply_async(task_id="chord-1")
    app.drain()
    assert result.get(timeout=1) == 3
    # Given the chord fired, when every member runs again (the same ids: duplicate records)
    again = workflow.apply_async(task_id="chord-1")
    app.drain()
    # then the members ran twice, the body once
    assert again.id == result.id
    assert [c[0] for c in calls].count("add") == 6
    assert [c[0] for c in calls].count("total") == 1


def test_a_member_message_carries_the_join_as_its_continuation(app: App, calls: object) -> None:
    add, total = app.tasks["add"], app.tasks["total"]
    node = chord([add.s(1, 1), add.s(2, 2)], total.s()).freeze("root")
    member = TaskMessage(id="m", name="add", queue="default", chain=[
        {"kind": JOIN, "group": node["group"]["id"], "index": 1, "size": 2,
         "body": node["body"], "link_error": []}
    ])
    plan = on_success(member, 4, "default", 0)
    assert plan.messages == [] and plan.join is not None and plan.join["index"] == 1


def test_bad_workflows_are_refused_with_a_clear_error(app: App, calls: object) -> None:
    add = app.tasks["add"]
    with pytest.raises(ConfigError, match="at least one member"):
        group([]).apply_async(app=app)
    with pytest.raises(ConfigError, match="member 0 is \\(or ends in\\) a group"):
        group(group(add.s(1, 1))).apply_async()
    with pytest.raises(ConfigError, match="unknown signature option"):
        add.s(1, 1).set(priority=3)
    with pytest.raises(ConfigError, match="at least one step"):
        chain()


def test_group_get_raises_a_failed_member_without_waiting_for_the_rest(
    app: App, calls: object
) -> None:
    from streamtasks import ResultTimeout
    from streamtasks.result import AsyncResult

    boom = app.tasks["boom"]
    failed = boom.s().apply_async()
    drain_expecting_failure(app)
    # one member failed, the other was never sent (it stays PENDING)
    pending = AsyncResult("never-sent", app)
    members = GroupResult("g", [failed, pending], app)
    with pytest.raises(TaskFailed, match="boom"):
        members.get(timeout=5)
    with pytest.raises(ResultTimeout, match="1 of 2 members not finished"):
        GroupResult("g", [pending, failed], app).get(timeout=0.2, propagate=False)


def test_a_failed_join_write_is_retried_and_the_chord_fires_once(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    from streamtasks.backend.memory import MemoryBackend

    add, total = app.tasks["add"], app.tasks["total"]
    backend = app.backend
    assert isinstance(backend, MemoryBackend)
    result = chord([add.s(i, i) for i in range(6)], total.s()).apply_async()
    # Given the next 4 backend writes fail (rows and joins alike)
    backend.fail_writes(4)
    app.drain(timeout_s=30)
    # Then every write is retried and the body runs once with every result
    assert result.get(timeout=1) == sum(2 * i for i in range(6))
    assert [c[0] for c in calls].count("total") == 1


def test_signature_options_reach_the_message(app: App, calls: object) -> None:
    from streamtasks.workflow import launch

    add = app.tasks["add"]
    options = dict(queue="other", key="k1", countdown_s=2.5, expires_s=60, max_retries=4,
                   backoff="fixed", backoff_s=0.5)
    node = add.s(1, 2).set(**options).freeze("root")
    [msg] = launch(node, [], [], None, "default", now_ms=1_000)
    assert (msg.queue, msg.key, msg.eta_ms, msg.expires_ms) == ("other", "k1", 3_500, 61_000)
    assert msg.options == {"max_retries": "4", "backoff": "fixed", "backoff_s": "0.5"}
    assert msg.args == [1, 2] and msg.id == node["id"] == "root"  # the root is its id


def test_signature_options_apply_on_a_worker(app: App, calls: object) -> None:
    @app.task(name="flaky", max_retries=0)
    def flaky(n: int) -> int:
        attempts.append(n)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return len(attempts)

    attempts: list[int] = []
    result = flaky.s(7).set(max_retries=2, backoff="fixed", backoff_s=0.01).apply_async()
    app.drain(timeout_s=30)
    assert result.get(timeout=1) == 3 and attempts == [7, 7, 7]


def test_a_workflow_too_large_for_one_message_is_refused_at_apply(
    app: App, calls: object
) -> None:
    from streamtasks import MessageTooLargeError, Settings

    small = App("small", settings=Settings(broker="memory://", backend="memory://",
                                           max_message_bytes=1_000_000))
    add, total = app.tasks["add"], app.tasks["total"]
    # about 140 bytes per member: 10,000 members do not fit in one 1 MB message
    huge = chain(add.s(1, 1), group(add.s(i) for i in range(10_000)), total.s())
    with pytest.raises(MessageTooLargeError, match="over the limit of 1000000 bytes"):
        huge.apply_async(app=small)
    small.close()


def _all_ids(node: object) -> list[str]:
    """Every task and group id in a frozen node, callbacks included."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") in ("task", "group"):
            found.append(node["id"])
        for value in node.values():
            found += _all_ids(value)
    elif isinstance(node, list):
        for value in node:
            found += _all_ids(value)
    return found


def test_every_part_of_a_nested_workflow_gets_its_own_stable_id(app: App, calls: object) -> None:
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    on_error = app.tasks["on_error"]
    workflows = [
        chain(add.s(1, 1), group(add.s(i) for i in range(3)), total.s(), mul.s(10)),
        chain(add.s(1, 1), chord([add.s(1), add.s(2)], chain(total.s(), mul.s(2)))),
        chain(group(add.s(1, 1), add.s(2, 2)), chord([total.s(), total.s()], total.s()),
              add.s(1), group(add.s(i) for i in range(2)), total.s()),
        chord([chain(add.s(i, 1), mul.s(3)) for i in range(3)],
              total.s().on_success(add.s(1)).on_error(on_error.s())).on_error(on_error.s()),
        group(chain(add.s(1, 1), mul.s(2)), add.s(3, 3)).on_error(on_error.s()),
    ]
    for workflow in workflows:
        node = workflow.freeze("root")
        ids = _all_ids(node)
        assert len(ids) == len(set(ids)), f"shared ids in {workflow!r}"
        assert "root" in ids
        assert workflow.freeze("root") == node  # the same root gives the same ids


def test_a_chain_after_a_chord_step_runs_every_step(
    app: App, calls: list[tuple[str, tuple[object, ...]]]
) -> None:
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    # 1+1=2 -> [2+1, 2+2] -> 7 -> 7*2 -> 14+1
    result = chain(add.s(1, 1), chord([add.s(1), add.s(2)], total.s()), mul.s(2),
                   add.s(1)).apply_async()
    app.drain()
    assert result.get(timeout=1) == 15
    assert isinstance(result, ChainResult)
    assert len({step.id for step in result.steps}) == len(result.steps)
    assert [c[0] for c in calls] == ["add", "add", "add", "total", "mul", "add"]
