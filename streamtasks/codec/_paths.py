"""Where in a value something went wrong, built only when it did.

Walking a value with a path string per element would cost on every call; instead a
failure is raised at the leaf and each container adds its own segment on the way out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from streamtasks.errors import EncodeError

SUPPORTED_TYPES = (
    "None, bool, int, float, str, bytes, list, tuple, dict with str keys, datetime, date, "
    "timedelta, Decimal, UUID, enums, dataclasses and pydantic models"
)


class PathFailure(Exception):
    """Internal: a value cannot be handled; ``segments`` grow from the leaf outwards."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.segments: list[str] = []

    def add_index(self, index: int) -> None:
        """Prepend a list index to the path."""
        self.segments.append(f"[{index}]")

    def add_key(self, key: str) -> None:
        """Prepend a dict key to the path."""
        self.segments.append(f"[{key!r}]")

    def add_attr(self, name: str) -> None:
        """Prepend an attribute (dataclass field) to the path."""
        self.segments.append(f".{name}")

    def path(self, root: str) -> str:
        """Return the full path below ``root``."""
        return root + "".join(reversed(self.segments))

    def to_encode_error(self, root: str) -> EncodeError:
        """Return the public error, e.g. ``args[0]['x']: dict key 3 is int, ...``."""
        return EncodeError(f"{self.path(root)}: {self.problem}")


def unsupported(value: Any) -> PathFailure:
    """Return the failure for a value of a type no codec can carry."""
    return PathFailure(f"cannot encode {type_name(value)}; supported: {SUPPORTED_TYPES}")


def type_name(value: Any) -> str:
    """Return the qualified name of a value's type (``set``, ``mymod.Point``)."""
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def bad_key(key: Any) -> PathFailure:
    """Return the failure for a dict key that is not a str."""
    return PathFailure(f"dict key {key!r} is {type(key).__name__}, only str keys are supported")


NOT_AN_OBJECT = object()


def object_to_mapping(value: Any) -> Any:
    """Return a dataclass / pydantic model / enum as plain data, else a sentinel.

    Dataclass instances become a dict of their fields (not deep-copied, not recursed:
    the caller walks the result); pydantic v2 models become ``model_dump(mode="python")``;
    enum members become their ``value``. Anything else returns :data:`NOT_AN_OBJECT`.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    dump = getattr(value, "model_dump", None)
    if dump is not None and not isinstance(value, type) and callable(dump):
        return dump(mode="python")
    return NOT_AN_OBJECT


def map_items(convert: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """Convert every item of a sequence; a failure names the index where it happened."""
    out = []
    for index, item in enumerate(items):
        try:
            out.append(convert(item))
        except PathFailure as failure:
            failure.add_index(index)
            raise
    return out
