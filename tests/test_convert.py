"""Arguments: plain data for the wire, typed values for the task function."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Optional
from uuid import UUID

import pydantic
import pytest

from streamtasks.codec import AvroCodec, bind_arguments, check_arguments, to_plain
from streamtasks.errors import ArgumentError, EncodeError
from streamtasks.message import TaskMessage


@dataclass
class Point:
    x: int
    y: int = 0


@dataclass
class Segment:
    start: Point
    end: Point | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Node:
    name: str
    children: list[Node] = field(default_factory=list)


@dataclass
class Box:
    width: float
    area: float = field(init=False)

    def __post_init__(self) -> None:
        self.area = self.width * self.width


class User(pydantic.BaseModel):
    name: str
    joined: datetime
    home: Point | None = None


class Color(Enum):
    RED = "red"
    BLUE = "blue"


def total(numbers: list[int]) -> int:
    return sum(numbers)


def draw(
    seg: Segment, more: list[Segment], by_name: dict[str, Point], label: str | None = None
) -> None:
    pass


def greet(user: User, color: Color = Color.RED) -> None:
    pass


def scalars(
    i: int, f: float, s: str, b: bytes, flag: bool, d: Decimal, u: UUID, when: datetime
) -> None:
    pass


def loose(a, b: Any, *rest: int, **named: float) -> None:  # type: ignore[no-untyped-def]
    pass


def pair(p: tuple[int, str], opt: Optional[int] = None, many: tuple[Point, ...] = ()) -> None:  # noqa: UP045
    pass


# --- to_plain ---------------------------------------------------------------------------


def test_to_plain_turns_dataclasses_and_models_into_dicts() -> None:
    when = datetime(2024, 5, 1, 12, 0)
    value = [
        Segment(Point(1, 2), None, ["a"]),
        (User(name="ann", joined=when, home=Point(3)), Color.BLUE),
    ]

    assert to_plain(value) == [
        {"start": {"x": 1, "y": 2}, "end": None, "tags": ["a"]},
        [{"name": "ann", "joined": when, "home": {"x": 3, "y": 0}}, "blue"],
    ]


def test_to_plain_returns_plain_containers_themselves() -> None:
    numbers = list(range(1000))
    mapping = {"a": 1, "b": "x"}

    assert to_plain(numbers) is numbers
    assert to_plain(mapping) is mapping


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"tags": {1, 2}}, "args[0]['tags']: cannot encode set; supported:"),
        ([1, {"k": object()}], "args[0][1]['k']: cannot encode object;"),
        ({"a": {2: "x"}}, "args[0]['a']: dict key 2 is int, only str keys are supported"),
        (Segment(Point(1), tags={"x"}), "args[0]['tags']: cannot encode set"),  # type: ignore[arg-type]
    ],
)
def test_to_plain_names_the_path_of_an_unsupported_value(value: Any, message: str) -> None:
    with pytest.raises(EncodeError) as caught:
        to_plain(value, "args[0]")

    assert str(caught.value).startswith(message)


# --- check_arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "total(): missing a required argument: 'numbers'"),
        (([1], [2]), {}, "total(): too many positional arguments"),
        (([1],), {"numbers": [2]}, "total(): multiple values for argument 'numbers'"),
        (([1],), {"nums": [1]}, "total(): got an unexpected keyword argument 'nums'"),
    ],
)
def test_check_arguments_names_the_task_and_the_problem(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArgumentError) as caught:
        check_arguments(total, args, kwargs)

    assert str(caught.value) == message


def test_check_arguments_accepts_what_binds() -> None:
    check_arguments(total, [[1, 2]], {})
    check_arguments(loose, [1, 2, 3, 4], {"x": 1.0})


# --- bind_arguments -----------------------------------------------------------------------


def test_dicts_become_nested_dataclasses() -> None:
    args, kwargs = bind_arguments(
        draw,
        [{"start": {"x": 1}, "end": {"x": 2, "y": 3}, "tags": ["a"]}],
        {"more": [{"start": {"x": 5}}], "by_name": {"o": {"x": 0}}, "label": None},
    )

    # keyword arguments that can be positional come back as positional (BoundArguments)
    assert args == [
        Segment(Point(1), Point(2, 3), ["a"]),
        [Segment(Point(5))],
        {"o": Point(0)},
        None,
    ]
    assert kwargs == {}


def test_instances_pass_through() -> None:
    seg = Segment(Point(1))

    args, _ = bind_arguments(draw, [seg, [], {}], {})

    assert args[0] is seg


def test_self_referencing_dataclass() -> None:
    def walk(tree: Node) -> None:
        pass

    args, _ = bind_arguments(walk, [{"name": "a", "children": [{"name": "b"}]}], {})

    assert args == [Node("a", [Node("b")])]


def test_init_false_fields_written_by_to_plain_are_ignored() -> None:
    def fit(box: Box) -> None:
        pass

    args, _ = bind_arguments(fit, [to_plain(Box(2.0))], {})

    assert args == [Box(2.0)]


def test_pydantic_models_and_enums_are_built() -> None:
    when = datetime(2024, 5, 1, 12, 0)

    args, kwargs = bind_arguments(
        greet, [{"name": "ann", "joined": when, "home": {"x": 1, "y": 2}}], {"color": "blue"}
    )

    assert args == [User(name="ann", joined=when, home=Point(1, 2)), Color.BLUE]
    assert kwargs == {}


def test_the_codec_round_trip_restores_typed_arguments() -> None:
    codec = AvroCodec()
    seg = Segment(Point(1, 2), None, ["t"])
    msg = TaskMessage(
        id="t",
        name="draw",
        queue="q",
        args=[to_plain(seg)],
        kwargs=to_plain({"more": (seg,), "by_name": {"p": Point(7)}}),
    )

    decoded = codec.decode_task(codec.encode_task(msg))
    args, kwargs = bind_arguments(draw, decoded.args, decoded.kwargs)

    assert args == [seg, [seg], {"p": Point(7)}]
    assert kwargs == {}


def test_scalars_are_checked_and_kept() -> None:
    when = datetime(2024, 1, 1)
    values = [1, 2, "s", b"b", True, Decimal("1.5"), UUID(int=3), when]

    args, _ = bind_arguments(scalars, values, {})

    assert args == [1, 2, "s", b"b", True, Decimal("1.5"), UUID(int=3), when]


def test_unannotated_and_any_are_unchanged() -> None:
    marker = object()

    args, kwargs = bind_arguments(loose, [marker, marker, 1, 2], {"k": 1.5, "j": 2})

    assert args[0] is marker and args[1] is marker
    assert args[2:] == [1, 2]
    assert kwargs == {"k": 1.5, "j": 2}


def test_tuples_and_optionals() -> None:
    args, kwargs = bind_arguments(pair, [[1, "a"]], {"opt": None, "many": [{"x": 1}]})

    assert args == [(1, "a"), None, (Point(1),)]
    assert kwargs == {}


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "message"),
    [
        (total, ["12"], {}, "total(): argument 'numbers' expects list[int], got str"),
        (total, [[1, 2, "x"]], {}, "total(): argument 'numbers'[2] expects int, got str"),
        (total, [[1, True]], {}, "total(): argument 'numbers'[1] expects int, got bool"),
        (
            draw,
            [{"start": {"x": "1"}}, [], {}],
            {},
            "draw(): argument 'seg'.start.x expects int, got str",
        ),
        (
            draw,
            [{"start": {"x": 1}}, [{"start": {"y": 1}}], {}],
            {},
            "draw(): argument 'more'[0].start expects Point, got dict without field 'x'",
        ),
        (
            draw,
            [{"start": {"x": 1, "z": 2}}, [], {}],
            {},
            "draw(): argument 'seg'.start expects Point, got dict with unknown field 'z'",
        ),
        (
            draw,
            [{"start": {"x": 1}}, [], {"k": [1]}],
            {},
            "draw(): argument 'by_name'['k'] expects Point, got list",
        ),
        (
            draw,
            [{"start": {"x": 1}}, [], {}],
            {"label": 5},
            "draw(): argument 'label' expects str | None, got int",
        ),
        (greet, [{"name": "ann", "joined": "x"}], {}, "greet(): argument 'user' expects User; "),
        (
            greet,
            [{"name": "a", "joined": 0}],
            {"color": "green"},
            "greet(): argument 'color' expects Color, got 'green'",
        ),
        (pair, [[1, 2]], {}, "pair(): argument 'p'[1] expects str, got int"),
        (pair, [[1]], {}, "pair(): argument 'p' expects tuple[int, str], got list of length 1"),
        (pair, [[1, "a"]], {"opt": 1.5}, "pair(): argument 'opt' expects int | None, got float"),
        (loose, [1, 2, 3, "4"], {}, "loose(): argument 'rest'[1] expects int, got str"),
        (loose, [1, 2], {"k": "x"}, "loose(): argument 'named'['k'] expects float, got str"),
        (
            scalars,
            [1, 1, "s", b"b", 1, Decimal(1), UUID(int=1), datetime(2024, 1, 1)],
            {},
            "scalars(): argument 'flag' expects bool, got int",
        ),
        (total, [], {}, "total(): missing a required argument: 'numbers'"),
    ],
)
def test_mismatches_name_the_parameter_and_the_types(
    fn: Any, args: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArgumentError) as caught:
        bind_arguments(fn, args, kwargs)

    assert str(caught.value).startswith(message)


def test_a_million_ints_are_all_checked_without_copying() -> None:
    numbers = list(range(1_000_000))

    args, _ = bind_arguments(total, [numbers], {})
    assert args[0] is numbers

    numbers[-1] = "oops"
    with pytest.raises(ArgumentError, match=r"'numbers'\[999999\] expects int, got str"):
        bind_arguments(total, [numbers], {})


def test_keyword_only_arguments_stay_keywords() -> None:
    def place(a: int, *, at: Point) -> None:
        pass

    args, kwargs = bind_arguments(place, [1], {"at": {"x": 2}})

    assert (args, kwargs) == ([1], {"at": Point(2)})


def test_sent_by_position_or_by_name_a_plain_signature_binds_the_same() -> None:
    by_position = bind_arguments(total, [[1, 2]], {})
    by_name = bind_arguments(total, [], {"numbers": [1, 2]})
    assert by_position == by_name == ([[1, 2]], {})
    # one argument too many or too few is still refused, naming the problem
    with pytest.raises(ArgumentError, match="too many positional arguments"):
        bind_arguments(total, [[1], [2]], {})
    with pytest.raises(ArgumentError, match="missing a required argument: 'numbers'"):
        check_arguments(total, [], {})
