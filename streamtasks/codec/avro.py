"""The Avro codec: task messages and values in Avro single-object encoding.

Every encoded message is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint
(little-endian) + the Avro binary body, as the Avro specification's single-object encoding
defines it, so any Avro library holding the schema files can read it. The schemas are the
``task-v<N>.avsc`` and ``value-v<N>.avsc`` files: all versions are loaded, bodies written
with an older version are resolved to the newest one, so old and new producers can run
side by side during a rolling deploy.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Generic, TypeVar

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from streamtasks.codec._binary import NotCovered, compile_record
from streamtasks.codec._paths import PathFailure
from streamtasks.codec._reader import compile_reader
from streamtasks.codec._values import (
    LONG_MAX,
    LONG_MIN,
    from_datum,
    list_to_data,
    map_to_data,
    to_datum,
)
from streamtasks.codec.base import Codec
from streamtasks.errors import ConfigError, DecodeError, EncodeError
from streamtasks.message import TaskMessage

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8

T = TypeVar("T")


def default_schema_dir() -> Traversable:
    """Return where the ``.avsc`` files are: the installed package's ``_schemas``, else the repo's.

    A wheel carries the repository's ``schemas/`` as ``streamtasks/_schemas``; a source
    checkout (editable install, tests) reads ``schemas/`` next to the package.
    """
    packaged = resources.files("streamtasks") / "_schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas"


@dataclass(frozen=True, slots=True)
class _WriterSchema:
    version: int
    parsed: Any
    fingerprint: bytes


class _SchemaFamily(Generic[T]):
    """All versions of one record (``task`` or ``value``) and the framing around bodies.

    Args:
        directory: where the ``<stem>-v<N>.avsc`` files are.
        stem: ``task`` or ``value``.
        build: makes the decoded object from the value of each field of the newest
            schema, in ``order``.
        order: the newest schema's field names, in the order ``build`` takes them.
        from_record: makes the decoded object from the dict fastavro reads (for bodies
            the compiled readers leave to fastavro); raises DecodeError for a bad value.

    """

    def __init__(self, directory: Traversable, stem: str, build: Callable[..., T],
                 order: Sequence[str], from_record: Callable[[dict[str, Any]], T]) -> None:
        pattern = re.compile(rf"{re.escape(stem)}-v(\d+)\.avsc")
        found: list[_WriterSchema] = []
        for entry in directory.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            try:
                raw = json.loads(entry.read_text(encoding="utf-8"))
                canonical = to_parsing_canonical_form(raw)
                parsed = fastavro.parse_schema(raw)
            except Exception as err:
                raise ConfigError(
                    f"schema file {entry.name} in {directory} is invalid: {err}"
                ) from err
            found.append(
                _WriterSchema(
                    version=int(match.group(1)),
                    parsed=parsed,
                    fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
                )
            )
        if not found:
            raise ConfigError(
                f"no {stem}-v<N>.avsc schema in {directory}; pass AvroCodec(schema_dir=...) "
                "pointing at the repository's schemas/ directory"
            )
        found.sort(key=lambda s: s.version)
        self.stem = stem
        self.current = found[-1]
        self.header = MARKER + self.current.fingerprint
        self.by_fingerprint = {s.fingerprint: s for s in found}
        self._write_body = compile_record(self.current.parsed)
        self._from_record = from_record
        # One compiled reader per writer schema, keyed by the whole header (marker +
        # fingerprint), each resolving to the newest schema; None: fastavro reads those.
        self._read_body = {
            MARKER + s.fingerprint: compile_reader(s.parsed, self.current.parsed, build, order)
            for s in found
        }

    def decode(self, data: bytes | bytearray | memoryview) -> T:
        """Return the object in ``data``, resolved to the newest schema.

        The compiled reader of the writer schema reads the body; bytes it does not take
        as written (see ``_reader``) are read again by fastavro, which says what is
        wrong with them.

        Raises:
            DecodeError: see :meth:`unframe`, or a value ``from_record`` refuses.

        """
        if type(data) is not bytes:
            data = bytes(data)
        read_body = self._read_body.get(data[:HEADER_SIZE])
        if read_body is not None:
            try:
                decoded, end = read_body(data, HEADER_SIZE)
                if end == len(data):
                    return decoded  # type: ignore[no-any-return]
            except Exception:  # not an error here: fastavro reads it again below
                pass
        return self._from_record(self.unframe(data))

    def frame(self, record: dict[str, Any], check: Callable[[], None] | None = None) -> bytes:
        """Return header + body of ``record`` written with the current schema.

        The body is written by the writer compiled from the schema (``_binary``), or
        by fastavro for a value that writer leaves to it; ``check`` runs first then (it
        raises the clear error that fastavro would not: a value the compiled writer
        takes is one ``check`` accepts).
        """
        if self._write_body is not None:
            try:
                return self.header + self._write_body(record)
            except NotCovered:
                pass
        if check is not None:
            check()
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.current.parsed, record)
        return buf.getvalue()

    def unframe(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Return the record in ``data``, resolved to the current schema.

        Raises:
            DecodeError: not single-object encoded, unknown writer schema, a body that does
                not parse, or bytes left over after the body.

        """
        what = f"{self.stem} message"
        if len(data) < HEADER_SIZE:
            raise DecodeError(
                f"not a {what}: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte "
                "Avro single-object header"
            )
        data = bytes(data)
        if data[:2] != MARKER:
            raise DecodeError(
                f"not Avro single-object encoding: marker is {data[:2]!r}, expected {MARKER!r}"
            )
        writer = self.by_fingerprint.get(data[2:HEADER_SIZE])
        if writer is None:
            known = ", ".join(
                f"v{s.version}={s.fingerprint.hex()}" for s in self.by_fingerprint.values()
            )
            raise DecodeError(
                f"unknown writer schema fingerprint {data[2:HEADER_SIZE].hex()} for a {what} "
                f"(known: {known}); it was written with a schema this process lacks — "
                "deploy the newer schema files before the producers that use them"
            )
        # The same schema for writer and reader: skip fastavro's resolution entirely.
        reader = None if writer is self.current else self.current.parsed
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            record: Any = fastavro.schemaless_reader(
                buf, writer.parsed, reader, return_record_name=True
            )
        except Exception as err:
            raise DecodeError(
                f"{what} body does not parse with schema {self.stem}-v{writer.version}: "
                f"{type(err).__name__}: {err}"
            ) from err
        left = len(data) - buf.tell()
        if left:
            raise DecodeError(f"{left} trailing byte(s) after the {what} body")
        if not isinstance(record, dict):
            raise DecodeError(f"{what} body is not a record")
        return record


