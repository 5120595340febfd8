"""Python values to and from fastavro data for the recursive ``Value`` union.

Plain scalars (None, bool, int in 64 bits, float, str, bytes) are written as the union's
primitive branches. Everything else becomes a named record, passed to fastavro in its
tuple notation ``(record_name, fields)``: fastavro then picks the branch by name instead
of validating the datum against every branch (which, for a record holding a million
longs, would walk all of them once more). Reading with ``return_record_name=True``
gives the same tuples back, so a record is told apart by name, not by its shape.

Primitive branches need no tags: fastavro tries them in union order, and ``boolean``
precedes ``long`` (a bool is an int in Python), ``long`` precedes ``double`` and ``string``
and ``bytes`` never overlap. Ints beyond 64 bits are turned into ``BigInt`` here, before
fastavro could fall through to ``double``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from streamtasks.codec._paths import (
    NOT_AN_OBJECT,
    PathFailure,
    bad_key,
    object_to_mapping,
    unsupported,
)

NAMESPACE = "streamtasks."
LONG_ARRAY = NAMESPACE + "LongArray"
DOUBLE_ARRAY = NAMESPACE + "DoubleArray"
STRING_ARRAY = NAMESPACE + "StringArray"
BIG_INT = NAMESPACE + "BigInt"
DECIMAL = NAMESPACE + "Decimal"
TIMESTAMP = NAMESPACE + "Timestamp"
DATE = NAMESPACE + "Date"
DURATION = NAMESPACE + "Duration"
UUID_RECORD = NAMESPACE + "Uuid"
VALUE_LIST = NAMESPACE + "ValueList"
VALUE_MAP = NAMESPACE + "ValueMap"

LONG_MIN = -(1 << 63)
LONG_MAX = (1 << 63) - 1
_EPOCH = datetime(1970, 1, 1)
_EPOCH_ORDINAL = _EPOCH.toordinal()
_ONE_US = timedelta(microseconds=1)


def to_datum(value: Any) -> Any:
    """Return ``value`` as a fastavro datum of the ``Value`` union.

    Raises:
        PathFailure: a value (or a dict key) of an unsupported type; the failure's
            path says where.

    """
    kind = type(value)
    if kind is str or kind is float or kind is bool or value is None or kind is bytes:
        return value
    if kind is int:
        if LONG_MIN <= value <= LONG_MAX:
            return value
        return (BIG_INT, {"twos_complement": _int_to_bytes(value)})
    if kind is list or kind is tuple:
        return _list_datum(value)
    if kind is dict:
        return (VALUE_MAP, {"entries": map_to_data(value)})
    return _other_datum(value)


def list_to_data(items: list[Any] | tuple[Any, ...]) -> list[Any]:
    """Return each item as a datum (for a field typed ``array<Value>``)."""
    out: list[Any] = []
    append = out.append
    for index, item in enumerate(items):
        try:
            append(to_datum(item))
        except PathFailure as failure:
            failure.add_index(index)
            raise
    return out


def map_to_data(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    """Return each value as a datum (for a field typed ``map<Value>``); keys must be str."""
    out: dict[str, Any] = {}
    for key, item in mapping.items():
        if not isinstance(key, str):
            raise bad_key(key)
        try:
            out[key] = to_datum(item)
        except PathFailure as failure:
            failure.add_key(key)
            raise
    return out


def _list_datum(items: list[Any] | tuple[Any, ...]) -> Any:
    if items:
        first = type(items[0])
        # Homogeneous lists of int / float / str are written as typed Avro arrays: one C
        # pass finds the element types instead of a Python call per element.
        if (first is int or first is float or first is str) and set(map(type, items)) == {first}:
            plain = items if type(items) is list else list(items)
            if first is str:
                return (STRING_ARRAY, {"items": plain})
            if first is float:
                return (DOUBLE_ARRAY, {"items": plain})
            if min(plain) >= LONG_MIN and max(plain) <= LONG_MAX:
                return (LONG_ARRAY, {"items": plain})
    return (VALUE_LIST, {"items": list_to_data(items)})


def _other_datum(value: Any) -> Any:  # noqa: C901 - one flat type switch
    # Subclasses and the non-JSON types; Enum first, as IntEnum / StrEnum are ints / strs.
    if isinstance(value, Enum):
        return to_datum(value.value)
    if isinstance(value, int):  # bool is handled by exact type in to_datum
        return to_datum(int(value))
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return _list_datum(value)
    if isinstance(value, Mapping):
        return (VALUE_MAP, {"entries": map_to_data(value)})
    if isinstance(value, datetime):
        return (TIMESTAMP, _timestamp_fields(value))
    if isinstance(value, date):
        return (DATE, {"epoch_days": value.toordinal() - _EPOCH_ORDINAL})
    if isinstance(value, timedelta):
        fields = {"days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
        return (DURATION, fields)
    if isinstance(value, Decimal):
        return (DECIMAL, {"text": str(value)})
    if isinstance(value, UUID):
        return (UUID_RECORD, {"bytes": value.bytes})
    plain = object_to_mapping(value)
    if plain is not NOT_AN_OBJECT:
        return to_datum(plain)
    raise unsupported(value)


def _timestamp_fields(value: datetime) -> dict[str, Any]:
    offset = value.utcoffset()
    wall_us = (value.replace(tzinfo=None) - _EPOCH) // _ONE_US
    if offset is None:
        return {"epoch_us": wall_us, "utc_offset_s": None}
    if offset.microseconds:
        raise PathFailure(f"cannot encode a UTC offset with a fraction of a second ({offset})")
    offset_s = offset.days * 86_400 + offset.seconds
    return {"epoch_us": wall_us - offset_s * 1_000_000, "utc_offset_s": offset_s}


def _int_to_bytes(value: int) -> bytes:
    # Shortest big-endian two's complement: bit_length of n (or of ~n when negative)
    # plus one sign bit, rounded up to whole bytes.
    length = (value + (value < 0)).bit_length() // 8 + 1
    return value.to_bytes(length, "big", signed=True)


def from_datum(datum: Any) -> Any:
    """Return the Python value of a datum read with ``return_record_name=True``.

    Raises:
        KeyError: a record name that is not part of the ``Value`` union.

    """
    if type(datum) is tuple:
        name, fields = datum
        return _READERS[name](fields)
    return datum


def timestamp_from_fields(epoch_us: int, utc_offset_s: int | None) -> datetime:
    """Return the datetime of a ``Timestamp`` record's fields."""
    if utc_offset_s is None:
        return _EPOCH + timedelta(microseconds=epoch_us)
    # Build the local wall clock first: converting from UTC near datetime.min / max
    # could leave the representable range although the local time is inside it.
    wall = _EPOCH + timedelta(microseconds=epoch_us + utc_offset_s * 1_000_000)
    return wall.replace(tzinfo=timezone(timedelta(seconds=utc_offset_s)))


