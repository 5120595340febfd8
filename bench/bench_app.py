"""The tasks the benchmarks' worker processes run (settings from STREAMTASKS_*)."""

from streamtasks import App

app = App.from_env("bench")


@app.task(name="bench.noop")
def noop() -> None:
    """Do nothing: measures the framework's own cost per task."""


@app.task(name="bench.one")
def one(i: int) -> int:
    """Return ``i``: a chord or group member with a result to collect."""
    return i


@app.task(name="bench.count")
def count(results: list[int]) -> int:
    """Return how many results came (a chord body)."""
    return len(results)


@app.task(name="bench.inc")
def inc(x: int) -> int:
    """Return ``x + 1`` (a chain step)."""
    return x + 1