class AvroCodec(Codec):
    """Task messages and values as Avro single-object encoded bytes.

    Args:
        schema_dir: directory holding ``task-v<N>.avsc`` and ``value-v<N>.avsc``;
            default: :func:`default_schema_dir`.

    Raises:
        ConfigError: a schema family is missing or a schema file is invalid.

    """

    def __init__(self, schema_dir: Path | str | Traversable | None = None) -> None:
        if schema_dir is None:
            directory = default_schema_dir()
        elif isinstance(schema_dir, str):
            directory = Path(schema_dir)
        else:
            directory = schema_dir
        self._tasks: _SchemaFamily[TaskMessage] = _SchemaFamily(
            directory, "task", TaskMessage, _TASK_FIELDS, _task_from_record)
        self._values: _SchemaFamily[Any] = _SchemaFamily(
            directory, "value", _the_value, ("value",), _value_from_record)

    @property
    def task_schema_version(self) -> int:
        """The schema version new task messages are written with."""
        return self._tasks.current.version

    def encode_task(self, msg: TaskMessage) -> bytes:
        """Encode a message with the newest task schema.

        Args:
            msg: the message; args, kwargs and the signatures in link / link_error / chain
                may hold any value :meth:`encode_value` accepts.

        Returns:
            The single-object encoded bytes.

        Raises:
            EncodeError: a field of the wrong type or a value that cannot be encoded; the
                message names the path, e.g. ``args[0]['x']``.

        """
        record = {
            "id": msg.id,
            "name": msg.name,
            "queue": msg.queue,
            "args": _encode_field("args", list_to_data, msg.args, (list, tuple)),
            "kwargs": _encode_field("kwargs", map_to_data, msg.kwargs, (dict,)),
            "attempt": msg.attempt,
            "created_ms": msg.created_ms,
            "eta_ms": msg.eta_ms,
            "expires_ms": msg.expires_ms,
            "key": msg.key,
            "parent_id": msg.parent_id,
            "root_id": msg.root_id,
            "group_id": msg.group_id,
            "group_index": msg.group_index,
            "group_size": msg.group_size,
            "link": _encode_signatures("link", msg.link),
            "link_error": _encode_signatures("link_error", msg.link_error),
            "chain": _encode_signatures("chain", msg.chain),
            "options": msg.options,
            "traceparent": msg.traceparent,
        }
        return self._tasks.frame(record, partial(_check_scalars, msg))

    def decode_task(self, data: bytes) -> TaskMessage:
        """Decode a message written with any known task schema version.

        Args:
            data: the bytes of one record value.

        Returns:
            The message, with fields an older writer lacked set to their defaults.

        Raises:
            DecodeError: the bytes are not a task message of a known schema; the message
                says what is wrong.

        """
        return self._tasks.decode(data)

    def encode_value(self, value: Any) -> bytes:
        """Encode one value (a task result) so that :meth:`decode_value` restores its type.

        Args:
            value: None, bool, int (any size), float, str, bytes, list / tuple, dict with
                str keys, datetime (naive or with a fixed UTC offset), date, timedelta,
                Decimal, UUID, or — converted to plain data — enums, dataclasses and
                pydantic models.

        Returns:
            The single-object encoded bytes of a ``ValueEnvelope``.

        Raises:
            EncodeError: an unsupported type or a non-str dict key, naming the path.

        """
        return self._values.frame({"value": _encode_field("value", to_datum, value, None)})

    def decode_value(self, data: bytes) -> Any:
        """Decode a value encoded by :meth:`encode_value`.

        Tuples come back as lists, bytearray as bytes, enums / dataclasses / pydantic
        models as their plain value, and an aware datetime with a fixed-offset timezone
        (same instant and UTC offset); everything else with its exact type and value.

        Raises:
            DecodeError: the bytes are not a value of a known schema.

        """
        return self._values.decode(data)