def date_from_days(epoch_days: int) -> date:
    """Return the date of a ``Date`` record's field."""
    return date.fromordinal(epoch_days + _EPOCH_ORDINAL)


def duration_from_fields(days: int, seconds: int, microseconds: int) -> timedelta:
    """Return the timedelta of a ``Duration`` record's fields."""
    return timedelta(days=days, seconds=seconds, microseconds=microseconds)


def int_from_twos_complement(raw: bytes) -> int:
    """Return the int of a ``BigInt`` record's field."""
    return int.from_bytes(raw, "big", signed=True)


_READERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    LONG_ARRAY: lambda f: f["items"],
    DOUBLE_ARRAY: lambda f: f["items"],
    STRING_ARRAY: lambda f: f["items"],
    VALUE_LIST: lambda f: [from_datum(item) for item in f["items"]],
    VALUE_MAP: lambda f: {key: from_datum(item) for key, item in f["entries"].items()},
    BIG_INT: lambda f: int_from_twos_complement(f["twos_complement"]),
    DECIMAL: lambda f: Decimal(f["text"]),
    TIMESTAMP: lambda f: timestamp_from_fields(f["epoch_us"], f["utc_offset_s"]),
    DATE: lambda f: date_from_days(f["epoch_days"]),
    DURATION: lambda f: duration_from_fields(f["days"], f["seconds"], f["microseconds"]),
    UUID_RECORD: lambda f: UUID(bytes=f["bytes"]),
}
