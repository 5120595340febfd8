"""The Avro codec: exact round trips, schema evolution, error messages, JSON text form."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtasks.codec import AvroCodec, to_json_text
from streamtasks.codec._values import LONG_ARRAY, VALUE_LIST, to_datum
from streamtasks.codec.avro import MARKER, default_schema_dir
from streamtasks.errors import ConfigError, DecodeError, EncodeError
from streamtasks.message import TaskMessage

REPO_SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


# --- strategies -------------------------------------------------------------------------

fixed_offsets = st.builds(
    lambda seconds: timezone(timedelta(seconds=seconds)),
    st.integers(min_value=-86_399, max_value=86_399),
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN - 1, INT64_MAX + 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.datetimes(timezones=fixed_offsets)
    | st.dates()
    | st.timedeltas()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.uuids()
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=8), children, max_size=6)
        # homogeneous lists, to hit the typed-array fast paths
        | st.lists(st.integers(), max_size=6)
        | st.lists(st.floats(), max_size=6)
        | st.lists(st.text(max_size=4), max_size=6)
    ),
    max_leaves=25,
)
int64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
optional_text = st.none() | st.text(max_size=20)
task_messages = st.builds(
    TaskMessage,
    id=st.text(max_size=40),
    name=st.text(max_size=40),
    queue=st.text(max_size=20),
    args=st.lists(values, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=10), values, max_size=4),
    attempt=int64,
    created_ms=int64,
    eta_ms=st.none() | int64,
    expires_ms=st.none() | int64,
    key=optional_text,
    parent_id=optional_text,
    root_id=optional_text,
    group_id=optional_text,
    group_index=st.none() | int64,
    group_size=st.none() | int64,
    link=st.lists(st.dictionaries(st.text(max_size=8), values, max_size=3), max_size=2),
    link_error=st.lists(st.dictionaries(st.text(max_size=8), values, max_size=3), max_size=2),
    chain=st.lists(st.dictionaries(st.text(max_size=8), values, max_size=3), max_size=2),
    options=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    traceparent=optional_text,
)


def assert_same(got: Any, want: Any, path: str = "value") -> None:
    """Equal value *and* equal type, recursively; NaN equals NaN, -0.0 differs from 0.0."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), path
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want), path
    elif isinstance(want, Decimal):
        assert str(got) == str(want), path  # same digits, exponent and sign
    elif isinstance(want, datetime):
        assert got == want, path
        assert got.utcoffset() == want.utcoffset(), path
        assert (got.tzinfo is None) == (want.tzinfo is None), path
        assert got.replace(tzinfo=None) == want.replace(tzinfo=None), path  # same wall clock
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{index}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    else:
        assert got == want, path


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_any_value_round_trips_with_exact_types(codec: AvroCodec, value: Any) -> None:
    data = codec.encode_value(value)

    assert data[:2] == MARKER
    assert_same(codec.decode_value(data), value)


@settings(max_examples=150, deadline=None)
@given(msg=task_messages)
def test_task_message_round_trips(codec: AvroCodec, msg: TaskMessage) -> None:
    back = codec.decode_task(codec.encode_task(msg))

    for name in TaskMessage.__dataclass_fields__:
        assert_same(getattr(back, name), getattr(msg, name), name)


@pytest.mark.parametrize(
    ("value", "branch"),
    [
        ([1, 2, 3], LONG_ARRAY),
        ([INT64_MIN, INT64_MAX], LONG_ARRAY),
        ([1, True], VALUE_LIST),  # a bool is not an int here
        ([1, INT64_MAX + 1], VALUE_LIST),  # out of 64 bits: BigInt items
        ([1, 2.0], VALUE_LIST),
        ([], VALUE_LIST),
    ],
)
def test_int_lists_take_the_typed_array_only_when_exact(
    codec: AvroCodec, value: list[Any], branch: str
) -> None:
    assert to_datum(value)[0] == branch
    assert_same(codec.decode_value(codec.encode_value(value)), value)


def test_homogeneous_lists_use_typed_arrays() -> None:
    assert to_datum([1.5, 2.5])[0] == "streamtasks.DoubleArray"
    assert to_datum(["a", "b"])[0] == "streamtasks.StringArray"
    assert to_datum((1, 2))[0] == LONG_ARRAY


def test_a_million_ints_are_one_long_array(codec: AvroCodec) -> None:
    numbers = list(range(-500_000, 500_000))
    msg = TaskMessage(id="t", name="sum", queue="q", args=[numbers])

    data = codec.encode_task(msg)
    back = codec.decode_task(data)

    assert back.args[0] == numbers
    assert type(back.args[0][0]) is int
    # zig-zag varints: a typed array, no per-item union index byte
    assert len(data) < 3 * len(numbers) + 200


