"""The contract every ResultBackend must pass (memory in unit tests, Cassandra in integration).

A subclass provides the ``backend`` fixture::

    class TestMemoryBackend(BackendContract):
        @pytest.fixture
        def backend(self) -> Iterator[ResultBackend]:
            yield MemoryBackend(make_codec())
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from streamtasks import states
from streamtasks.backend.base import (
    GROUP_FAILED,
    GROUP_FIRED,
    GROUP_SHARD_SIZE,
    GroupClaim,
    ResultBackend,
    TaskMeta,
)
from streamtasks.codec.base import Codec
from streamtasks.errors import BackendError, EncodeError, ResultTimeout
from streamtasks.message import TaskMessage, now_ms

MINUTE_MS = 60_000


class JsonStandInCodec(Codec):
    """A pickle-free stand-in for value encoding while AvroCodec is unavailable."""

    def encode_task(self, msg: TaskMessage) -> bytes:
        raise NotImplementedError

    def decode_task(self, data: bytes) -> TaskMessage:
        raise NotImplementedError

    def encode_value(self, value: Any) -> bytes:
        return json.dumps(_tag(value)).encode()

    def decode_value(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_untag)


def _tag(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _tag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    return value


def _untag(obj: dict[str, Any]) -> Any:
    if set(obj) == {"$b64"}:
        return base64.b64decode(obj["$b64"])
    return obj


def make_codec() -> Codec:
    """AvroCodec when the codec package is there, else the JSON stand-in."""
    try:
        from streamtasks.codec.avro import AvroCodec
    except ImportError:
        return JsonStandInCodec()
    return AvroCodec()


def json_text(value: Any) -> str:
    """The library's JSON text form when available, else plain json.dumps."""
    try:
        from streamtasks.codec.jsontext import to_json_text
    except ImportError:
        return json.dumps(_tag(value))
    return to_json_text(value)


def exact_result() -> dict[str, Any]:
    """A result whose types JSON would lose: nested lists, a big int, bytes."""
    return {
        "items": [1, [2, "drei", None], {"deep": [True, 1.5]}],
        "big": 2**80 + 7,
        "negative": -(2**70),
        "raw": b"\x00\xffbytes",
        "text": "grüße ✓",
        "empty": {},
    }


def full_meta(task_id: str, queue: str, state: str = states.SUCCESS, at_ms: int = 0) -> TaskMeta:
    at_ms = at_ms or now_ms()
    return TaskMeta(
        task_id=task_id,
        state=state,
        name="tests.add",
        queue=queue,
        result=exact_result(),
        error_type="ValueError",
        error_message="bad value",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad value\n",
        attempts=3,
        worker="worker-1@host",
        created_ms=at_ms - 2_000,
        started_ms=at_ms - 1_000,
        finished_ms=at_ms,
        parent_id="parent-" + task_id,
        root_id="root-" + task_id,
        group_id="group-" + task_id,
        group_index=4,
        extra={"k": "v", "trace": "abc"},
    )


def new_id() -> str:
    return str(uuid.uuid4())


