"""The tasks the benchmarks' worker processes run (settings from STREAMTASKS_*)."""

from streamtasks import App

app = App.from_env("bench")


@app.task(name="bench.noop")
def noop() -> None:
    """Do nothing: measures the framework's own cost per task."""
