"""The Avro bodies written by the compiled writer are fastavro's, byte for byte."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtasks.codec import AvroCodec
from streamtasks.codec import avro as avro_module
from streamtasks.codec._binary import NotCovered, compile_record
from streamtasks.errors import EncodeError
from streamtasks.message import TaskMessage
from tests.test_codec import INT64_MAX, INT64_MIN, task_messages, values


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


@pytest.fixture(scope="module")
def reference() -> AvroCodec:
    """The codec with every body written by fastavro (the compiled writers removed)."""
    plain = AvroCodec()
    plain._tasks._write_body = None
    plain._values._write_body = None
    return plain


def test_both_schema_families_compile(codec: AvroCodec) -> None:
    # A schema change the compiler does not follow would silently fall back to
    # fastavro for every message: ~5 us more per send.
    assert codec._tasks._write_body is not None
    assert codec._values._write_body is not None


@settings(max_examples=300, deadline=None)
@given(msg=task_messages)
def test_any_task_message_encodes_as_fastavro_writes_it(
    codec: AvroCodec, reference: AvroCodec, msg: TaskMessage
) -> None:
    assert codec.encode_task(msg) == reference.encode_task(msg)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_any_value_encodes_as_fastavro_writes_it(
    codec: AvroCodec, reference: AvroCodec, value: Any
) -> None:
    assert codec.encode_value(value) == reference.encode_value(value)


@pytest.mark.parametrize(
    "value",
    [INT64_MIN, INT64_MAX, -65, -64, 63, 64, 0, -1, 2**63, -(2**63) - 1, True, False, 1.5,
     float("nan"), float("-inf"), -0.0, "", "é€𝄞", b"", b"\x00\xff", None,
     [1, "a", None, [True, 2.0]], {"k": {"n": [b"x"]}}],
)
def test_edge_values_encode_as_fastavro_writes_them(
    codec: AvroCodec, reference: AvroCodec, value: Any
) -> None:
    assert codec.encode_value(value) == reference.encode_value(value)


def test_a_plain_message_is_written_without_fastavro(
    codec: AvroCodec, reference: AvroCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = TaskMessage(id="t-1", name="add", queue="q", args=[1, "two", 3.0, None, True],
                      kwargs={"b": b"raw"}, key="k", eta_ms=1_700_000_000_000,
                      options={"max_retries": "3"}, traceparent=f"00-{'1' * 32}-{'2' * 16}-01")
    want = reference.encode_task(msg)

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("fastavro wrote the whole record")

    monkeypatch.setattr(avro_module.fastavro, "schemaless_writer", refuse)

    assert codec.encode_task(msg) == want


def test_a_value_the_writer_leaves_to_fastavro_still_encodes(
    codec: AvroCodec, reference: AvroCodec
) -> None:
    # A lone surrogate is not UTF-8: the compiled writer defers, fastavro decides.
    record = {"value": "\ud800"}
    with pytest.raises(NotCovered):
        codec._values._write_body(record)  # type: ignore[misc]
    outcomes = []
    for which in (codec, reference):
        try:
            outcomes.append(("bytes", which._values.frame(record)))
        except Exception as err:  # the same outcome either way is the point
            outcomes.append(("error", type(err)))
    assert outcomes[0] == outcomes[1]


def test_a_record_missing_a_field_is_left_to_fastavro(codec: AvroCodec) -> None:
    write = codec._tasks._write_body
    assert write is not None
    with pytest.raises(NotCovered):
        write({"id": "t"})


def _fastavro_body(parsed: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def test_a_union_listing_double_before_long_leaves_ints_to_fastavro() -> None:
    parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "x", "type": ["null", "double", "long"]}]})
    write = compile_record(parsed)
    assert write is not None

    assert write({"x": 2.5}) == _fastavro_body(parsed, {"x": 2.5})
    assert write({"x": None}) == _fastavro_body(parsed, {"x": None})
    with pytest.raises(NotCovered):
        write({"x": 2})  # fastavro writes it as the double 2.0


@pytest.mark.parametrize("field_type", [
    "int", "float", {"type": "enum", "name": "E", "symbols": ["A"]},
    {"type": "fixed", "name": "F", "size": 2}, {"type": "long", "logicalType": "timestamp-millis"},
    ["null", "int"],
])
def test_a_schema_with_other_types_compiles_to_no_writer(field_type: Any) -> None:
    parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "x", "type": field_type}]})

    assert compile_record(parsed) is None


@settings(max_examples=200, deadline=None)
@given(record=st.fixed_dictionaries({
    "s": st.text(), "b": st.binary(), "f": st.booleans(), "d": st.floats(),
    "n": st.none() | st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    "a": st.lists(st.none() | st.text(max_size=3) | st.booleans(), max_size=5),
    "m": st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=5),
}))
def test_every_compiled_type_writes_fastavro_bytes(record: dict[str, Any]) -> None:
    parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "s", "type": "string"}, {"name": "b", "type": "bytes"},
        {"name": "f", "type": "boolean"}, {"name": "d", "type": "double"},
        {"name": "n", "type": ["null", "long"]},
        {"name": "a", "type": {"type": "array", "items": ["null", "string", "boolean"]}},
        {"name": "m", "type": {"type": "map", "values": "long"}},
    ]})
    write = compile_record(parsed)
    assert write is not None

    assert write(record) == _fastavro_body(parsed, record)


scalar_garbage = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                  | st.floats(allow_nan=False) | st.text(max_size=5) | st.binary(max_size=3))


@settings(max_examples=300, deadline=None)
@given(fields=st.fixed_dictionaries({}, optional={
    name: scalar_garbage for name in (
        "id", "name", "queue", "attempt", "created_ms", "eta_ms", "expires_ms", "key",
        "parent_id", "root_id", "group_id", "group_index", "group_size", "traceparent")
}), options=st.dictionaries(st.text(max_size=3) | st.integers(), scalar_garbage, max_size=2))
def test_a_field_of_a_wrong_type_is_refused_as_before(
    codec: AvroCodec, reference: AvroCodec, fields: dict[str, Any], options: dict[Any, Any]
) -> None:
    # The reference checks every field before fastavro writes; the compiled writer only
    # when it leaves a message to fastavro: the outcome must be the same.
    msg = TaskMessage(**{"id": "t", "name": "n", "queue": "q", **fields}, options=options)
    outcomes = []
    for which in (codec, reference):
        try:
            outcomes.append(which.encode_task(msg))
        except EncodeError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]
