"""Avro binary bodies read in plain Python, straight into the values the codec returns.

fastavro's ``schemaless_reader`` costs ~7.5 µs for a 141-byte task message: per call it
sets up its options, matches the reader schema and walks the schema as data, and then
``decode_task`` walks the dict it returned once more to build a ``TaskMessage``. A reader
compiled once per (writer schema, reader schema) pair does both in one pass: the
top-level record is generated Python source with its string, long and optional fields
inlined, the rest are small functions composed from the schema, and the named records of
the ``Value`` union are turned into their Python values (``datetime``, ``Decimal`` ...) as
they are read, by the same converters ``from_datum`` uses.

fastavro stays the reference. The compiled reader covers the types our schemas use
(``null``, ``boolean``, ``int``, ``long``, ``double``, ``string``, ``bytes``, ``fixed``,
arrays, maps, unions and the ``Value`` union's named records) and a writer schema whose
fields are the reader's, or a subset of them in any order with the rest defaulted, or
with extra fields it skips. Anything else compiles to no reader (:func:`compile_reader`
returns None). At run time any byte sequence it does not take as written — a negative
length or block count, a union branch it does not expect, a varint beyond 64 bits, text
that is not UTF-8, bytes missing or left over, a value its converter refuses — raises
:class:`NotCovered` (or the error that found it), and the caller reads the record with
fastavro instead, so malformed input fails exactly as it did before.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any
from uuid import UUID

import fastavro

from streamtasks.codec._binary import NotCovered
from streamtasks.codec._values import (
    BIG_INT,
    DATE,
    DECIMAL,
    DOUBLE_ARRAY,
    DURATION,
    LONG_ARRAY,
    STRING_ARRAY,
    TIMESTAMP,
    UUID_RECORD,
    VALUE_LIST,
    VALUE_MAP,
    date_from_days,
    duration_from_fields,
    int_from_twos_complement,
    timestamp_from_fields,
)

#: Reads one value at a position of the body; returns it and the position after it.
Read = Callable[[bytes, int], tuple[Any, int]]

_unpack_double = struct.Struct("<d").unpack_from
_LONG_RANGE_BITS = 64


class _Unsupported(Exception):  # raised only while compiling
    """The schema holds something this module does not compile."""


# --- primitives -----------------------------------------------------------------------


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Return the zig-zag varint ``long`` at ``pos`` and the position after it.

    Raises:
        NotCovered: a varint beyond 64 bits (fastavro's C reader wraps those around).
        IndexError: the bytes end inside the varint.
    """
    b = data[pos]
    pos += 1
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos
    n = b & 0x7F
    shift = 7
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    if n >> _LONG_RANGE_BITS:
        raise NotCovered
    return (n >> 1) ^ -(n & 1), pos


def read_length(data: bytes, pos: int) -> tuple[int, int]:
    """Return a length or block count (a ``long`` that must not be negative) at ``pos``.

    Raises:
        NotCovered: a negative one (a block with its byte size, or garbage).
    """
    n, pos = read_long(data, pos)
    if n < 0:
        raise NotCovered
    return n, pos


def _read_null(data: bytes, pos: int) -> tuple[Any, int]:
    return None, pos


def _read_boolean(data: bytes, pos: int) -> tuple[Any, int]:
    return data[pos] != 0, pos + 1  # fastavro: any byte but 0 is true


def _read_double(data: bytes, pos: int) -> tuple[Any, int]:
    return _unpack_double(data, pos)[0], pos + 8


def _read_bytes(data: bytes, pos: int) -> tuple[Any, int]:
    n, pos = read_length(data, pos)
    end = pos + n
    # A slice past the end is short, not an error: the caller's final position check
    # (end > len(data)) catches it, as nothing ever moves the position back.
    return data[pos:end], end


def _read_string(data: bytes, pos: int) -> tuple[Any, int]:
    n, pos = read_length(data, pos)
    end = pos + n
    return data[pos:end].decode(), end


_PRIMITIVES: dict[str, Read] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": read_long,
    "long": read_long,
    "double": _read_double,
    "string": _read_string,
    "bytes": _read_bytes,
}


# --- the Value union's named records --------------------------------------------------

