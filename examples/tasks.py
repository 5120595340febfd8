"""Example tasks: sums, and a dataset import / deletion flow on two queues.

Run workers for them with:
    streamtasks worker --app examples.tasks:app --queues default
    streamtasks worker --app examples.tasks:app --queues datasets-import --concurrency 4
    streamtasks worker --app examples.tasks:app --queues datasets-delete --concurrency 1
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from streamtasks import App

app = App.from_env("examples")


@app.task(name="sum", queue="default")
def total(numbers: list[int]) -> int:
    """Add up a list of integers."""
    return sum(numbers)


@dataclass
class Dataset:
    """A dataset to import: where it comes from and how many rows it has."""

    name: str
    source_url: str
    rows: int


@app.task(name="datasets.import", queue="datasets-import")
def import_dataset(dataset: Dataset) -> dict[str, object]:
    """The slow part of an import: fetch and index the rows (simulated)."""
    digest = hashlib.sha256()
    for row in range(dataset.rows):
        digest.update(f"{dataset.name}:{row}".encode())
    time.sleep(0.2)  # stands for the download
    return {"dataset": dataset.name, "rows": dataset.rows, "checksum": digest.hexdigest()[:16]}


@app.task(name="datasets.delete", queue="datasets-delete")
def delete_dataset(name: str, hard: bool = False) -> dict[str, object]:
    """The slow part of a deletion: remove the files and the index (simulated)."""
    time.sleep(0.1)
    return {"dataset": name, "deleted": True, "hard": hard}


@app.task(name="add", queue="default")
def add(a: int, b: int) -> int:
    """Add two integers (chain and group examples)."""
    return a + b


@app.task(name="multiply", queue="default")
def multiply(a: int, b: int) -> int:
    """Multiply two integers (chain examples)."""
    return a * b


@app.task(name="datasets.report", queue="default")
def report(imports: list[dict[str, object]]) -> dict[str, object]:
    """A chord body: one report over every import of a batch, in batch order."""
    return {
        "datasets": [str(item["dataset"]) for item in imports],
        "rows": sum(int(str(item["rows"])) for item in imports),
    }
