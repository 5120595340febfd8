"""The compiled reader decodes exactly what fastavro decodes, and leaves the rest to it."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtasks import App
from streamtasks.codec import AvroCodec
from streamtasks.codec._reader import compile_reader
from streamtasks.codec.avro import HEADER_SIZE, _SchemaFamily
from streamtasks.errors import DecodeError
from streamtasks.message import TaskMessage
from streamtasks.worker.deadletter import ERROR_MESSAGE, ERROR_TYPE, REASON
from tests.test_codec import (
    INT64_MAX,
    INT64_MIN,
    REPO_SCHEMAS,
    _write_v0,
    assert_same,
    task_messages,
    values,
)

TASK_FIELDS = tuple(TaskMessage.__dataclass_fields__)


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def _fastavro_only(codec: AvroCodec) -> AvroCodec:
    """``codec`` with its compiled readers removed: every body is read by fastavro."""
    for family in (codec._tasks, codec._values):
        family._read_body = dict.fromkeys(family._read_body)
    return codec


@pytest.fixture(scope="module")
def reference() -> AvroCodec:
    return _fastavro_only(AvroCodec())


def _compiled(family: _SchemaFamily[Any], data: bytes) -> Any:
    """Decode ``data`` with the compiled reader alone (it must take the whole body)."""
    read_body = family._read_body[data[:HEADER_SIZE]]
    assert read_body is not None
    decoded, end = read_body(data, HEADER_SIZE)
    assert end == len(data)
    return decoded


def assert_same_message(got: TaskMessage, want: TaskMessage) -> None:
    for name in TASK_FIELDS:
        assert_same(getattr(got, name), getattr(want, name), name)


def _outcome(codec: AvroCodec, data: bytes) -> tuple[str, Any]:
    try:
        return "message", codec.decode_task(data)
    except DecodeError as err:  # any other exception fails the test
        # fastavro names the stream it read ("cannot read long from <_io.BytesIO object
        # at 0x7f...>"): the same message but for the object's address.
        return "error", re.sub(r" at 0x[0-9a-f]+>", " at 0x...>", str(err))


def assert_same_outcome(data: bytes, codec: AvroCodec, reference: AvroCodec) -> None:
    got, want = _outcome(codec, data), _outcome(reference, data)
    assert got[0] == want[0], (got, want)
    if got[0] == "message":
        assert_same_message(got[1], want[1])
    else:
        assert got[1] == want[1]


def _body(codec: AvroCodec, record: dict[str, Any]) -> bytes:
    """Header + body of a task ``record`` given as fastavro data (tuples for records)."""
    buf = io.BytesIO()
    buf.write(codec._tasks.header)
    fastavro.schemaless_writer(buf, codec._tasks.current.parsed, record)
    return buf.getvalue()


def _record(**fields: Any) -> dict[str, Any]:
    base = {"id": "t", "name": "n", "queue": "q", "args": [], "kwargs": {}, "attempt": 1,
            "created_ms": 1, "eta_ms": None, "expires_ms": None, "key": None,
            "parent_id": None, "root_id": None, "group_id": None, "group_index": None,
            "group_size": None, "link": [], "link_error": [], "chain": [], "options": {},
            "traceparent": None}
    return {**base, **fields}


# --- what our writer produces, the compiled reader reads as fastavro does -------------


def test_every_schema_version_has_a_compiled_reader(codec: AvroCodec) -> None:
    # A schema change the compiler does not follow would send every message back to
    # fastavro: ~5 us more per task taken in.
    for family in (codec._tasks, codec._values):
        assert family._read_body
        assert all(read is not None for read in family._read_body.values())


@settings(max_examples=300, deadline=None)
@given(msg=task_messages, value=values)
def test_any_task_message_or_value_reads_as_fastavro_reads_it(
    codec: AvroCodec, reference: AvroCodec, msg: TaskMessage, value: Any
) -> None:
    data, value_data = codec.encode_task(msg), codec.encode_value(value)

    want, want_value = reference.decode_task(data), reference.decode_value(value_data)

    assert_same_message(_compiled(codec._tasks, data), want)
    assert_same_message(codec.decode_task(data), want)
    assert_same(_compiled(codec._values, value_data), want_value)
    assert_same(codec.decode_value(value_data), want_value)


EDGES = [INT64_MIN, INT64_MAX, INT64_MIN - 1, INT64_MAX + 1, -(2**200), 2**200, -65, -64, 63,
         64, 0, -1, True, False, 1.5, float("nan"), float("-inf"), -0.0, "", "é€𝄞\x00",
         "x" * 64, "ü" * 5000, b"", b"\x00\xff" * 100, None, [], {}, [[]], [1, "a", None],
         [INT64_MIN, INT64_MAX], [0.5, -0.0], ["", "é"], {"": {"n": [b"x"]}},
         datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999), Decimal("-0.000"),
         Decimal("NaN")]


@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_edge_values_read_as_fastavro_reads_them(
    codec: AvroCodec, reference: AvroCodec, value: Any
) -> None:
    msg = TaskMessage(id="t", name="n", queue="q", args=[value], kwargs={"k": value},
                      link=[{"args": [value]}], chain=[{}, {"v": value}])
    data = codec.encode_task(msg)

    assert_same_message(_compiled(codec._tasks, data), reference.decode_task(data))
    assert_same(_compiled(codec._values, codec.encode_value(value)), value)


@pytest.mark.parametrize("filled", [False, True])
def test_every_optional_field_null_or_set(
    codec: AvroCodec, reference: AvroCodec, filled: bool
) -> None:
    some: dict[str, Any] = {
        "eta_ms": INT64_MAX, "expires_ms": INT64_MIN, "key": "ключ", "parent_id": "p" * 70,
        "root_id": "", "group_id": "g", "group_index": 0, "group_size": -1,
        "traceparent": f"00-{'a' * 32}-{'b' * 16}-01",
    }
    msg = TaskMessage(id="t", name="n", queue="q", attempt=INT64_MIN, created_ms=INT64_MAX,
                      options={"retries": "3", "é": ""}, **(some if filled else {}))
    data = codec.encode_task(msg)

    got = _compiled(codec._tasks, data)

    assert_same_message(got, reference.decode_task(data))
    assert_same_message(got, msg)


def test_large_arguments_read_as_fastavro_reads_them(
    codec: AvroCodec, reference: AvroCodec
) -> None:
    msg = TaskMessage(id="t", name="n", queue="q",
                      args=[list(range(-50_000, 50_000)), [x / 7 for x in range(10_000)],
                            ["s" * i for i in range(300)], *range(200)],
                      kwargs={f"k{i}": {"i": i} for i in range(300)})
    data = codec.encode_task(msg)

    got = _compiled(codec._tasks, data)

    assert_same_message(got, reference.decode_task(data))
    assert_same_message(got, msg)


def test_decoded_messages_share_no_mutable_field(codec: AvroCodec) -> None:
    data = codec.encode_task(TaskMessage(id="t", name="n", queue="q"))
    first, second = codec.decode_task(data), codec.decode_task(data)

    first.args.append(1)
    first.options["x"] = "y"
    first.link.append({})

    assert (second.args, second.options, second.link) == ([], {}, [])


# --- bytes the compiled reader does not take: fastavro decides, as before ---------------


@settings(max_examples=300, deadline=None)
@given(msg=task_messages, cut=st.integers(min_value=0, max_value=10_000))
def test_a_truncated_message_fails_as_before(
    codec: AvroCodec, reference: AvroCodec, msg: TaskMessage, cut: int
) -> None:
    data = codec.encode_task(msg)

    assert_same_outcome(data[: cut % len(data)], codec, reference)


@settings(max_examples=500, deadline=None)
@given(msg=task_messages, at=st.integers(min_value=0), byte=st.integers(0, 255),
       extra=st.binary(max_size=3))
def test_a_corrupt_message_fails_or_reads_as_before(
    codec: AvroCodec, reference: AvroCodec, msg: TaskMessage, at: int, byte: int, extra: bytes
) -> None:
    data = bytearray(codec.encode_task(msg))
    at = HEADER_SIZE + at % (len(data) - HEADER_SIZE)
    data[at] = byte
    data[at:at] = extra

    assert_same_outcome(bytes(data), codec, reference)


@pytest.mark.parametrize("datum", [
    ("streamtasks.Timestamp", {"epoch_us": 2**62, "utc_offset_s": None}),
    ("streamtasks.Timestamp", {"epoch_us": 0, "utc_offset_s": 2**31 - 1}),
    ("streamtasks.Date", {"epoch_days": -(2**31)}),
    ("streamtasks.Duration", {"days": 2**31 - 1, "seconds": 0, "microseconds": 0}),
    ("streamtasks.Decimal", {"text": "not a number"}),
])
def test_a_value_out_of_range_is_a_decode_error(
    codec: AvroCodec, reference: AvroCodec, datum: Any
) -> None:
    # These escaped decode_task as OverflowError / decimal.InvalidOperation before: a
    # worker must see a DecodeError (dead letter, reason decode-error), nothing else.
    data = _body(codec, _record(args=[datum]))

    with pytest.raises(DecodeError, match="task message has an invalid value"):
        codec.decode_task(data)
    assert_same_outcome(data, codec, reference)


@pytest.mark.parametrize("record", [
    _record(args=[("streamtasks.ValueList", {"items": [True, 2]})]),
    _record(kwargs={"k": ("streamtasks.DoubleArray", {"items": [0.5] * 3})}),
])
def test_blocks_with_their_byte_size_read_as_fastavro_reads_them(
    codec: AvroCodec, reference: AvroCodec, record: dict[str, Any]
) -> None:
    # Other Avro writers may write a block as (-count, byte size, items): valid Avro,
    # left to fastavro. Rewrite our one block of the array / map that way.
    data = _body(codec, record)
    marker = b"\x02" if record["args"] else b"\x02\x02k"  # args: 1 item; kwargs: 1 entry
    start = data.index(marker, HEADER_SIZE + 6)
    rewritten = data[:start] + b"\x01" + bytes([2 * (len(data) - start - 3)]) + data[start + 1:]

    assert codec.decode_task(rewritten).args == reference.decode_task(rewritten).args
    assert_same_outcome(rewritten, codec, reference)


def test_a_negative_union_branch_is_left_to_fastavro(
    codec: AvroCodec, reference: AvroCodec
) -> None:
    # fastavro takes branch -1 as the last one (a Python list index): whatever it does
    # with it, the codec does the same.
    data = _body(codec, _record(key="k"))
    data = data.replace(b"\x02\x02k", b"\x01\x02k", 1)

    assert_same_outcome(data, codec, reference)


def test_a_memoryview_or_bytearray_decodes_too(codec: AvroCodec) -> None:
    msg = TaskMessage(id="t", name="n", queue="q", args=[1])
    data = codec.encode_task(msg)

    for view in (memoryview(data), bytearray(data)):
        assert_same_message(codec.decode_task(view), codec.decode_task(data))


# --- other writer schemas -----------------------------------------------------------------


def _codecs(tmp_path: Path, change: Any) -> tuple[AvroCodec, AvroCodec]:
    """(a producer knowing only an older task-v0, a consumer knowing v0 and v1)."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for directory in (old_dir, new_dir):
        directory.mkdir()
        _write_v0(directory)
        schema = json.loads((directory / "task-v0.avsc").read_text())
        change(schema)
        (directory / "task-v0.avsc").write_text(json.dumps(schema))
        shutil.copy(REPO_SCHEMAS / "value-v1.avsc", directory)
    shutil.copy(REPO_SCHEMAS / "task-v1.avsc", new_dir)
    return AvroCodec(schema_dir=old_dir), AvroCodec(schema_dir=new_dir)