# For each record name: its field names (as the converter takes them, positionally) and
# the converter, or None where the record is a plain container whose one field, read by
# its compiled reader, already is the value (typed arrays, ValueList, ValueMap).
_RECORDS: dict[str, tuple[tuple[str, ...], Callable[..., Any] | None]] = {
    LONG_ARRAY: (("items",), None),
    DOUBLE_ARRAY: (("items",), None),
    STRING_ARRAY: (("items",), None),
    VALUE_LIST: (("items",), None),
    VALUE_MAP: (("entries",), None),
    BIG_INT: (("twos_complement",), int_from_twos_complement),
    DECIMAL: (("text",), Decimal),
    TIMESTAMP: (("epoch_us", "utc_offset_s"), timestamp_from_fields),
    DATE: (("epoch_days",), date_from_days),
    DURATION: (("days", "seconds", "microseconds"), duration_from_fields),
    UUID_RECORD: (("bytes",), lambda raw: UUID(bytes=raw)),
}


# --- compiling ------------------------------------------------------------------------


class _Compiler:
    """Readers for the types of one writer schema; named records compiled once each."""

    def __init__(self, named: Mapping[str, Any]) -> None:
        self.named = named
        self.records: dict[str, Read] = {}

    def reader(self, schema: Any) -> Read:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _PRIMITIVES[schema]
            raise _Unsupported(schema)  # a named type outside a union
        if isinstance(schema, list):
            return self._union(schema)
        if "logicalType" in schema:
            raise _Unsupported(schema["logicalType"])
        kind = schema.get("type")
        if kind == "array":
            return self._array(schema["items"])
        if kind == "map":
            return _map_reader(self.reader(schema["values"]))
        if kind == "fixed":
            return _fixed_reader(int(schema["size"]))
        if isinstance(kind, str) and kind in _PRIMITIVES and len(schema) == 1:
            return _PRIMITIVES[kind]
        raise _Unsupported(kind)

    def _array(self, items: Any) -> Read:
        if items == "double":
            return _read_double_array
        if items == "long" or items == "int":
            return _long_or_many(_array_reader(read_long), items)
        if items == "string":
            return _long_or_many(_array_reader(_read_string), items)
        return _array_reader(self.reader(items))

    def _union(self, branches: list[Any]) -> Read:
        readers = [self._branch(branch) for branch in branches]
        if len(readers) == 2 and branches[0] == "null":
            return _optional_reader(readers[1])
        return _union_reader(readers)

    def _branch(self, branch: Any) -> Read:
        if isinstance(branch, str) and branch in _PRIMITIVES:
            return _PRIMITIVES[branch]
        definition = branch if isinstance(branch, dict) else self.named.get(branch)
        if not isinstance(definition, dict) or definition.get("type") != "record":
            raise _Unsupported(branch)
        name = str(definition["name"])
        if name not in self.records:
            self.records[name] = _late(self.records, name)  # a record that holds itself
            self.records[name] = self._record(name, definition["fields"])
        return self.records[name]

    def _record(self, name: str, fields: list[dict[str, Any]]) -> Read:
        known = _RECORDS.get(name)
        if known is None or tuple(f["name"] for f in fields) != known[0]:
            raise _Unsupported(name)  # not a record of the Value union as we know it
        readers = [self.reader(f["type"]) for f in fields]
        convert = known[1]
        if convert is None:
            return readers[0]
        return _record_reader(readers, convert)


def _late(records: Mapping[str, Read], name: str) -> Read:
    """A reader that looks ``name`` up when called (it is still being compiled now)."""

    def read_late(data: bytes, pos: int) -> tuple[Any, int]:
        return records[name](data, pos)

    return read_late


def _fixed_reader(size: int) -> Read:
    def read_fixed(data: bytes, pos: int) -> tuple[Any, int]:
        end = pos + size
        return data[pos:end], end

    return read_fixed


def _long_or_many(read_few: Read, items: str) -> Read:
    """An array of a primitive type: read here when short, by fastavro when long.

    fastavro's setup costs a few µs a call, its reading a third of ours an item: a
    first block of 64 items or more (a count of two varint bytes) goes to fastavro.
    """
    parsed = fastavro.parse_schema({"type": "array", "items": items})

    def read_array(data: bytes, pos: int) -> tuple[Any, int]:
        if data[pos] < 0x80:
            return read_few(data, pos)
        buf = io.BytesIO(data)  # shares the bytes, no copy
        buf.seek(pos)
        return fastavro.schemaless_reader(buf, parsed, None), buf.tell()

    return read_array


def _read_double_array(data: bytes, pos: int) -> tuple[Any, int]:
    items: list[float] = []
    while True:
        count, pos = read_length(data, pos)
        if not count:
            return items, pos
        if count > len(data) - pos:
            raise NotCovered
        items.extend(struct.unpack_from(f"<{count}d", data, pos))  # short: struct.error
        pos += 8 * count