# What a decoded record's values may raise in conversion: a date or duration out of range
# (OverflowError), a Decimal of garbage text (decimal.InvalidOperation), a bad UUID.
_BAD_VALUE = (KeyError, ValueError, TypeError, ArithmeticError)
_TASK_FIELDS = tuple(f.name for f in fields(TaskMessage))


def _task_from_record(record: dict[str, Any]) -> TaskMessage:
    try:
        return TaskMessage(
            id=record["id"],
            name=record["name"],
            queue=record["queue"],
            args=[from_datum(item) for item in record["args"]],
            kwargs={key: from_datum(item) for key, item in record["kwargs"].items()},
            attempt=record["attempt"],
            created_ms=record["created_ms"],
            eta_ms=record["eta_ms"],
            expires_ms=record["expires_ms"],
            key=record["key"],
            parent_id=record["parent_id"],
            root_id=record["root_id"],
            group_id=record["group_id"],
            group_index=record["group_index"],
            group_size=record["group_size"],
            link=[_decode_map(sig) for sig in record["link"]],
            link_error=[_decode_map(sig) for sig in record["link_error"]],
            chain=[_decode_map(sig) for sig in record["chain"]],
            options=record["options"],
            traceparent=record["traceparent"],
        )
    except _BAD_VALUE as err:
        raise DecodeError(
            f"task message has an invalid value: {type(err).__name__}: {err}"
        ) from err


def _the_value(value: Any) -> Any:
    return value


def _value_from_record(record: dict[str, Any]) -> Any:
    try:
        return from_datum(record["value"])
    except _BAD_VALUE as err:
        raise DecodeError(
            f"value message has an invalid value: {type(err).__name__}: {err}"
        ) from err


def _encode_field(root: str, convert: Any, value: Any, kinds: tuple[type, ...] | None) -> Any:
    if kinds is not None and not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise EncodeError(f"{root}: expected a {names}, got {type(value).__name__}")
    try:
        return convert(value)
    except PathFailure as failure:
        raise failure.to_encode_error(root) from None
    except RecursionError as err:
        raise EncodeError(f"{root}: nested too deeply or contains itself") from err


def _encode_signatures(root: str, signatures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if type(signatures) is list and not signatures:
        return signatures  # the common case, three times a message; only read from here
    out = []
    for index, signature in enumerate(signatures):
        out.append(_encode_field(f"{root}[{index}]", map_to_data, signature, (dict,)))
    return out


def _decode_map(entries: dict[str, Any]) -> dict[str, Any]:
    return {key: from_datum(item) for key, item in entries.items()}


_STR_FIELDS = ("id", "name", "queue")
_OPTIONAL_STR_FIELDS = ("key", "parent_id", "root_id", "group_id", "traceparent")
_INT_FIELDS = ("attempt", "created_ms")
_OPTIONAL_INT_FIELDS = ("eta_ms", "expires_ms", "group_index", "group_size")


def _check_scalars(msg: TaskMessage) -> None:
    """Raise EncodeError naming a header field of the wrong type (fastavro would not say).

    Run only for a message the compiled writer did not take: it takes exact ``str`` and
    ``int`` (in 64 bits, not ``bool``) where these checks ask for them, and a dict of
    ``str`` to ``str`` as options, so it never writes what they would refuse.
    """
    for name in _STR_FIELDS + _OPTIONAL_STR_FIELDS:
        value = getattr(msg, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL_STR_FIELDS):
            raise EncodeError(f"TaskMessage.{name}: expected str, got {type(value).__name__}")
    for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
        value = getattr(msg, name)
        if value is None and name in _OPTIONAL_INT_FIELDS:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise EncodeError(f"TaskMessage.{name}: expected int, got {type(value).__name__}")
        if not LONG_MIN <= value <= LONG_MAX:
            raise EncodeError(f"TaskMessage.{name}: {value} does not fit in 64 bits")
    if not isinstance(msg.options, dict):
        raise EncodeError(f"TaskMessage.options: expected dict, got {type(msg.options).__name__}")
    for key, value in msg.options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EncodeError(
                f"options[{key!r}]: options map str to str, got "
                f"{type(key).__name__} -> {type(value).__name__}"
            )