def test_tuples_and_subclasses_decode_as_their_plain_types(codec: AvroCodec) -> None:
    class Color(Enum):
        RED = "red"

    class Level(IntEnum):
        HIGH = 3

    @dataclass
    class Point:
        x: int
        y: tuple[int, int]

    value = {
        "t": (1, "a"),
        "c": Color.RED,
        "l": Level.HIGH,
        "p": Point(1, (2, 3)),
        "b": bytearray(b"x"),
    }

    back = codec.decode_value(codec.encode_value(value))

    assert_same(back, {"t": [1, "a"], "c": "red", "l": 3, "p": {"x": 1, "y": [2, 3]}, "b": b"x"})


def test_aware_datetime_keeps_instant_and_offset(codec: AvroCodec) -> None:
    tz = timezone(timedelta(hours=-5, minutes=-30))
    value = [datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=tz), datetime(1, 1, 1, tzinfo=tz)]

    back = codec.decode_value(codec.encode_value(value))

    assert_same(back, value)
    assert back[0].tzinfo == tz


# --- decode errors ----------------------------------------------------------------------


def _sample(codec: AvroCodec) -> bytes:
    return codec.encode_task(TaskMessage(id="t1", name="add", queue="q", args=[1, 2]))


def test_short_bytes_are_refused(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError, match=r"3 bytes, shorter than the 10-byte"):
        codec.decode_task(b"abc")


def test_wrong_marker_is_named(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError, match=r"not Avro single-object encoding: marker is b'\{\"'"):
        codec.decode_task(json.dumps({"id": "t1", "name": "add"}).encode())


def test_unknown_fingerprint_is_printed_in_hex(codec: AvroCodec) -> None:
    data = MARKER + bytes.fromhex("0123456789abcdef") + _sample(codec)[10:]

    with pytest.raises(DecodeError, match=r"unknown writer schema fingerprint 0123456789abcdef"):
        codec.decode_task(data)


def test_value_bytes_are_not_a_task(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        codec.decode_task(codec.encode_value(1))


def test_truncated_body_is_refused(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError, match=r"body does not parse with schema task-v1"):
        codec.decode_task(_sample(codec)[:-3])


def test_trailing_bytes_are_refused(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError, match=r"2 trailing byte\(s\)"):
        codec.decode_task(_sample(codec) + b"\x00\x00")


@settings(deadline=None)
@given(garbage=st.binary(max_size=64))
def test_garbage_raises_decode_error_only(codec: AvroCodec, garbage: bytes) -> None:
    header = _sample(codec)[:10]
    for data in (garbage, header + garbage):
        with contextlib.suppress(DecodeError):  # any other exception fails the test
            codec.decode_task(data)


# --- encode errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (
            TaskMessage(id="t", name="f", queue="q", args=[{"x": {3: "a"}}]),
            "args[0]['x']: dict key 3 is int, only str keys are supported",
        ),
        (
            TaskMessage(id="t", name="f", queue="q", kwargs={"s": [1, {1, 2}]}),
            "kwargs['s'][1]: cannot encode set; supported: None, bool, int",
        ),
        (
            TaskMessage(id="t", name="f", queue="q", link=[{"args": [object()]}]),
            "link[0]['args'][0]: cannot encode object;",
        ),
        (
            TaskMessage(id=3, name="f", queue="q"),  # type: ignore[arg-type]
            "TaskMessage.id: expected str, got int",
        ),
        (
            TaskMessage(id="t", name="f", queue="q", attempt=2**64),
            "TaskMessage.attempt: 18446744073709551616 does not fit in 64 bits",
        ),
        (
            TaskMessage(id="t", name="f", queue="q", options={"retries": 3}),  # type: ignore[dict-item]
            "options['retries']: options map str to str",
        ),
    ],
)
def test_encode_errors_name_the_path(codec: AvroCodec, msg: TaskMessage, message: str) -> None:
    with pytest.raises(EncodeError) as caught:
        codec.encode_task(msg)

    assert str(caught.value).startswith(message)


def test_encode_value_errors_name_the_type(codec: AvroCodec) -> None:
    class Custom:
        pass

    with pytest.raises(EncodeError, match=r"^value\[0\]: cannot encode test_codec\.test_encode"):
        codec.encode_value([Custom()])


def test_a_cycle_is_an_encode_error(codec: AvroCodec) -> None:
    loop: list[Any] = [1]
    loop.append(loop)

    with pytest.raises(EncodeError, match="contains itself"):
        codec.encode_value(loop)


def test_sub_second_utc_offset_is_refused(codec: AvroCodec) -> None:
    tz = timezone(timedelta(seconds=1, microseconds=5))

    with pytest.raises(EncodeError, match=r"value: cannot encode a UTC offset"):
        codec.encode_value(datetime(2024, 1, 1, tzinfo=tz))


# --- schemas and evolution --------------------------------------------------------------