def _array_reader(read_item: Read) -> Read:
    def read_array(data: bytes, pos: int) -> tuple[Any, int]:
        items: list[Any] = []
        append = items.append
        while True:
            count, pos = read_length(data, pos)
            if not count:
                return items, pos
            if count > len(data) - pos:  # each item takes a byte at least
                raise NotCovered
            for _ in range(count):
                item, pos = read_item(data, pos)
                append(item)

    return read_array


def _map_reader(read_value: Read) -> Read:
    def read_map(data: bytes, pos: int) -> tuple[Any, int]:
        entries: dict[str, Any] = {}
        while True:
            count, pos = read_length(data, pos)
            if not count:
                return entries, pos
            if count > len(data) - pos:  # each key takes a byte at least
                raise NotCovered
            for _ in range(count):
                n, pos = read_length(data, pos)
                end = pos + n
                key = data[pos:end].decode()
                entries[key], pos = read_value(data, end)

    return read_map


def _optional_reader(read_some: Read) -> Read:
    def read_optional(data: bytes, pos: int) -> tuple[Any, int]:
        tag = data[pos]
        if tag == 0:
            return None, pos + 1
        if tag == 2:
            return read_some(data, pos + 1)
        raise NotCovered

    return read_optional


def _not_covered(data: bytes, pos: int) -> tuple[Any, int]:
    raise NotCovered


def _union_reader(readers: Sequence[Read]) -> Read:
    # Indexed by the branch number's first byte: zig-zag puts branch i at byte 2 * i
    # (one byte up to branch 63); odd bytes are negative numbers, fastavro's to judge.
    by_byte: list[Read] = [_not_covered] * 256
    for index, read in enumerate(readers[:64]):
        by_byte[2 * index] = read
    table = tuple(by_byte)

    def read_union(data: bytes, pos: int) -> tuple[Any, int]:
        return table[data[pos]](data, pos + 1)

    return read_union


def _record_reader(readers: Sequence[Read], convert: Callable[..., Any]) -> Read:
    if len(readers) == 1:
        (read_field,) = readers

        def read_one(data: bytes, pos: int) -> tuple[Any, int]:
            value, pos = read_field(data, pos)
            return convert(value), pos

        return read_one

    def read_record(data: bytes, pos: int) -> tuple[Any, int]:
        values = []
        for read in readers:
            value, pos = read(data, pos)
            values.append(value)
        return convert(*values), pos

    return read_record


# --- the top-level record: generated source -------------------------------------------

_STRING = """\
    n = data[pos]
    if n & 0x81:  # not a one-byte length (or a negative one)
        n, pos = read_length(data, pos)
    else:
        n >>= 1
        pos += 1
    {target} = data[pos:pos + n].decode()
    pos += n
"""
_LONG = """\
    b = data[pos]
    if b & 0x80:
        {target}, pos = read_long(data, pos)
    else:
        {target} = (b >> 1) ^ -(b & 1)
        pos += 1
"""
_OPTIONAL = """\
    b = data[pos]
    pos += 1
    if b == 0:
        {target} = None
    elif b != 2:
        raise NotCovered
    else:
{body}"""
_CONTAINER = """\
    if data[pos] == 0:  # empty: the common case, without a call
        {target} = {empty}
        pos += 1
    else:
        {target}, pos = {reader}(data, pos)
"""
_CALL = """\
    {target}, pos = {reader}(data, pos)
"""


def _indent(code: str) -> str:
    return "".join("    " + line if line.strip() else line for line in code.splitlines(True))


def _field_source(schema: Any, target: str, reader: str) -> str:
    """Source reading one top-level field into ``target``; ``reader`` names its Read."""
    if schema == "string":
        return _STRING.format(target=target)
    if schema in ("long", "int"):
        return _LONG.format(target=target)
    if isinstance(schema, list) and len(schema) == 2 and schema[0] == "null" and (
        schema[1] in ("string", "long", "int")
    ):
        return _OPTIONAL.format(target=target,
                                body=_indent(_field_source(schema[1], target, reader)))
    if isinstance(schema, dict) and schema.get("type") in ("array", "map"):
        empty = "[]" if schema["type"] == "array" else "{}"
        return _CONTAINER.format(target=target, empty=empty, reader=reader)
    return _CALL.format(target=target, reader=reader)


_SCALAR_DEFAULTS = (type(None), bool, int, float, str)


