"""Read task rows straight from Cassandra (as an operator would), for assertions."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from cassandra.cluster import Cluster
from cassandra.concurrent import execute_concurrent_with_args

from integration._services import cassandra_backend


class Rows:
    def __init__(self, consistency: int | None = None) -> None:
        """Read at ``consistency`` (a driver ConsistencyLevel; default the driver's)."""
        b = cassandra_backend()
        self.keyspace = b.keyspace
        self.cluster = Cluster([b.host], port=b.port, connect_timeout=10)
        self.session = self.cluster.connect()
        self.select = self.session.prepare(
            f"SELECT task_id, state FROM {self.keyspace}.tasks WHERE task_id = ?"
        )
        if consistency is not None:
            self.select.consistency_level = consistency

    def states(self, ids: Sequence[str]) -> dict[str, str]:
        results = execute_concurrent_with_args(
            self.session, self.select, [(i,) for i in ids], concurrency=100,
            raise_on_first_error=True,
        )
        out = {}
        for _ok, rows in results:
            for row in rows:
                out[row.task_id] = row.state
        return out

    def wait_states(self, ids: Sequence[str], state: str, timeout_s: float) -> Counter[str]:
        """Wait until every id has a row in ``state``; return the state counts seen last."""
        deadline = time.monotonic() + timeout_s
        remaining = list(ids)
        while True:
            try:
                seen = self.states(remaining)
            except Exception:  # Cassandra restarting: try again
                seen = {}
            remaining = [i for i in remaining if seen.get(i) != state]
            if not remaining or time.monotonic() > deadline:
                counts = Counter({state: len(ids) - len(remaining)})
                counts["missing-or-other"] = len(remaining)
                return counts
            time.sleep(1.0)

    def close(self) -> None:
        self.cluster.shutdown()
