"""Tasks and helpers shared by the workflow tests (memory:// only)."""

from __future__ import annotations

import pytest

from streamtasks import App

#: Every run of a test task: (task name, its arguments).
Calls = list[tuple[str, tuple[object, ...]]]


@pytest.fixture
def calls(app: App) -> Calls:
    """Register the tasks of these tests; every run is recorded here."""
    seen: Calls = []

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        seen.append(("add", (a, b)))
        return a + b

    @app.task(name="mul")
    def mul(a: int, b: int) -> int:
        seen.append(("mul", (a, b)))
        return a * b

    @app.task(name="total")
    def total(numbers: list[int], plus: int = 0) -> int:
        seen.append(("total", (numbers, plus)))
        return sum(numbers) + plus

    @app.task(name="const")
    def const(value: int) -> int:
        seen.append(("const", (value,)))
        return value

    @app.task(name="boom")
    def boom(*args: object) -> None:
        seen.append(("boom", args))
        raise ValueError("boom")

    @app.task(name="on_error")
    def on_error(task_id: str, error: str) -> str:
        seen.append(("on_error", (task_id, error)))
        return error

    @app.task(name="record")
    def record(*args: object) -> None:
        seen.append(("record", args))

    return seen


def drain_expecting_failure(app: App) -> None:
    """Drain; the workflow contains a task that fails on purpose."""
    with pytest.raises(ValueError, match="boom"):
        app.drain()
