"""Dead-letter tools and replay on the memory broker (the Kafka path: integration/)."""

from __future__ import annotations

import json
import sys
import time
import types
from collections.abc import Iterator

import pytest

from streamtasks import App, Settings
from streamtasks.broker.base import Record, TopicPartition
from streamtasks.cli import main
from streamtasks.errors import UnknownTaskError
from streamtasks.headers import ATTEMPT, TASK_ID
from streamtasks.message import TaskMessage, now_ms
from streamtasks.ops import (
    REPLAY_OF,
    RangeError,
    list_dead_letters,
    purge,
    replay,
    requeue,
)
from streamtasks.worker.deadletter import ORIGINAL_OFFSET, dead_letter_headers

MEM = ["--broker", "memory://", "--backend", "memory://"]


@pytest.fixture
def app() -> Iterator[App]:
    settings = Settings(broker="memory://", backend="memory://", partitions=3,
                        commit_interval_s=0.0)
    application = App("ops", settings=settings)

    @application.task(name="a")
    def a(x: int) -> int:
        return x

    @application.task(name="b")
    def b(x: int) -> int:
        return x

    yield application
    application.close()


def topic_records(app: App, queue: str) -> list[Record]:
    return app.broker.records(app.settings.topic(queue))  # type: ignore[attr-defined]


def dead_letter_unknown_names(app: App, count: int) -> list[str]:
    """Send tasks no worker knows and drain: the worker dead-letters every one."""
    ids = [app.send("nobody.knows", args=[i], queue="q").id for i in range(count)]
    app.drain(["q"])
    return ids


def put_dead_letter(app: App, msg: TaskMessage, reason: str, value: bytes | None = None) -> None:
    """Produce a dead letter straight to the DLQ, as the worker would."""
    app.ensure_queue(msg.queue)
    source = Record(app.settings.topic(msg.queue), 1, 7, msg.id.encode(),
                    value if value is not None else app.codec.encode_task(msg),
                    {TASK_ID: msg.id.encode(), "st-name": msg.name.encode(),
                     ATTEMPT: str(msg.attempt).encode()}, now_ms())
    headers = dead_letter_headers(source, reason, UnknownTaskError("boom"), "g")
    app.broker.send(app.settings.dlq_topic(msg.queue), source.value or b"", key=source.key,
                    headers=headers, partition=1)


# -- broker additions ------------------------------------------------------------


def test_memory_read_and_delete_records_move_the_low_watermark(app: App) -> None:
    for i in range(5):
        app.broker.send("t", str(i).encode(), partition=0)
    tp = TopicPartition("t", 0)
    assert [r.offset for r in app.broker.read(tp, 1, 4)] == [1, 2, 3]
    assert [r.offset for r in app.broker.read(tp, 3, 100)] == [3, 4]
    app.broker.delete_records({tp: 3})
    assert app.broker.watermarks(tp) == (3, 5)
    assert [r.value for r in app.broker.read(tp, 0, 5)] == [b"3", b"4"]
    assert app.broker.offsets_for_times("t", 0)[tp] == 3
    assert app.broker.topic_exists("t") and not app.broker.topic_exists("nope")


# -- dead letters ----------------------------------------------------------------


def test_list_shows_dead_letters_from_their_headers(app: App) -> None:
    ids = dead_letter_unknown_names(app, 4)
    letters = list_dead_letters(app, "q", limit=10)
    assert sorted(d.task_id or "" for d in letters) == sorted(ids)
    first = letters[0]
    assert first.task_name == "nobody.knows" and first.reason == "unknown-task"
    assert first.error is not None and first.error.startswith("UnknownTaskError: ")
    assert first.dead_at_ms is not None and first.original_offset is not None
    assert len(list_dead_letters(app, "q", limit=2)) == 2


def test_list_works_on_undecodable_values(app: App) -> None:
    msg = TaskMessage(id="bad-1", name="a", queue="q")
    put_dead_letter(app, msg, "decode-error", value=b"\x00 not avro")
    (letter,) = list_dead_letters(app, "q")
    assert (letter.task_id, letter.reason) == ("bad-1", "decode-error")


