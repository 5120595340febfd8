"""A Cassandra node fails under load: nothing is lost, every row reads back, chords fire once.

The keyspace keeps three replicas; the workers write and read at LOCAL_QUORUM and claim
chords at LOCAL_SERIAL (the defaults), so one node down leaves a quorum of two.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel

from cluster._cluster import kill, start
from cluster._load import queue_app, tagged_load
from integration._rows import Rows
from integration._workers import exec_lines, wait_lines, workers_for
from integration.test_chaos_kafka import body_runs
from streamtasks import chord
from streamtasks.signature import Signature

pytestmark = pytest.mark.integration

DOWN_S = 30


@contextmanager
def node_down(node: int) -> Iterator[str]:
    """Cassandra node ``node`` SIGKILLed, started again ``DOWN_S`` seconds later."""
    killed_at = kill("cassandra", node)
    yield f"Cassandra node {node} SIGKILLed for {DOWN_S}s"
    time.sleep(max(0.0, DOWN_S - (time.monotonic() - killed_at)))
    start("cassandra", node)
    print(f"\nCassandra node {node} was down {time.monotonic() - killed_at:.0f}s")


@pytest.mark.timeout(900)
def test_a_cassandra_node_killed_for_30s_loses_no_result(tmp_path: Path) -> None:
    total = 20_000
    # rows are read back at LOCAL_QUORUM: two of the three replicas must have them
    rows = Rows(consistency=ConsistencyLevel.LOCAL_QUORUM)
    result = tagged_load(tmp_path, "cnode", total, lambda _topic: node_down(3), rows=rows)
    print(f"\n{result.report()}")
    result.assert_nothing_lost()


@pytest.mark.timeout(900)
def test_chords_while_a_cassandra_node_is_killed_fire_each_body_once(tmp_path: Path) -> None:
    # Given 3 workers and 200 chords of 20 members each
    chords, size = 200, 20
    log, env, app = queue_app(tmp_path, "cchords")

    def sig(name: str, *args: object) -> Signature:
        return Signature(name, args, app=app)

    with workers_for(env, ["default"] * 3, log_dir=tmp_path, concurrency=8):
        started = time.monotonic()
        results = [chord([sig("it.step", f"m{c}.{j}", j) for j in range(size)],
                         sig("it.body", f"c{c}")).apply_async() for c in range(chords)]
        app.flush(timeout_s=120)
        # When a Cassandra node is SIGKILLed a quarter of the way and back 30 s later
        wait_lines(log, chords * size // 4, timeout_s=300)
        with node_down(2):
            pass
        # Then every chord's body runs once with every member's result, none failed
        sums = [r.get(timeout=600) for r in results]
        elapsed = time.monotonic() - started
        time.sleep(3)  # a second firing would have shown by now
    app.close()
    bodies = body_runs(log)
    members = [line for line in exec_lines(log) if line.startswith("m")]
    repeated = {label: runs for label, runs in bodies.items()
                if [what for what, _pid in runs].count("start") != 1}
    print(f"\n{chords} chords of {size}, a Cassandra node down {DOWN_S}s: {len(bodies)} "
          f"bodies ran in {elapsed:.0f}s, {len(members) - chords * size} member repeats, "
          f"bodies not run exactly once: {len(repeated)}")
    assert sums == [sum(j + 1 for j in range(size))] * chords
    assert set(bodies) == {f"c{c}" for c in range(chords)}
    assert not repeated, dict(list(repeated.items())[:5])
