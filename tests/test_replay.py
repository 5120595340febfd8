"""Replay reprocesses each task once: origin records only, fresh ids for whole workflows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from streamtasks import App, Settings, chain, chord
from streamtasks.broker.base import Record
from streamtasks.ops import ReplayItem, replay
from streamtasks.workflow import renamed_ids


@pytest.fixture
def runs() -> Counter[str]:
    return Counter()


@pytest.fixture
def app(runs: Counter[str]) -> Iterator[App]:
    settings = Settings(broker="memory://", backend="memory://", partitions=2,
                        commit_interval_s=0.0, delay_tiers="10ms,50ms")
    application = App("replay", settings=settings)

    @application.task(name="step")
    def step(tag: str, x: int) -> int:
        runs[tag] += 1
        return x + 1

    @application.task(name="flaky", max_retries=3, backoff="fixed", backoff_s=0.01)
    def flaky(key: str) -> str:
        runs[key] += 1
        if runs[key] % 3:  # fails twice per run
            raise ConnectionError("try again")
        return key

    @application.task(name="total")
    def total(values: list[int]) -> int:
        runs["total"] += 1
        return sum(values)

    @application.task(name="note")
    def note(value: int) -> None:
        runs["note"] += 1

    yield application
    application.close()


def records(app: App) -> list[Record]:
    return app.broker.records(app.settings.topic("default"))  # type: ignore[attr-defined]


def test_a_replayed_chain_runs_each_step_once_more_under_new_ids(
    app: App, runs: Counter[str]
) -> None:
    step = app.tasks["step"]
    # Given a three-step chain that ran (three records: A by the client, B and C by workers)
    first = chain(step.s("A", 1), step.s("B").on_success(app.tasks["note"].s()),
                  step.s("C")).apply_async()
    app.drain()
    assert first.get(timeout=1) == 4 and runs == {"A": 1, "B": 1, "C": 1, "note": 1}
    originals = {r.headers["st-id"].decode() for r in records(app)}
    assert len(originals) == 4
    # When the whole topic is replayed
    listed: list[ReplayItem] = []
    report = replay(app, "default", since_ms=0, listing=listed.append)
    app.drain()
    # Then only A was sent, and each step ran exactly once more, callback included
    assert (report.read, report.matched, report.sent, report.derived) == (4, 1, 1, 3)
    assert [item.name for item in listed] == ["step"]
    assert runs == {"A": 2, "B": 2, "C": 2, "note": 2}
    # under ids of their own: the original run's rows are untouched
    replayed = {r.headers["st-id"].decode() for r in records(app)} - originals
    assert len(replayed) == 4
    for task_id in originals:
        meta = app.backend.fetch(task_id)
        assert meta is not None and meta.state == "SUCCESS"
    last = [app.backend.fetch(i) for i in replayed]
    assert sorted(m.result for m in last if m is not None and m.name == "step") == [2, 3, 4]


def test_a_task_retried_twice_runs_once_more(app: App, runs: Counter[str]) -> None:
    # Given a task that failed twice and then succeeded (three records of one id)
    app.tasks["flaky"].delay("k")
    app.drain(timeout_s=10)
    assert runs["k"] == 3
    attempts = [r.headers["st-attempt"] for r in records(app)]
    assert sorted(attempts) == [b"1", b"2", b"3"]
    # When replayed, Then it is sent once and runs one more time (three calls, as before)
    report = replay(app, "default", since_ms=0)
    app.drain(timeout_s=10)
    assert (report.matched, report.derived, report.sent) == (1, 2, 1)
    assert runs["k"] == 6


def test_include_derived_replays_every_record(app: App, runs: Counter[str]) -> None:
    step = app.tasks["step"]
    chain(step.s("A", 1), step.s("B")).apply_async()
    app.drain()
    report = replay(app, "default", since_ms=0, include_derived=True, dry_run=True)
    assert (report.matched, report.derived, report.sent) == (2, 0, 0)
    assert report.by_name == {"step": 2}


def test_a_record_sent_twice_is_replayed_once(app: App, runs: Counter[str]) -> None:
    app.tasks["step"].delay("A", 1)
    app.flush()
    (record,) = records(app)
    app.broker.send(record.topic, record.value or b"", key=record.key,  # a producer retry
                    headers=record.headers, partition=record.partition)
    report = replay(app, "default", since_ms=0)
    assert (report.read, report.matched, report.repeated) == (2, 1, 1)


def test_a_replayed_chord_meets_again_under_a_new_group(app: App, runs: Counter[str]) -> None:
    step, total = app.tasks["step"], app.tasks["total"]
    first = chord([step.s(f"m{i}", i) for i in range(3)], total.s()).apply_async()
    app.drain()
    assert first.get(timeout=1) == 6 and runs["total"] == 1
    report = replay(app, "default", since_ms=0)
    app.drain()
    assert (report.matched, report.derived) == (3, 1)  # the members; the body is derived
    assert runs["total"] == 2 and all(runs[f"m{i}"] == 2 for i in range(3))
    bodies = [r for r in records(app) if r.headers["st-name"] == b"total"]
    assert len({r.headers["st-id"] for r in bodies}) == 2


def test_renaming_leaves_arguments_and_options_alone() -> None:
    node = {"kind": "task", "id": "t1", "args": [{"id": "user-data"}], "kwargs": {"id": "k"},
            "options": {"queue": "q"}, "link": [{"kind": "task", "id": "t2", "origin": "o1",
                                                 "args": []}]}
    join = {"kind": "join", "group": "g1", "body": node}
    out = renamed_ids([join], lambda old: f"new-{old}")
    assert out[0]["group"] == "new-g1" and out[0]["body"]["id"] == "new-t1"
    assert out[0]["body"]["args"] == [{"id": "user-data"}]
    assert out[0]["body"]["kwargs"] == {"id": "k"}
    assert out[0]["body"]["link"][0]["id"] == "new-t2"
    assert out[0]["body"]["link"][0]["origin"] == "new-o1"
    assert join["group"] == "g1"  # a copy: the original is unchanged


def test_children_sent_from_a_task_are_derived(app: App, runs: Counter[str]) -> None:
    step = app.tasks["step"]

    @app.task(name="parent")
    def parent() -> None:
        runs["parent"] += 1
        step.delay("child", 1)

    parent.delay()
    app.drain()
    assert runs == {"parent": 1, "child": 1}
    report = replay(app, "default", since_ms=0)
    app.drain()
    assert (report.matched, report.derived) == (1, 1)
    assert runs == {"parent": 2, "child": 2}


def test_a_range_holding_an_earlier_replays_copies_replays_each_task_once(
    app: App, runs: Counter[str]
) -> None:
    step, flaky = app.tasks["step"], app.tasks["flaky"]
    step.delay("a", 1)
    chain(step.s("b", 1), step.s("c")).delay()
    flaky.delay("f")
    app.drain()
    first = replay(app, "default", since_ms=0)
    app.drain()
    assert runs == {"a": 2, "b": 2, "c": 2, "f": 6}
    # the range now holds the originals and the first replay's copies
    second = replay(app, "default", since_ms=0)
    app.drain()
    assert (first.matched, second.matched, second.repeated) == (3, 3, 3)
    assert runs == {"a": 3, "b": 3, "c": 3, "f": 9}


def test_a_range_holding_only_a_replays_copies_replays_them(
    app: App, runs: Counter[str]
) -> None:
    step = app.tasks["step"]
    step.delay("a", 1)
    app.drain()
    replay(app, "default", since_ms=0)
    app.drain()
    (copy,) = [r for r in records(app) if "st-replay-of" in r.headers]
    replay(app, "default", from_offsets={copy.partition: copy.offset},
           to_offsets={copy.partition: copy.offset})
    app.drain()
    assert runs["a"] == 3
    # a copy of the copy names the first original
    (original,) = [r for r in records(app) if "st-replay-of" not in r.headers]
    copies = [r for r in records(app) if "st-replay-of" in r.headers]
    assert len(copies) == 2
    assert {r.headers["st-replay-of"] for r in copies} == {original.headers["st-id"]}


def test_a_chord_cut_by_the_range_is_reported_with_its_missing_members(
    app: App, runs: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    step, total = app.tasks["step"], app.tasks["total"]
    # Given a chord of four whose members (ids derived from a fixed id, so fixed
    # partitions) are spread over both partitions
    chord([step.s(f"m{i}", i) for i in range(4)], total.s()).apply_async(task_id="body")
    app.drain()
    assert runs["total"] == 1
    members = [r for r in records(app) if r.headers["st-name"] == b"step"]
    on_first = [r for r in members if r.partition == 0]
    assert 0 < len(on_first) < 4  # the premise: a one-partition range cuts the chord
    group_id = app.codec.decode_task(members[0].value or b"").group_id
    assert group_id is not None
    # When one partition is replayed (dry, then for real)
    last = max(r.offset for r in on_first)
    dry = replay(app, "default", from_offsets={0: 0}, to_offsets={0: last}, dry_run=True)
    report = replay(app, "default", from_offsets={0: 0}, to_offsets={0: last})
    app.drain()
    # Then both say which chord will not fire, and it did not
    assert dry.partial_chords == report.partial_chords == {group_id: (len(on_first), 4)}
    assert runs["total"] == 1
    assert "chords only partly in the range" in capsys.readouterr().err
    # and a range holding every member reports none
    assert replay(app, "default", since_ms=0, dry_run=True).partial_chords == {}


def test_an_undecodable_record_in_the_range_is_counted_and_the_rest_replayed(
    app: App, runs: Counter[str]
) -> None:
    step = app.tasks["step"]
    step.apply_async(("a", 1), key="k")
    app.flush()
    topic = app.settings.topic("default")
    (first,) = records(app)
    app.broker.send(topic, b"not avro", key=first.key,  # a poison record, same partition
                    headers={"st-name": b"step", "st-attempt": b"1"},
                    partition=first.partition)
    step.apply_async(("b", 1), key="k")
    app.drain()  # the worker dead-letters the poison record and goes on
    assert runs == {"a": 1, "b": 1}
    report = replay(app, "default", since_ms=0)
    app.drain()
    assert (report.read, report.matched, report.skipped, report.sent) == (3, 2, 1, 2)
    assert runs == {"a": 2, "b": 2}