def _unchanged(schema: dict[str, Any]) -> None:
    pass


def _extra_field(schema: dict[str, Any]) -> None:
    schema["fields"].insert(2, {"name": "legacy", "type": ["null", "string"], "default": None})


@pytest.mark.parametrize("change", [_unchanged, _extra_field])
def test_an_older_writer_schema_is_read_by_a_compiled_reader(
    tmp_path: Path, change: Any
) -> None:
    # v0: attempt an int, no group position, no trace context (and maybe a field v1
    # dropped); the pair (v0, v1) compiles: promoted, defaulted, skipped.
    old, new = _codecs(tmp_path, change)
    msg = TaskMessage(id="t1", name="add", queue="q", args=[[1, 2], {"k": Decimal("1.50")}],
                      attempt=3, key="k", options={"o": "p"})
    data = old.encode_task(msg)

    got = _compiled(new._tasks, data)

    assert_same_message(got, _fastavro_only(new).decode_task(data))
    assert (got.attempt, got.key, got.args, got.options) == (3, "k", msg.args, msg.options)
    assert (got.group_index, got.group_size, got.traceparent) == (None, None, None)


def test_an_older_writer_schema_the_compiler_does_not_resolve_is_read_by_fastavro(
    tmp_path: Path,
) -> None:
    def key_as_bytes(schema: dict[str, Any]) -> None:  # bytes -> string: fastavro resolves
        for field in schema["fields"]:
            if field["name"] == "key":
                field["type"] = ["null", "bytes"]

    old, new = _codecs(tmp_path, key_as_bytes)
    old._tasks._write_body = None  # the writer would refuse a str key for bytes
    record = _record(key=b"k")
    del record["group_index"], record["group_size"], record["traceparent"]
    buf = io.BytesIO()
    buf.write(old._tasks.header)
    fastavro.schemaless_writer(buf, old._tasks.current.parsed, record)
    data = buf.getvalue()

    assert new._tasks._read_body[data[:HEADER_SIZE]] is None
    assert new.decode_task(data).key == "k"