def test_requeue_by_id_resends_that_task_with_attempt_1_and_the_same_id(app: App) -> None:
    put_dead_letter(app, TaskMessage(id="t-1", name="a", queue="q", args=[1], attempt=4),
                    "retries-exhausted")
    put_dead_letter(app, TaskMessage(id="t-2", name="a", queue="q", args=[2], attempt=4),
                    "retries-exhausted")
    assert requeue(app, "q", task_id="t-1") == 1
    (sent,) = topic_records(app, "q")
    msg = app.codec.decode_task(sent.value or b"")
    assert (msg.id, msg.attempt, msg.args) == ("t-1", 1, [1])
    assert sent.headers[ATTEMPT] == b"1" and sent.key == b"t-1" and sent.partition == 1
    # the first origin travels along, so a second dead-lettering keeps it
    assert sent.headers[ORIGINAL_OFFSET] == b"7"
    assert requeue(app, "q", task_id="no-such-id") == 0


def test_requeue_all_filters_by_reason_and_skips_undecodable(app: App) -> None:
    for i in range(3):
        put_dead_letter(app, TaskMessage(id=f"u-{i}", name="a", queue="q"), "unknown-task")
    put_dead_letter(app, TaskMessage(id="x", name="a", queue="q"), "bad-arguments")
    put_dead_letter(app, TaskMessage(id="junk", name="a", queue="q"), "unknown-task",
                    value=b"junk")
    skipped: list[str] = []
    seen: list[tuple[int, int]] = []
    count = requeue(app, "q", all_=True, reason="unknown-task",
                    on_skip=lambda letter, _why: skipped.append(letter.task_id or ""),
                    progress=lambda done, total: seen.append((done, total)))
    assert count == 3 and skipped == ["junk"]
    assert seen[-1] == (5, 5)
    ids = sorted(app.codec.decode_task(r.value or b"").id for r in topic_records(app, "q"))
    assert ids == ["u-0", "u-1", "u-2"]
    assert requeue(app, "q", all_=True) == 4  # every decodable one, the reason not asked
    with pytest.raises(ValueError, match="exactly one"):
        requeue(app, "q", task_id="x", all_=True)


def test_requeued_tasks_run(app: App) -> None:
    put_dead_letter(app, TaskMessage(id="r-1", name="a", queue="q", args=[5]), "unknown-task")
    requeue(app, "q", all_=True)
    app.drain(["q"])
    assert app.result("r-1").get(timeout=5) == 5


def test_purge_empties_the_dead_letter_topic(app: App) -> None:
    dead_letter_unknown_names(app, 6)
    assert purge(app, "q") == 6
    assert list_dead_letters(app, "q") == []
    assert requeue(app, "q", all_=True) == 0
    assert purge(app, "q") == 0


# -- replay ----------------------------------------------------------------------


def send_batch(app: App, count: int, name: str = "a", key: str | None = None) -> list[str]:
    ids = [app.send(name, args=[i], queue="q", key=key).id for i in range(count)]
    app.flush()
    return ids


def test_replay_by_offsets_sends_new_ids_pointing_at_the_originals(app: App) -> None:
    originals = send_batch(app, 10, key="k")  # one key: one partition, offsets 0..9
    (partition,) = {r.partition for r in topic_records(app, "q")}
    report = replay(app, "q", from_offsets={partition: 2}, to_offsets={partition: 6},
                    into="again")
    assert (report.read, report.matched, report.sent) == (5, 5, 5)
    sent = topic_records(app, "again")
    msgs = [app.codec.decode_task(r.value or b"") for r in sent]
    assert [m.options["replay_of"] for m in msgs] == originals[2:7]
    assert [r.headers[REPLAY_OF].decode() for r in sent] == originals[2:7]
    assert not {m.id for m in msgs} & set(originals)
    assert all(m.queue == "again" and r.key == b"k" for m, r in zip(msgs, sent, strict=True))


def test_replay_by_time_with_a_name_filter_counts_exactly(app: App) -> None:
    send_batch(app, 20)
    time.sleep(0.01)
    since = now_ms()
    time.sleep(0.005)
    send_batch(app, 7, name="a")
    send_batch(app, 5, name="b")
    time.sleep(0.005)
    until = now_ms()
    time.sleep(0.01)
    send_batch(app, 9)
    report = replay(app, "q", since_ms=since, until_ms=until, name="a", into="w")
    assert (report.read, report.matched, report.sent) == (12, 7, 7)
    assert len(topic_records(app, "w")) == 7
    everything = replay(app, "q", since_ms=since, into="w2", dry_run=True)
    assert (everything.read, everything.matched, everything.sent) == (21, 21, 0)


def test_replay_dry_run_sends_nothing_and_same_ids_keeps_them(app: App) -> None:
    ids = send_batch(app, 4, key="k")
    (p,) = {r.partition for r in topic_records(app, "q")}
    dry = replay(app, "q", from_offsets={p: 0}, to_offsets={p: 3}, dry_run=True)
    assert (dry.read, dry.matched, dry.sent) == (4, 4, 0)
    assert len(topic_records(app, "q")) == 4
    replay(app, "q", from_offsets={p: 0}, to_offsets={p: 3}, same_ids=True)
    again = [app.codec.decode_task(r.value or b"").id for r in topic_records(app, "q")[4:]]
    assert again == ids


