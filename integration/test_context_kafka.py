"""A task's context on the real Kafka and Cassandra: self.request from the record, and a
parent repeated after a worker crash re-sends the same children (no forked ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Consumer

from integration._rows import Rows
from integration._services import kafka_bootstrap
from integration._workers import (
    WorkerProcess,
    make_app,
    new_namespace,
    wait_lines,
    worker_env,
    workers,
)
from streamtasks import states
from streamtasks.message import derived_task_id

pytestmark = pytest.mark.integration


def _sent_ids(topic: str, name: str, expected: int, decode: object) -> list[str]:
    """The ids of the records of task ``name`` in ``topic`` (reads until ``expected``)."""
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap(), "group.id": f"read-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    ids: list[str] = []
    misses = 0
    while len(ids) < expected and misses < 40:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            misses += 1
            continue
        task = decode(msg.value())  # type: ignore[operator]
        if task.name == name:
            ids.append(task.id)
    consumer.close()
    return ids


@pytest.mark.timeout(300)
def test_a_parent_repeated_after_a_crash_resends_the_same_children(tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    env = worker_env(new_namespace("ctx"), IT_EXEC_LOG=str(log))
    app = make_app(env)
    rows = Rows()
    try:
        with workers(env, 1, concurrency=1) as procs:
            # Given a parent that sent its 5 children and holds before it ends
            parent = app.send("it.parent", args=["p", 5, 6000])
            app.flush()
            wait_lines(log, 1, timeout_s=120)
            # When its worker is SIGKILLed (the parent's offset is not committed) and
            # another worker takes the record again
            procs[0].kill()
            procs.append(WorkerProcess(env, concurrency=1))
            children = parent.get(timeout=180)
        runs = log.read_text().split()
        # Then the parent ran twice, with the same id, attempt 1 and record position
        assert len(runs) == 2 and runs[0] == runs[1], runs
        _, _label, run_id, attempt, partition, offset = runs[0].split(":")
        assert run_id == parent.id and attempt == "1"
        assert 0 <= int(partition) < 6 and int(offset) >= 0
        # and both runs sent the same 5 children: 10 records, 5 ids, derived from its id
        expected = [derived_task_id(parent.id, f"child-{n}") for n in range(1, 6)]
        assert children == expected
        topic = app.settings.topic("default")
        sent = _sent_ids(topic, "it.add", 10, app.codec.decode_task)
        assert len(sent) == 10 and sorted(set(sent)) == sorted(expected)
        counts = rows.wait_states(expected, states.SUCCESS, timeout_s=120)
        assert counts[states.SUCCESS] == 5
        child = app.result(expected[0]).meta()
        assert child is not None and child.parent_id == parent.id
        assert child.root_id == parent.id
    finally:
        rows.close()
        app.close()
