"""The Celery 5 app of `make bench`: Redis broker and result backend, one no-op task.

Run by bench/celery_bench/run.py in its own virtual environment (bench/.venv-celery);
CELERY_BENCH_REDIS is host:port of the Redis it starts.
"""

from __future__ import annotations

import os

from celery import Celery

_url = f"redis://{os.environ.get('CELERY_BENCH_REDIS', '127.0.0.1:6379')}/0"
app = Celery("celery_bench", broker=_url, backend=_url)
app.conf.update(
    task_default_queue="celery_bench",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    """Do nothing: measures the framework's own cost per task."""