class BackendContract:
    """Behaviour every backend shares; subclasses override the ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> Iterator[ResultBackend]:
        raise NotImplementedError("a backend contract subclass must provide `backend`")

    @pytest.fixture
    def queue(self) -> str:
        return "q" + uuid.uuid4().hex[:12]

    def store(self, backend: ResultBackend, meta: TaskMeta) -> None:
        assert backend.store(meta).result(timeout=30) is None

    # ------------------------------------------------------------------ rows

    def test_store_then_fetch_returns_equal_meta(self, backend: ResultBackend, queue: str) -> None:
        meta = full_meta(new_id(), queue)
        self.store(backend, meta)
        got = backend.fetch(meta.task_id)
        assert got == meta
        assert got is not None
        assert type(got.result["big"]) is int
        assert type(got.result["raw"]) is bytes
        assert type(got.result["items"][1]) is list

    def test_minimal_meta_round_trips(self, backend: ResultBackend) -> None:
        meta = TaskMeta(task_id=new_id(), state=states.PENDING)
        self.store(backend, meta)
        assert backend.fetch(meta.task_id) == meta

    @pytest.mark.parametrize("result", [0, "", [], 2**63, -1.25, "x" * 10_000])
    def test_scalar_results_round_trip(self, backend: ResultBackend, result: Any) -> None:
        meta = TaskMeta(task_id=new_id(), state=states.SUCCESS, result=result)
        self.store(backend, meta)
        got = backend.fetch(meta.task_id)
        assert got is not None
        assert got.result == result
        assert type(got.result) is type(result)

    def test_store_is_idempotent_last_write_wins(
        self, backend: ResultBackend, queue: str
    ) -> None:
        task_id = new_id()
        at = now_ms()
        first = full_meta(task_id, queue, at_ms=at)
        self.store(backend, first)
        self.store(backend, first)
        assert backend.fetch(task_id) == first
        window = backend.list_tasks(queue, states.SUCCESS, at - MINUTE_MS, at + MINUTE_MS)
        assert [m.task_id for m in window] == [task_id]

        second = TaskMeta(
            task_id=task_id, state=states.SUCCESS, name="tests.add", queue=queue,
            result={"only": "this"}, attempts=4, created_ms=at - 2_000, finished_ms=at,
        )
        self.store(backend, second)
        assert backend.fetch(task_id) == second  # fields set before are gone, not merged
        window = backend.list_tasks(queue, states.SUCCESS, at - MINUTE_MS, at + MINUTE_MS)
        assert window == [second]

    def test_fetch_unknown_is_none(self, backend: ResultBackend) -> None:
        assert backend.fetch(new_id()) is None

    def test_many_concurrent_stores(self, backend: ResultBackend, queue: str) -> None:
        metas = [
            TaskMeta(task_id=new_id(), state=states.SUCCESS, queue=queue, result=i,
                     finished_ms=now_ms())
            for i in range(300)
        ]
        futures = [backend.store(m) for m in metas]
        for future in futures:
            assert future.result(timeout=60) is None
        for meta in metas[::37]:
            assert backend.fetch(meta.task_id) == meta

    def test_store_many_writes_every_row_and_lists_each_once(
        self, backend: ResultBackend, queue: str
    ) -> None:
        # Given 120 rows over two states and up to two hours (several listing partitions)
        base = now_ms() - 50 * MINUTE_MS
        metas = [
            full_meta(new_id(), queue, states.SUCCESS if i % 3 else states.FAILURE,
                      at_ms=base + (i % 3) * 20 * MINUTE_MS + i)
            for i in range(120)
        ]
        # When they are stored as one batch
        assert backend.store_many(metas).result(timeout=60) is None
        # Then each row reads back, and each is listed once under its state
        for meta in metas[::7]:
            assert backend.fetch(meta.task_id) == meta
        window = (base - MINUTE_MS, now_ms() + MINUTE_MS)
        for state in (states.SUCCESS, states.FAILURE):
            listed = [m.task_id for m in backend.list_tasks(queue, state, *window, limit=500)]
            wanted = [m.task_id for m in metas if m.state == state]
            assert sorted(listed) == sorted(wanted), (state, len(listed), len(wanted))
        assert backend.store_many([]).result(timeout=5) is None

    # ------------------------------------------------------------------ wait

    def test_wait_returns_when_a_later_store_makes_it_final(
        self, backend: ResultBackend, queue: str
    ) -> None:
        task_id = new_id()
        self.store(backend, TaskMeta(task_id=task_id, state=states.STARTED, queue=queue))
        final = TaskMeta(task_id=task_id, state=states.SUCCESS, queue=queue, result=[1, 2])

        def finish() -> None:
            time.sleep(0.3)
            backend.store(final).result(timeout=30)

        thread = threading.Thread(target=finish)
        thread.start()
        try:
            started = time.monotonic()
            got = backend.wait(task_id, timeout_s=20)
            assert got == final
            assert time.monotonic() - started < 10
        finally:
            thread.join()

    def test_wait_times_out_when_not_final(self, backend: ResultBackend, queue: str) -> None:
        task_id = new_id()
        self.store(backend, TaskMeta(task_id=task_id, state=states.RETRY, queue=queue))
        started = time.monotonic()
        with pytest.raises(ResultTimeout, match="RETRY"):
            backend.wait(task_id, timeout_s=0.4)
        assert 0.35 < time.monotonic() - started < 5

    def test_wait_unknown_task_times_out(self, backend: ResultBackend) -> None:
        with pytest.raises(ResultTimeout, match="unknown"):
            backend.wait(new_id(), timeout_s=0.2)

    # ------------------------------------------------------------------ listing

    def test_list_tasks_returns_exactly_the_window(
        self, backend: ResultBackend, queue: str
    ) -> None:
        base = now_ms() - 30 * MINUTE_MS
        since, until = base - 45 * MINUTE_MS, base + 5 * MINUTE_MS
        offsets = {"too-old": -50, "first-in": -45, "mid": -10, "last-in": 4, "too-new": 5}
        ids = {label: f"{label}-{new_id()}" for label in offsets}
        for label, minutes in offsets.items():
            at = base + minutes * MINUTE_MS
            if label == "last-in":
                at = until - 1
            self.store(backend, full_meta(ids[label], queue, at_ms=at))
        # same window, other state / other queue: never listed
        self.store(backend, full_meta(new_id(), queue, states.FAILURE, at_ms=base))
        self.store(backend, full_meta(new_id(), queue + "x", at_ms=base))

        listed = backend.list_tasks(queue, states.SUCCESS, since, until)
        assert [m.task_id for m in listed] == [ids["last-in"], ids["mid"], ids["first-in"]]
        assert listed[1] == full_meta(ids["mid"], queue, at_ms=base - 10 * MINUTE_MS)

        limited = backend.list_tasks(queue, states.SUCCESS, since, until, limit=2)
        assert [m.task_id for m in limited] == [ids["last-in"], ids["mid"]]
        assert backend.list_tasks(queue, states.SUCCESS, since, until, limit=0) == []
        assert backend.list_tasks(queue, states.SUCCESS, until, since) == []
        failed = backend.list_tasks(queue, states.FAILURE, since, until)
        assert [m.state for m in failed] == [states.FAILURE]

    def test_list_tasks_follows_state_changes(self, backend: ResultBackend, queue: str) -> None:
        task_id = new_id()
        at = now_ms()
        started = TaskMeta(task_id=task_id, state=states.STARTED, queue=queue, started_ms=at)
        self.store(backend, started)
        window = (at - MINUTE_MS, at + MINUTE_MS)
        assert backend.list_tasks(queue, states.STARTED, *window) == [started]

        done = TaskMeta(task_id=task_id, state=states.SUCCESS, queue=queue, started_ms=at,
                        finished_ms=at + 5, result="ok")
        self.store(backend, done)
        assert backend.list_tasks(queue, states.STARTED, *window) == []
        assert backend.list_tasks(queue, states.SUCCESS, *window) == [done]

    def test_list_tasks_orders_ties_by_task_id(self, backend: ResultBackend, queue: str) -> None:
        at = now_ms()
        ids = sorted(new_id() for _ in range(5))
        for task_id in reversed(ids):
            self.store(backend, TaskMeta(task_id=task_id, state=states.FAILURE, queue=queue,
                                         finished_ms=at))
        listed = backend.list_tasks(queue, states.FAILURE, at - 1, at + 1)
        assert [m.task_id for m in listed] == ids

    def test_list_tasks_merges_many_entries_newest_first(
        self, backend: ResultBackend, queue: str
    ) -> None:
        # Given 200 tasks a second apart (their listing entries spread over partitions),
        # every third of which has since moved on to FAILURE
        base = now_ms() - 10 * MINUTE_MS
        ids = [f"{i:03d}-{new_id()}" for i in range(200)]
        for i, task_id in enumerate(ids):
            self.store(backend, TaskMeta(task_id=task_id, state=states.SUCCESS, queue=queue,
                                         finished_ms=base + i * 1000))
        for task_id in ids[::3]:
            self.store(backend, TaskMeta(task_id=task_id, state=states.FAILURE, queue=queue,
                                         finished_ms=base + 300_000))
        # When the 100 newest SUCCESS tasks are listed
        listed = backend.list_tasks(queue, states.SUCCESS, base, base + 250_000, limit=100)
        # Then they come newest first, without the ones that moved on
        still = [task_id for i, task_id in enumerate(ids) if i % 3]
        assert [m.task_id for m in listed] == list(reversed(still))[:100]

    # ------------------------------------------------------------------ fetch_many

    def test_fetch_many_keeps_order_and_gives_none_for_unknown(
        self, backend: ResultBackend, queue: str
    ) -> None:
        metas = [full_meta(new_id(), queue) for _ in range(3)]
        for meta in metas:
            self.store(backend, meta)
        ids = [metas[2].task_id, new_id(), metas[0].task_id, metas[1].task_id, metas[2].task_id]
        assert backend.fetch_many(ids) == [metas[2], None, metas[0], metas[1], metas[2]]
        assert backend.fetch_many([]) == []

    def test_fetch_many_of_more_rows_than_one_read_window(
        self, backend: ResultBackend, queue: str
    ) -> None:
        metas = [TaskMeta(task_id=new_id(), state=states.SUCCESS, queue=queue, result=i)
                 for i in range(600)]
        for future in [backend.store(meta) for meta in metas]:
            assert future.result(timeout=60) is None
        ids = [meta.task_id for meta in reversed(metas)]
        ids.insert(300, new_id())
        expected: list[TaskMeta | None] = list(reversed(metas))
        expected.insert(300, None)
        assert backend.fetch_many(ids) == expected

    # ------------------------------------------------------------------ groups

    def join(self, backend: ResultBackend, group_id: str, index: int, size: int,
             result: Any = None) -> bool:
        complete = backend.join_group(group_id, index, size, result).result(timeout=30)
        assert type(complete) is bool
        return complete

    def claim(self, backend: ResultBackend, group_id: str, claimer: str,
              outcome: str = GROUP_FIRED, reason: str | None = None) -> bool:
        """Claim; True when ``claimer`` holds the decision for ``outcome``."""
        return self.claim_row(backend, group_id, claimer, outcome, reason).held_by(
            claimer, outcome
        )

    def claim_row(self, backend: ResultBackend, group_id: str, claimer: str,
                  outcome: str = GROUP_FIRED, reason: str | None = None) -> GroupClaim:
        claim = backend.claim_group(group_id, claimer, outcome, reason).result(timeout=30)
        assert type(claim) is GroupClaim
        return claim

    @pytest.mark.parametrize("size", [1, 2 * GROUP_SHARD_SIZE + 2])
    def test_group_is_complete_only_when_the_last_member_joins(
        self, backend: ResultBackend, size: int
    ) -> None:
        group_id = new_id()
        order = list(range(size))
        random.Random(size).shuffle(order)
        seen = [self.join(backend, group_id, index, size, index) for index in order]
        assert seen == [False] * (size - 1) + [True]
        assert backend.group_results(group_id, size).result(timeout=30) == list(range(size))

    def test_joining_again_is_idempotent(self, backend: ResultBackend) -> None:
        group_id = new_id()
        size = GROUP_SHARD_SIZE + 6  # two shards, the second one partial
        last = size - 1
        for index in range(last):
            assert not self.join(backend, group_id, index, size, f"first {index}")
        # Given all members but the last joined, when some join again (in both shards),
        # then the group is still incomplete
        assert not self.join(backend, group_id, 0, size, "again 0")
        assert not self.join(backend, group_id, last - 1, size, f"first {last - 1}")
        assert self.join(backend, group_id, last, size, f"first {last}")
        # a member that joins again after completion still sees the group complete
        assert self.join(backend, group_id, 3, size, "again 3")
        assert self.join(backend, group_id, last, size, f"first {last}")
        results = backend.group_results(group_id, size).result(timeout=30)
        assert results[0] == "again 0" and results[3] == "again 3"  # the last write wins
        assert results[1:3] == ["first 1", "first 2"]
        assert results[4:] == [f"first {i}" for i in range(4, size)]

    def test_group_results_in_member_order_with_exact_types(
        self, backend: ResultBackend
    ) -> None:
        group_id = new_id()
        size = GROUP_SHARD_SIZE + 3
        results: list[Any] = [{"member": i, **exact_result()} for i in range(size)]
        results[1] = None
        results[2] = 2**63
        results[GROUP_SHARD_SIZE] = b"\x00raw"
        for index in reversed(range(size)):
            self.join(backend, group_id, index, size, results[index])
        got = backend.group_results(group_id, size).result(timeout=30)
        assert got == results
        assert got[1] is None
        assert type(got[2]) is int
        assert type(got[GROUP_SHARD_SIZE]) is bytes
        for value in (got[0], got[-1]):
            assert type(value["big"]) is int
            assert type(value["raw"]) is bytes
            assert type(value["items"][1]) is list

    def test_group_results_name_the_missing_members(self, backend: ResultBackend) -> None:
        group_id = new_id()
        size = GROUP_SHARD_SIZE + 6
        missing = (3, GROUP_SHARD_SIZE + 2)
        for index in range(size):
            if index not in missing:
                assert not self.join(backend, group_id, index, size, index)
        with pytest.raises(BackendError, match=rf"{group_id}.* 3, {GROUP_SHARD_SIZE + 2} of"):
            backend.group_results(group_id, size).result(timeout=30)
        with pytest.raises(BackendError, match=r"member\(s\) 0, 1 of 2"):
            backend.group_results(new_id(), 2).result(timeout=30)

    def test_join_refuses_an_index_outside_the_group(self, backend: ResultBackend) -> None:
        group_id = new_id()
        for index, size in ((2, 2), (-1, 2), (0, 0)):
            with pytest.raises(ValueError, match="index"):
                backend.join_group(group_id, index, size, None)
        assert self.join(backend, group_id, 0, 1, "ok")  # nothing was written before

    def test_join_with_an_unencodable_result_writes_nothing(
        self, backend: ResultBackend
    ) -> None:
        group_id = new_id()
        with pytest.raises(EncodeError):
            backend.join_group(group_id, 0, 1, object())
        with pytest.raises(BackendError, match=group_id):
            backend.group_results(group_id, 1).result(timeout=30)

    def test_claim_group_is_won_once(self, backend: ResultBackend) -> None:
        group_id = new_id()
        assert backend.group_claim(group_id) is None
        before = now_ms()
        won = self.claim_row(backend, group_id, "record-a", GROUP_FIRED)
        assert (won.claimer, won.outcome, won.settled, won.reason) == (
            "record-a", GROUP_FIRED, False, None)
        assert won.held_by("record-a", GROUP_FIRED)
        assert not self.claim(backend, group_id, "record-b", GROUP_FIRED)
        assert not self.claim(backend, group_id, "record-b", GROUP_FAILED)
        # the same record delivered again holds its claim again
        assert self.claim(backend, group_id, "record-a", GROUP_FIRED)
        claim = backend.group_claim(group_id)
        assert claim is not None
        assert (claim.claimer, claim.outcome) == ("record-a", GROUP_FIRED)
        assert claim.claimed_ms is not None
        assert before - MINUTE_MS <= claim.claimed_ms <= now_ms() + MINUTE_MS
        assert claim == won
        assert backend.group_claim(new_id()) is None

    @pytest.mark.parametrize(
        ("first", "then"), [(GROUP_FIRED, GROUP_FAILED), (GROUP_FAILED, GROUP_FIRED)]
    )
    def test_a_claim_of_the_other_outcome_returns_the_first(
        self, backend: ResultBackend, first: str, then: str
    ) -> None:
        group_id = new_id()
        reason = "ValueError: member 3 failed" if first == GROUP_FAILED else None
        won = self.claim_row(backend, group_id, "record-a", first, reason)
        # Given a decided group, when another claimer claims the other outcome,
        # then it gets the first claim back, which it does not hold
        got = self.claim_row(backend, group_id, "record-b", then, "other reason")
        assert got == won
        assert (got.claimer, got.outcome, got.reason) == ("record-a", first, reason)
        assert not got.held_by("record-b", then)
        # and the first claimer asking for the other outcome does not win it either
        again = self.claim_row(backend, group_id, "record-a", then, "other reason")
        assert again == won
        assert again.held_by("record-a", first)
        assert not again.held_by("record-a", then)
        assert backend.group_claim(group_id) == won

    def test_the_reason_of_a_failed_claim_round_trips(self, backend: ResultBackend) -> None:
        group_id = new_id()
        reason = "KeyError: 'x' — member 7 of chord grüße ✓\n" + "x" * 5000
        claim = self.claim_row(backend, group_id, "record-a", GROUP_FAILED, reason)
        assert claim.reason == reason
        stored = backend.group_claim(group_id)
        assert stored is not None
        assert (stored.outcome, stored.reason) == (GROUP_FAILED, reason)

    def test_settle_group_marks_the_claim_settled(self, backend: ResultBackend) -> None:
        group_id = new_id()
        won = self.claim_row(backend, group_id, "record-a", GROUP_FAILED, "boom")
        assert backend.settle_group(group_id).result(timeout=30) is None
        settled = backend.group_claim(group_id)
        assert settled is not None
        assert settled.settled
        assert settled == GroupClaim("record-a", GROUP_FAILED, won.claimed_ms, True, "boom")
        # idempotent, and a later claim (of any claimer) returns the settled row
        assert backend.settle_group(group_id).result(timeout=30) is None
        assert backend.group_claim(group_id) == settled
        assert self.claim_row(backend, group_id, "record-a", GROUP_FAILED) == settled
        assert self.claim_row(backend, group_id, "record-b", GROUP_FIRED) == settled

    def test_settle_group_without_a_claim_fails(self, backend: ResultBackend) -> None:
        group_id = new_id()
        with pytest.raises(BackendError, match=rf"{group_id}.*claim_group first"):
            backend.settle_group(group_id).result(timeout=30)
        assert backend.group_claim(group_id) is None

    def test_concurrent_joins_complete_the_group_and_one_claimer_wins(
        self, backend: ResultBackend
    ) -> None:
        group_id = new_id()
        size, workers = 200, 8
        start = threading.Barrier(workers)

        def run_members(worker: int) -> dict[int, bool]:
            """Join this worker's members; claim for each that saw the group complete."""
            start.wait(timeout=30)
            claims = {}
            for index in range(worker, size, workers):
                if self.join(backend, group_id, index, size, index):
                    claims[index] = self.claim(backend, group_id, f"member-{index}")
            return claims

        with ThreadPoolExecutor(workers) as pool:
            outcomes = [f.result(timeout=60)
                        for f in [pool.submit(run_members, w) for w in range(workers)]]
        claims = {index: won for outcome in outcomes for index, won in outcome.items()}
        assert claims, "no member saw the group complete"
        winners = [index for index, won in claims.items() if won]
        assert len(winners) == 1, claims
        claim = backend.group_claim(group_id)
        assert claim is not None
        assert claim.claimer == f"member-{winners[0]}"
        assert backend.group_results(group_id, size).result(timeout=30) == list(range(size))

    # ------------------------------------------------------------------ progress

    def progress(self, backend: ResultBackend, task_id: str, state: str, attempt: int,
                 queue: str = "q") -> None:
        assert backend.mark_progress(task_id, state, attempt, "tests.add", queue,
                                     "w1").result(timeout=30) is None

    def test_progress_alone_reads_as_its_state(self, backend: ResultBackend) -> None:
        task_id = new_id()
        self.progress(backend, task_id, states.PENDING, 0)
        got = backend.fetch(task_id)
        assert got is not None and got.state == states.PENDING and got.name == "tests.add"
        self.progress(backend, task_id, states.RECEIVED, 1)
        self.progress(backend, task_id, states.STARTED, 1)
        got = backend.fetch(task_id)
        assert got is not None and got.state == states.STARTED and got.attempts == 1
        assert got.started_ms is not None and got.worker == "w1" and not got.ready

    def test_a_late_pending_or_received_does_not_undo_started(
        self, backend: ResultBackend
    ) -> None:
        task_id = new_id()
        self.progress(backend, task_id, states.STARTED, 1)
        self.progress(backend, task_id, states.RECEIVED, 1)
        self.progress(backend, task_id, states.PENDING, 0)
        got = backend.fetch(task_id)
        assert got is not None and got.state == states.STARTED

    @pytest.mark.parametrize("final", [states.SUCCESS, states.FAILURE, states.REVOKED])
    def test_progress_landing_after_the_final_row_changes_nothing(
        self, backend: ResultBackend, queue: str, final: str
    ) -> None:
        # Given a final row, when a late STARTED lands (a timer firing as the task ended,
        # a redelivered run on another worker, even of a later attempt), then it is final
        task_id = new_id()
        self.progress(backend, task_id, states.STARTED, 3, queue)
        meta = full_meta(task_id, queue, final)
        self.store(backend, meta)
        self.progress(backend, task_id, states.STARTED, 3, queue)
        self.progress(backend, task_id, states.STARTED, 4, queue)
        got = backend.fetch(task_id)
        assert got is not None and got.state == final and got.result == meta.result
        assert got.attempts == meta.attempts
        assert backend.fetch_many([task_id])[0] == got
        at = meta.finished_ms or 0
        listed = backend.list_tasks(queue, final, at - MINUTE_MS, at + MINUTE_MS)
        assert [m.task_id for m in listed] == [task_id]

    def test_the_next_attempt_started_wins_over_a_retry_row(
        self, backend: ResultBackend, queue: str
    ) -> None:
        task_id = new_id()
        retry = TaskMeta(task_id, states.RETRY, name="tests.add", queue=queue, attempts=1,
                         finished_ms=now_ms(), error_type="ValueError")
        self.progress(backend, task_id, states.STARTED, 1, queue)
        self.store(backend, retry)
        got = backend.fetch(task_id)
        assert got is not None and got.state == states.RETRY  # attempt 1 ended in RETRY
        self.progress(backend, task_id, states.STARTED, 2, queue)
        got = backend.fetch(task_id)
        assert got is not None and got.state == states.STARTED and got.attempts == 2

    def test_progress_refuses_a_state_that_is_not_progress(self, backend: ResultBackend) -> None:
        with pytest.raises(ValueError, match="progress state must be one of"):
            backend.mark_progress(new_id(), states.SUCCESS, 1, "n", "q")

    # ------------------------------------------------------------------ forget, saved groups

    def test_forget_deletes_the_row(self, backend: ResultBackend, queue: str) -> None:
        meta = full_meta(new_id(), queue)
        self.store(backend, meta)
        other = full_meta(new_id(), queue)
        self.store(backend, other)
        backend.forget(meta.task_id).result(timeout=30)
        assert backend.fetch(meta.task_id) is None
        assert backend.fetch(other.task_id) == other
        at = meta.finished_ms or 0
        listed = backend.list_tasks(queue, states.SUCCESS, at - MINUTE_MS, at + MINUTE_MS)
        assert meta.task_id not in [m.task_id for m in listed]

    def test_a_saved_group_is_read_back_in_order(self, backend: ResultBackend) -> None:
        group_id, ids = new_id(), [new_id() for _ in range(5)]
        assert backend.fetch_group(group_id) is None
        backend.save_group(group_id, ids).result(timeout=30)
        assert backend.fetch_group(group_id) == ids
        backend.save_group(group_id, ids[:2]).result(timeout=30)  # saved again: replaced
        assert backend.fetch_group(group_id) == ids[:2]
        backend.forget_group(group_id).result(timeout=30)
        assert backend.fetch_group(group_id) is None