def _crc64_avro(data: bytes) -> bytes:
    """CRC-64-AVRO written from the Avro specification, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_spec_crc_matches_the_avro_test_vector() -> None:
    # share/test/data/schema-tests.txt in Apache Avro: "int" -> 8247732601305521295
    assert _crc64_avro(b'"int"') == (8247732601305521295).to_bytes(8, "little")


def test_header_is_marker_and_schema_fingerprint(codec: AvroCodec) -> None:
    for stem, data in (("task", _sample(codec)), ("value", codec.encode_value(None))):
        schema = json.loads((REPO_SCHEMAS / f"{stem}-v1.avsc").read_text())
        canonical = to_parsing_canonical_form(schema).encode()

        assert data[:10] == MARKER + _crc64_avro(canonical)


def test_value_union_is_the_same_in_both_schema_files() -> None:
    task = json.loads((REPO_SCHEMAS / "task-v1.avsc").read_text())
    envelope = json.loads((REPO_SCHEMAS / "value-v1.avsc").read_text())
    args = next(f for f in task["fields"] if f["name"] == "args")

    assert args["type"]["items"] == envelope["fields"][0]["type"]


def test_default_schema_dir_holds_the_schemas() -> None:
    directory = default_schema_dir()

    assert (directory / "task-v1.avsc").is_file()
    assert (directory / "value-v1.avsc").is_file()


def test_missing_schemas_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no task-v<N>\.avsc schema"):
        AvroCodec(schema_dir=tmp_path)


def _write_v0(directory: Path) -> None:
    """An older task schema: no group position, no trace context, attempt an int."""
    schema = json.loads((REPO_SCHEMAS / "task-v1.avsc").read_text())
    dropped = {"group_index", "group_size", "traceparent"}
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in dropped]
    for field in schema["fields"]:
        if field["name"] == "attempt":
            field["type"] = "int"  # int -> long is a legal promotion
    (directory / "task-v0.avsc").write_text(json.dumps(schema))


def test_bytes_of_an_older_schema_decode_with_defaults(tmp_path: Path) -> None:
    # Given a producer that only knows task-v0 and a consumer that knows v0 and v1
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for directory in (old_dir, new_dir):
        directory.mkdir()
        _write_v0(directory)
        shutil.copy(REPO_SCHEMAS / "value-v1.avsc", directory)
    shutil.copy(REPO_SCHEMAS / "task-v1.avsc", new_dir)
    old, new = AvroCodec(schema_dir=old_dir), AvroCodec(schema_dir=str(new_dir))
    assert (old.task_schema_version, new.task_schema_version) == (0, 1)
    msg = TaskMessage(id="t1", name="add", queue="q", args=[[1, 2], {"k": Decimal("1.50")}])

    # When the old producer writes and the new consumer reads
    data = old.encode_task(msg)
    back = new.decode_task(data)

    # Then the message survives and the fields v0 lacks take the v1 defaults
    assert data[2:10] != new.encode_task(msg)[2:10]
    assert_same(back.args, msg.args)
    assert (back.id, back.name, back.attempt, back.created_ms) == ("t1", "add", 1, msg.created_ms)
    assert (back.group_index, back.group_size, back.traceparent) == (None, None, None)
    # and the default codec, which lacks v0, says so instead of guessing
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        AvroCodec().decode_task(data)


def test_an_invalid_schema_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "task-v1.avsc").write_text('{"type": "record", "name": "X", "fields": [{"nam')

    with pytest.raises(ConfigError, match=r"schema file task-v1\.avsc"):
        AvroCodec(schema_dir=tmp_path)


# --- JSON text ----------------------------------------------------------------------------


def test_json_text_of_plain_json_is_compact() -> None:
    assert to_json_text({"a": [1, 2.5, "x", None, True]}) == '{"a":[1,2.5,"x",null,true]}'


def test_json_text_of_other_types() -> None:
    tz = timezone(timedelta(hours=2))
    value = {
        "big": 2**100,
        "b": b"\x00\xff",
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz),
        "day": date(2024, 1, 2),
        "d": Decimal("1.10"),
        "u": UUID(int=1),
        "t": (1, 2),
        "nan": math.nan,
        "inf": -math.inf,
    }

    assert json.loads(to_json_text(value)) == {
        "big": 2**100,
        "b": {"$bytes": "AP8="},
        "when": "2024-01-02T03:04:05+02:00",
        "day": "2024-01-02",
        "d": "1.10",
        "u": "00000000-0000-0000-0000-000000000001",
        "t": [1, 2],
        "nan": "NaN",
        "inf": "-Infinity",
    }


def test_json_text_of_an_unsupported_type_names_the_path() -> None:
    with pytest.raises(EncodeError, match=r"^value\['x'\]\[1\]: cannot encode frozenset"):
        to_json_text({"x": [1, frozenset()]})


@settings(deadline=None)
@given(value=values)
def test_json_text_is_valid_json_for_any_value(value: Any) -> None:
    json.loads(to_json_text(value))
