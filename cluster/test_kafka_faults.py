"""Kafka brokers fail under load: nothing is lost, offsets reach the end, repeats are printed.

Counts come from the tasks themselves (``IT_EXEC_LOG``), states from Cassandra, commits
from the group's offsets (:func:`cluster._load.tagged_load`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cluster._cluster import (
    NODES,
    kill,
    leaders,
    percentiles,
    services,
    start,
    wait_in_sync,
)
from cluster._load import queue_app, tagged_load
from integration._workers import exec_lines, wait_labels, workers_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_leader_broker_killed_halfway_loses_nothing(tmp_path: Path) -> None:
    total = 20_000

    @contextmanager
    def leader_killed(topic: str) -> Iterator[str]:
        # the broker leading most of the queue's partitions, SIGKILLed, back after 20 s
        victim, led = leaders(topic).most_common(1)[0]
        killed_at = kill("kafka", victim)
        yield f"broker {victim} (leader of {led}/6 partitions) SIGKILLed"
        time.sleep(max(0.0, 20 - (time.monotonic() - killed_at)))
        start("kafka", victim)
        print(f"\nbroker {victim} was down {time.monotonic() - killed_at:.0f}s")

    result = tagged_load(tmp_path, "kleader", total, leader_killed)
    print(f"\n{result.report()}")
    result.assert_nothing_lost()


@pytest.mark.timeout(900)
def test_rolling_restart_of_every_broker_loses_nothing_and_never_stalls_long(
    tmp_path: Path,
) -> None:
    total = 20_000
    restarts: list[float] = []
    errors: list[BaseException] = []

    def roll(topic: str) -> None:
        # what an upgrade does: stop (SIGTERM), start, wait until its replicas caught up
        try:
            for node in range(1, NODES + 1):
                began = time.monotonic()
                services("kafka-stop", str(node))
                start("kafka", node)
                restarts.append(time.monotonic() - began)
                wait_in_sync([topic])
        except BaseException as err:  # reported by the test's thread
            errors.append(err)

    @contextmanager
    def rolling(topic: str) -> Iterator[str]:
        roller = threading.Thread(target=roll, args=(topic,))
        roller.start()
        yield "rolling restart of brokers 1-3"
        roller.join(timeout=600)
        assert not roller.is_alive(), "the rolling restart did not end within 600 s"
        assert not errors, errors

    result = tagged_load(tmp_path, "krolling", total, rolling)
    print(f"\n{result.report()}; restarts took {[round(r) for r in restarts]} s")
    assert len(restarts) == NODES
    result.assert_nothing_lost()
    # the group waits at most for one broker's restart, never for the whole roll
    assert result.longest_stall_s <= max(restarts), (result.longest_stall_s, restarts)


@pytest.mark.timeout(600)
def test_countdowns_while_a_broker_is_killed_run_none_early_none_lost(tmp_path: Path) -> None:
    # Given 3 workers and 1,000 countdowns due over the next 0-40 s
    total, spread_s = 1000, 40.0
    log, env, app = queue_app(tmp_path, "kcountdown")
    topic = app.settings.topic("default")
    with workers_for(env, ["default"] * 3, log_dir=tmp_path, concurrency=8):
        assert app.send("it.add", args=[1, 1]).get(timeout=120) == 2
        base_ms = time.time_ns() // 1_000_000 + 2000
        due_ms = {i: base_ms + int(i * spread_s * 1000 / total) for i in range(total)}
        for i, due in due_ms.items():
            app.send("it.stamp", args=[i], eta=datetime.fromtimestamp(due / 1000, UTC))
        app.flush(timeout_s=60)
        # When the broker leading most partitions of the queue is SIGKILLed 10 s in,
        # and started again 20 s later
        time.sleep(max(0.0, (base_ms + 10_000) / 1000 - time.time()))
        victim, _led = leaders(topic).most_common(1)[0]
        killed_at = kill("kafka", victim)
        time.sleep(max(0.0, 20 - (time.monotonic() - killed_at)))
        start("kafka", victim)
        # Then every countdown runs, none before it was due
        wait_labels(log, total, timeout_s=300)
        time.sleep(3)  # a repeat would have shown by now
    app.close()
    started: dict[int, list[int]] = {}
    for line in exec_lines(log):
        i, _, at = line.partition(":")
        started.setdefault(int(i), []).append(int(at))
    early = {i: due_ms[i] - min(at) for i, at in started.items() if min(at) < due_ms[i]}
    lateness = [min(at) - due_ms[i] for i, at in started.items()]
    repeats = sum(len(at) - 1 for at in started.values())
    print(f"\n{total} countdowns over {spread_s:.0f}s, broker {victim} killed: lateness ms "
          f"{percentiles([float(x) for x in lateness])}, {repeats} repeats")
    assert set(started) == set(range(total))
    assert not early, f"{len(early)} ran early (ms before due): {dict(list(early.items())[:5])}"
