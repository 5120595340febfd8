"""A worker process moves what start-up built out of the garbage collector's way."""

from __future__ import annotations

import gc
import threading
import time

from streamtasks import App


def _run_one_task(app: App, freeze_startup: bool) -> int:
    """Run a worker in a thread until it ran a task; return the frozen-object count then."""

    @app.task(name="one")
    def one() -> int:
        return 1

    result = one.delay()
    worker = app.worker()
    thread = threading.Thread(target=worker.run, daemon=True,
                              kwargs={"install_signals": False, "freeze_startup": freeze_startup})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not result.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert result.get(timeout=1) == 1
        return gc.get_freeze_count()
    finally:
        worker.stop()
        thread.join(30)
        gc.unfreeze()  # this test process's objects go back to the collector


def test_a_worker_process_freezes_what_start_up_built(app: App) -> None:
    gc.unfreeze()
    assert _run_one_task(app, freeze_startup=True) > 0


def test_a_worker_inside_another_program_freezes_nothing(app: App) -> None:
    gc.unfreeze()
    assert _run_one_task(app, freeze_startup=False) == 0