def test_a_reader_field_without_default_missing_from_the_writer_is_not_compiled() -> None:
    writer = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}]})
    reader = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "b", "type": "long"}]})
    defaulted = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "b", "type": "long", "default": 7}]})

    assert compile_reader(writer, reader, lambda a, b: (a, b), ("a", "b")) is None
    read = compile_reader(writer, defaulted, lambda b, a: (a, b), ("b", "a"))
    assert read is not None
    assert read(b"\x04", 0) == ((2, 7), 1)


# --- the worker: a record fastavro refuses is dead-lettered with the reason ----------------


def test_a_malformed_record_is_dead_lettered_with_the_reason(app: App) -> None:
    @app.task(name="one")
    def one() -> int:
        return 1

    app.ensure_queue("default")
    codec = app.codec
    assert isinstance(codec, AvroCodec)
    truncated = codec.encode_task(TaskMessage(id="t1", name="one", queue="default"))[:-4]
    out_of_range = _body(codec, _record(name="one", args=[(
        "streamtasks.Duration", {"days": 2**31 - 1, "seconds": 0, "microseconds": 0})]))
    for value in (truncated, out_of_range):
        app.broker.send("streamtasks.default", value, key=b"k")
    good = one.delay()

    app.drain()

    assert good.get(timeout=1) == 1
    dead = app.broker.records("streamtasks.default.dlq")  # type: ignore[attr-defined]
    assert [r.value for r in dead] == [truncated, out_of_range]
    assert [r.headers[REASON] for r in dead] == [b"decode-error"] * 2
    assert [r.headers[ERROR_TYPE] for r in dead] == [b"DecodeError"] * 2
    assert dead[0].headers[ERROR_MESSAGE].startswith(
        b"task message body does not parse with schema task-v1")
    assert dead[1].headers[ERROR_MESSAGE].startswith(
        b"task message has an invalid value: OverflowError")
