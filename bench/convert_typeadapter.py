"""Argument conversion by type hints: ours (codec/convert.py) against pydantic's TypeAdapter.

Usage: python -m bench.convert_typeadapter

For three task signatures, the cost per call of binding decoded arguments and building
typed values: ``bind_arguments`` (cached hint analysis, one C-level type pass over
scalar lists, no copy) and pydantic v2 (one cached ``TypeAdapter`` per parameter,
``validate_python``, lax and strict). Also prints what each accepts that the other
refuses. Decisions: docs/decisions.md, "Argument conversion".
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import timeit
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from streamtasks.codec.convert import bind_arguments
from streamtasks.errors import ArgumentError


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str | None = None


def scalars(a: int, b: str, c: float, when: datetime | None = None) -> None:
    """Three scalars and an optional time."""


def points(items: list[Point]) -> None:
    """A list of dataclasses sent as dicts."""


def numbers(values: list[int]) -> None:
    """A long list of ints."""


def _adapters(fn: Callable[..., Any], strict: bool) -> dict[str, TypeAdapter[Any]]:
    hints = inspect.get_annotations(fn, eval_str=True)
    hints.pop("return", None)
    return {name: TypeAdapter(hint, config={"strict": strict}  # type: ignore[arg-type]
                              if not dataclasses.is_dataclass(hint) else None)
            for name, hint in hints.items()}


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)  # cached, as ours caches its hint analysis


def pydantic_bind(
    fn: Callable[..., Any], adapters: dict[str, TypeAdapter[Any]], args: list[Any],
    strict: bool,
) -> list[Any]:
    bound = _signature(fn).bind(*args)
    return [adapters[name].validate_python(value, strict=strict)
            for name, value in bound.arguments.items()]


CASES: list[tuple[str, Callable[..., Any], list[Any], int]] = [
    ("3 scalars + datetime", scalars, [1, "x", 2.5, datetime(2026, 1, 1)], 20_000),
    ("100 dataclasses from dicts", points,
     [[{"x": i, "y": i, "label": "p"} for i in range(100)]], 2_000),
    ("1,000,000 ints", numbers, [list(range(1_000_000))], 5),
]


def main() -> None:
    print(f"{'case':28} {'ours':>12} {'pydantic lax':>14} {'pydantic strict':>16}")
    for label, fn, args, rounds in CASES:
        lax, strict = _adapters(fn, False), _adapters(fn, True)
        bind_arguments(fn, args, {})  # warm the caches
        ours = timeit.timeit(lambda fn=fn, args=args: bind_arguments(fn, args, {}),
                             number=rounds) / rounds
        loose = timeit.timeit(lambda fn=fn, a=lax, args=args: pydantic_bind(fn, a, args, False),
                              number=rounds) / rounds
        try:
            tight = timeit.timeit(
                lambda fn=fn, a=strict, args=args: pydantic_bind(fn, a, args, True),
                number=rounds) / rounds
            shown = f"{tight * 1e6:>14.1f}us"
        except ValidationError:  # strict mode builds no dataclass from a dict
            shown = f"{'refuses input':>16}"
        print(f"{label:28} {ours * 1e6:>10.1f}us {loose * 1e6:>12.1f}us {shown}")
    print()
    print("behaviour on inputs a wire may carry (ours / pydantic lax / pydantic strict):")
    samples: list[tuple[str, Callable[..., Any], list[Any]]] = [
        ("int param gets '7'", scalars, ["7", "x", 1.0]),
        ("int param gets 7.0", scalars, [7.0, "x", 1.0]),
        ("int param gets True", scalars, [True, "x", 1.0]),
        ("float param gets 1", scalars, [1, "x", 1]),
        ("str param gets 5", scalars, [1, 5, 1.0]),
        ("datetime gets an ISO str", scalars, [1, "x", 1.0, "2026-01-01T00:00:00"]),
    ]
    for label, fn, args in samples:
        outcomes = []
        try:
            bind_arguments(fn, args, {})
            outcomes.append("accepts")
        except ArgumentError:
            outcomes.append("refuses")
        for strict in (False, True):
            try:
                pydantic_bind(fn, _adapters(fn, strict), args, strict)
                outcomes.append("accepts")
            except ValidationError:
                outcomes.append("refuses")
        print(f"  {label:28} {' / '.join(outcomes)}")


if __name__ == "__main__":
    main()
