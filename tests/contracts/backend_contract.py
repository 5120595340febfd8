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
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streamtasks import states
from streamtasks.backend.base import ResultBackend, TaskMeta
from streamtasks.codec.base import Codec
from streamtasks.errors import ResultTimeout
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
