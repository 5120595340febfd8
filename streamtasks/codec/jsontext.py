"""A JSON text form of values, for people reading result rows in ``cqlsh``.

Lossy by design: the exact value is stored next to it by :meth:`AvroCodec.encode_value`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from streamtasks.codec._paths import (
    NOT_AN_OBJECT,
    PathFailure,
    bad_key,
    map_items,
    object_to_mapping,
    unsupported,
)
from streamtasks.errors import EncodeError

_SEPARATORS = (",", ":")


def to_json_text(value: Any) -> str:
    """Return compact JSON text for ``value``.

    JSON types are written as they are (ints of any size as JSON numbers); bytes as
    ``{"$bytes": "<base64>"}``; datetime, date and time as ISO-8601 strings; timedelta as
    its number of seconds; Decimal and UUID as strings; enums as their value; dataclasses
    and pydantic models as objects; tuples as arrays. Non-finite floats, which JSON lacks,
    become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``; an int too long for
    Python's str conversion becomes ``{"$int_hex": "0x..."}``. Dict keys may be str or, as
    ``json.dumps`` allows, int / float / bool / None (written as their JSON text).

    Args:
        value: any value :meth:`AvroCodec.encode_value` accepts.

    Returns:
        The JSON text (no whitespace between tokens, non-ASCII characters kept).

    Raises:
        EncodeError: an unsupported type or a non-str dict key, naming the path.

    """
    try:
        # The common case runs entirely in json's C encoder; it gives up on NaN, huge ints
        # and unsupported objects, which the slower walk below handles or reports by path.
        return json.dumps(
            value,
            default=_json_default,
            allow_nan=False,
            separators=_SEPARATORS,
            ensure_ascii=False,
        )
    except (ValueError, TypeError, _Unsupported):
        pass
    try:
        plain = _jsonable(value)
    except PathFailure as failure:
        raise failure.to_encode_error("value") from None
    except RecursionError as err:
        raise EncodeError("value: nested too deeply or contains itself") from err
    return json.dumps(plain, allow_nan=False, separators=_SEPARATORS, ensure_ascii=False)


class _Unsupported(Exception):
    """Internal: raised by the ``default`` hook so the slow walk can name the path."""


def _json_default(value: Any) -> Any:
    converted = _non_json(value)
    if converted is NOT_AN_OBJECT:
        raise _Unsupported
    return converted


def _non_json(value: Any) -> Any:
    """Return a JSON-able stand-in for a non-JSON value, or ``NOT_AN_OBJECT``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return object_to_mapping(value)


def _jsonable(value: Any) -> Any:  # noqa: C901 - one flat type switch
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, int):
        try:
            str(value)
        except ValueError:  # beyond sys.get_int_max_str_digits()
            return {"$int_hex": hex(value)}
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list | tuple):
        return map_items(_jsonable, value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                # The same keys json.dumps accepts, written as it writes them.
                if key is not None and not isinstance(key, bool | int | float):
                    raise bad_key(key)
                key = json.dumps(key)
            try:
                result[key] = _jsonable(item)
            except PathFailure as failure:
                failure.add_key(key)
                raise
        return result
    converted = _non_json(value)
    if converted is NOT_AN_OBJECT:
        raise unsupported(value)
    return _jsonable(converted)