def test_replay_into_the_same_queue_reads_only_the_range_it_started_with(app: App) -> None:
    send_batch(app, 3, key="k")
    report = replay(app, "q", since_ms=0)
    assert (report.read, report.sent) == (3, 3)
    assert len(topic_records(app, "q")) == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "not both"),
        ({"since_ms": 5, "from_offsets": {0: 0}, "to_offsets": {0: 1}}, "not both"),
        ({"since_ms": 10, "until_ms": 10}, "must be before"),
        ({"from_offsets": {0: 5}, "to_offsets": {0: 1}}, "not after the to offset"),
        ({"from_offsets": {0: 0}, "to_offsets": {1: 1}}, "same partitions"),
        ({"from_offsets": {9: 0}, "to_offsets": {9: 1}}, "partitions 0..2"),
    ],
)
def test_replay_refuses_bad_ranges(app: App, kwargs: dict, message: str) -> None:
    send_batch(app, 1)
    with pytest.raises(RangeError, match=message):
        replay(app, "q", **kwargs)


# -- CLI -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "list", "--queue", "nowhere"],
         "queue nowhere has no topic streamtasks.nowhere.dlq; "
         "create it with streamtasks topics create --queue nowhere"),
        (["dlq", "purge", "--queue", "nowhere"], "has no topic streamtasks.nowhere.dlq"),
        (["dlq", "requeue", "--queue", "nowhere", "--all"], "has no topic"),
        (["dlq", "requeue", "--queue", "q"], "one of the arguments --id --all is required"),
        (["dlq", "requeue", "--queue", "q", "--id", "x", "--all"], "not allowed with"),
        (["replay", "--queue", "nowhere", "--since", "-1h"],
         "queue nowhere has no topic streamtasks.nowhere;"),
        (["replay", "--queue", "q", "--since", "yesterday"], "expected an ISO-8601 time"),
        (["replay", "--queue", "q", "--since", "2026-01-02", "--until", "2026-01-01"],
         "--since must be before --until"),
        (["replay", "--queue", "q", "--from-offset", "0:9", "--to-offset", "0:3"],
         "--from-offset (0:9) is after --to-offset (0:3)"),
        (["replay", "--queue", "q", "--from-offset", "0:1", "--to-offset", "1:3"],
         "must name the same partition"),
        (["replay", "--queue", "q", "--from-offset", "zero", "--to-offset", "0:3"],
         "expected PARTITION:OFFSET"),
        (["replay", "--queue", "q", "--from-offset", "0:1"], "needs both --from-offset"),
        (["replay", "--queue", "q", "--since", "-1h", "--to-offset", "0:1"], "not both"),
        (["replay", "--queue", "q"], "give a range"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(capsys, argv, message) -> None:
    code, _, err = run(capsys, *argv, *MEM)
    assert code == 2
    assert message in err


@pytest.fixture
def cli_app(app: App, monkeypatch: pytest.MonkeyPatch) -> str:
    """Let the CLI use the test's memory app through ``--app module:attribute``."""
    module = types.ModuleType("ops_cli_app")
    module.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ops_cli_app", module)
    return "ops_cli_app:app"


def test_cli_dlq_list_requeue_purge(capsys, app: App, cli_app: str) -> None:
    ids = dead_letter_unknown_names(app, 3)
    code, out, _ = run(capsys, "dlq", "list", "--queue", "q", "--app", cli_app)
    header, *lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert header.split("\t") == ["TASK_ID", "NAME", "REASON", "ERROR", "DEAD_AT"]
    fields = lines[0].split("\t")
    assert fields[0] in ids and fields[1:3] == ["nobody.knows", "unknown-task"]
    assert fields[3].startswith("UnknownTaskError:") and fields[4].endswith("+00:00")
    code, out, err = run(capsys, "dlq", "requeue", "--queue", "q", "--id", ids[1],
                         "--app", cli_app)
    assert code == 0 and out.strip() == "requeued 1" and "requeue: 3/3 records read" in err
    code, _, err = run(capsys, "dlq", "requeue", "--queue", "q", "--id", "nope",
                       "--app", cli_app)
    assert code == 3 and "no dead letter with id nope" in err
    code, out, _ = run(capsys, "dlq", "purge", "--queue", "q", "--app", cli_app)
    assert code == 0 and out.strip() == "purged 3 dead letter(s) from streamtasks.q.dlq"


def test_cli_dlq_list_json_and_reason_filter(capsys, app: App, cli_app: str) -> None:
    ids = dead_letter_unknown_names(app, 3)
    code, out, _ = run(capsys, "dlq", "list", "--queue", "q", "--json", "--app", cli_app)
    letters = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted(d["task_id"] for d in letters) == sorted(ids)
    assert {d["reason"] for d in letters} == {"unknown-task"}
    assert all(d["dead_at"].endswith("Z") for d in letters)
    code, out, _ = run(capsys, "dlq", "list", "--queue", "q", "--reason", "unknown-task",
                       "--limit", "2", "--json", "--app", cli_app)
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run(capsys, "dlq", "list", "--queue", "q", "--reason", "decode-error",
                       "--app", cli_app)
    assert code == 0 and out.splitlines() == ["TASK_ID\tNAME\tREASON\tERROR\tDEAD_AT"]


def test_cli_replay_prints_counts(capsys, app: App, cli_app: str) -> None:
    send_batch(app, 5, key="k")
    (p,) = {r.partition for r in topic_records(app, "q")}
    code, out, err = run(capsys, "replay", "--queue", "q", "--from-offset", f"{p}:1",
                         "--to-offset", f"{p}:3", "--into", "z", "--app", cli_app)
    assert code == 0 and out.strip() == "read 3, matched 3, sent 3"
    assert "replay: 3/3 records read" in err
    code, out, _ = run(capsys, "replay", "--queue", "q", "--since", "-1h", "--name", "b",
                       "--dry-run", "--app", cli_app)
    assert code == 0 and out.strip() == "read 5, matched 0, would send 0"
    ids = [r.headers["st-id"].decode() for r in topic_records(app, "q")[:5]]
    code, out, _ = run(capsys, "replay", "--queue", "q", "--from-offset", f"{p}:0",
                       "--to-offset", f"{p}:4", "--dry-run", "--app", cli_app)
    lines = out.splitlines()
    assert code == 0 and lines[:5] == [f"{p}:{o}\t{ids[o]}\ta" for o in range(5)]
    assert lines[5:] == ["       5  a", "read 5, matched 5, would send 5"]


def test_cli_replay_names_a_chord_the_range_cuts(capsys, app: App, cli_app: str) -> None:
    from streamtasks import chord

    a, b = app.tasks["a"], app.tasks["b"]
    chord([a.s(i) for i in range(4)], b.s()).apply_async(task_id="cut", confirm=True)
    members = topic_records(app, "default")
    by_partition = {r.partition: [m for m in members if m.partition == r.partition]
                    for r in members}
    p, on_p = next((p, rs) for p, rs in sorted(by_partition.items()) if len(rs) < 4)
    group = app.codec.decode_task(on_p[0].value or b"").group_id
    code, out, err = run(capsys, "replay", "--queue", "default", "--from-offset", f"{p}:0",
                         "--to-offset", f"{p}:{len(on_p) - 1}", "--dry-run", "--app", cli_app)
    assert code == 0 and out.splitlines()[-1].startswith(f"read {len(on_p)}, ")
    assert "1 chord(s) only partly in the range" in err
    assert f"  group {group}: {len(on_p)} of 4 members" in err


def test_cli_replay_reads_a_naive_since_as_utc_in_any_zone(
    capsys, app: App, cli_app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    send_batch(app, 5)
    # A naive UTC time a minute ago; read as New York time it would be hours ahead.
    since = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        code, out, _ = run(capsys, "replay", "--queue", "q", "--since", since, "--dry-run",
                           "--app", cli_app)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert code == 0 and out.splitlines()[-1] == "read 5, matched 5, would send 5"


# -- groups migrate: old per-queue-set groups to per-queue groups --------------------


class _Listener:
    def on_assign(self, partitions: list[TopicPartition]) -> None: ...
    def on_revoke(self, partitions: list[TopicPartition]) -> None: ...
    def on_lost(self, partitions: list[TopicPartition]) -> None: ...
    def on_commit(self, committed, failed, error) -> None: ...


def old_groups(app: App) -> tuple[str, str]:
    """Queues a and b served by one worker of an older version: its two groups' offsets."""
    topology = app.settings.topology
    for queue in ("a", "b", "c"):
        app.ensure_queue(queue)
    worker_group, delayer_group = topology.legacy_group_ids(["b", "a"])
    assert (worker_group, delayer_group) == ("streamtasks.a+b", "streamtasks.a+b.delayer")
    app.broker.set_group_offsets(worker_group, {
        TopicPartition("streamtasks.a", 0): 10, TopicPartition("streamtasks.a", 1): 11,
        TopicPartition("streamtasks.b", 2): 12,
        TopicPartition("streamtasks.c", 0): 99,  # another queue: left alone
        TopicPartition("streamtasks.a.dlq", 0): 5,  # no group reads a DLQ: left alone
    })
    tier = topology.tier_topics("a")[0]
    app.broker.set_group_offsets(delayer_group, {TopicPartition(tier, 1): 7})
    return worker_group, delayer_group


def test_migrate_copies_each_queues_offsets_to_its_own_group(app: App) -> None:
    from streamtasks.ops import migrate_group

    worker_group, delayer_group = old_groups(app)
    app.broker.set_group_offsets("streamtasks.a", {TopicPartition("streamtasks.a", 1): 3})
    report = migrate_group(app, worker_group, ["a", "b"])
    broker = app.broker
    assert broker.group_offsets("streamtasks.a") == {
        TopicPartition("streamtasks.a", 0): 10,
        TopicPartition("streamtasks.a", 1): 3,  # the new group's own offset is kept
    }
    assert broker.group_offsets("streamtasks.b") == {TopicPartition("streamtasks.b", 2): 12}
    assert broker.group_offsets("streamtasks.c") == {}
    assert len(report.copied) == 2 and len(report.offsets) == 3
    assert set(report.ignored) == {"streamtasks.c", "streamtasks.a.dlq"}
    assert broker.group_offsets(worker_group)[TopicPartition("streamtasks.a", 0)] == 10

    report = migrate_group(app, delayer_group, ["a", "b"])
    tier = app.settings.topology.tier_topics("a")[0]
    assert broker.group_offsets("streamtasks.a.delayer") == {TopicPartition(tier, 1): 7}
    assert [c.to_group for c in report.copied] == ["streamtasks.a.delayer"]


def test_migrate_dry_run_writes_nothing(app: App) -> None:
    from streamtasks.ops import migrate_group

    worker_group, _ = old_groups(app)
    report = migrate_group(app, worker_group, ["a", "b"], dry_run=True)
    assert len(report.copied) == 3
    assert app.broker.group_offsets("streamtasks.a") == {}
    assert app.broker.group_offsets("streamtasks.b") == {}


def test_migrate_refuses_a_new_group_with_members_and_copies_nothing(app: App) -> None:
    from streamtasks.ops import GroupBusyError, migrate_group

    worker_group, _ = old_groups(app)
    member = app.broker.consumer("streamtasks.b", ["streamtasks.b"], _Listener())
    try:
        with pytest.raises(GroupBusyError, match=r"streamtasks.b \(1 member\(s\)\).*stop"):
            migrate_group(app, worker_group, ["a", "b"])
    finally:
        member.close()
    assert app.broker.group_offsets("streamtasks.a") == {}  # not even the idle group


def test_cli_groups_migrate(capsys, app: App, cli_app: str) -> None:
    worker_group, _ = old_groups(app)
    argv = ["groups", "migrate", "--from-group", worker_group, "--queues", "a,b",
            "--app", cli_app]
    code, out, err = run(capsys, *argv, "--dry-run")
    assert code == 0
    assert "would copy streamtasks.a[0] offset 10 -> streamtasks.a" in out
    assert out.splitlines()[-1] == f"would copy 3 offset(s), kept 0 from {worker_group}"
    assert "ignored streamtasks.c: no group of these queues reads it" in err
    assert app.broker.group_offsets("streamtasks.a") == {}

    code, out, _ = run(capsys, *argv)
    assert code == 0 and "copied streamtasks.b[2] offset 12 -> streamtasks.b" in out
    code, out, _ = run(capsys, *argv)  # again: every new group has its own offset now
    assert code == 0 and out.splitlines()[-1] == f"copied 0 offset(s), kept 3 from {worker_group}"
    assert "kept streamtasks.a[0] offset 10 in streamtasks.a" in out

    member = app.broker.consumer("streamtasks.a", ["streamtasks.a"], _Listener())
    code, _, err = run(capsys, *argv)
    member.close()
    assert code == 1 and "GroupBusyError" in err and "streamtasks.a (1 member(s))" in err

    code, _, err = run(capsys, "groups", "migrate", "--from-group", "nobody", "--queues", "a",
                       "--app", cli_app)
    assert code == 3 and "nobody has no committed offset" in err
    assert "note: nobody is not the old group of queues a" in err