def _default_source(field: Mapping[str, Any]) -> str:
    """A Python expression giving a reader field's default (a fresh one each time)."""
    if "default" not in field:
        raise _Unsupported(f"{field['name']} has no default")  # fastavro raises
    default = field["default"]
    if type(default) in _SCALAR_DEFAULTS or default == [] or default == {}:
        return repr(default)
    raise _Unsupported(f"default of {field['name']}")


def compile_reader(
    writer: Mapping[str, Any],
    reader: Mapping[str, Any],
    build: Callable[..., Any],
    order: Sequence[str],
) -> Callable[[bytes, int], tuple[Any, int]] | None:
    """Return a reader of record bodies written with ``writer``, resolved to ``reader``.

    Args:
        writer: the fastavro parsed schema the body was written with.
        reader: the fastavro parsed schema to resolve to (``writer`` itself when the same).
        build: called with the value of every field of ``reader``, in ``order``; what it
            returns is what the reader returns.
        order: the names of ``reader``'s fields, in the order ``build`` takes them.

    Returns:
        A function of (bytes, position of the body) returning ``build``'s result and the
        position after the body, raising :class:`NotCovered` (or the error that found
        it) for bytes it leaves to fastavro; None when the pair holds something this
        module does not compile.
    """
    reader_fields = {f["name"]: f for f in reader["fields"]}
    if set(order) != set(reader_fields) or len(order) != len(reader_fields):
        return None
    if any("aliases" in f for f in reader["fields"]):
        return None  # fastavro matches writer fields by alias too: leave it that
    compiler = _Compiler(writer.get("__named_schemas", {}))
    slots = {name: f"f{index}" for index, name in enumerate(order)}
    namespace: dict[str, Any] = {
        "read_long": read_long, "read_length": read_length, "NotCovered": NotCovered,
        "build": build,
    }
    lines = ["def read_body(data, pos):\n"]
    try:
        for index, field in enumerate(writer["fields"]):
            name, schema = field["name"], field["type"]
            own = reader_fields.get(name)
            if own is not None and not _resolves_as_written(
                schema, own["type"], writer, reader
            ):
                return None
            namespace[f"r{index}"] = compiler.reader(schema)
            target = "_" if own is None else slots[name]  # a field the reader lacks: skipped
            lines.append(_field_source(schema, target, f"r{index}"))
        written = {f["name"] for f in writer["fields"]}
        for name in order:
            if name not in written:
                lines.append(f"    {slots[name]} = {_default_source(reader_fields[name])}\n")
    except _Unsupported:
        return None
    lines.append(f"    return build({', '.join(slots[name] for name in order)}), pos\n")
    exec("".join(lines), namespace)  # source built above from the schema's shape
    read_body: Callable[[bytes, int], tuple[Any, int]] = namespace["read_body"]
    return read_body


def _resolves_as_written(
    written: Any, wanted: Any, writer: Mapping[str, Any], reader: Mapping[str, Any]
) -> bool:
    """Whether fastavro resolving ``written`` to ``wanted`` returns the value as written.

    True when both have the same shape (named types compared by their definitions), or
    for the promotion of an ``int`` to a ``long`` (the same varint, the same value).
    """
    if writer is reader or (written == "int" and wanted == "long"):
        return True
    same: bool = _shape(written, writer.get("__named_schemas", {}), {}) == _shape(
        wanted, reader.get("__named_schemas", {}), {}
    )
    return same


def _shape(schema: Any, named: Mapping[str, Any], seen: dict[str, Any]) -> Any:
    """Return a comparable form of ``schema``: what it reads, docs and defaults left out.

    A named type is its name and its definition (``None`` inside itself), wherever the
    schema defines it.
    """
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            seen[schema] = None  # a type that holds itself
            seen[schema] = _shape(named[schema], named, seen)
        return (schema, seen.get(schema)) if schema in named else schema
    if isinstance(schema, list):
        return tuple(_shape(branch, named, seen) for branch in schema)
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        name = str(schema["name"])
        if name not in seen:
            seen[name] = None
            seen[name] = (
                kind,
                tuple((f["name"], _shape(f["type"], named, seen))
                      for f in schema.get("fields", ())),
                tuple(schema.get("symbols", ())),
                schema.get("size"),
                tuple(schema.get("aliases", ())),
            )
        return (name, seen[name])
    if kind == "array":
        return ("array", _shape(schema["items"], named, seen))
    if kind == "map":
        return ("map", _shape(schema["values"], named, seen))
    return (kind, schema.get("logicalType"))
