"""The three-node cluster of ``services.sh --nodes 3``: its addresses, and faults on its nodes.

Node N is Kafka broker N (``node.id=N``) at 127.0.0.N:19092 and Cassandra node N at
127.0.0.N:19042. Every helper waits for what it starts and gives up after a bound.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from typing import Any

from integration._services import SERVICES_SH
from integration._workers import new_namespace, worker_env

NODES = 3
BROKER_URL = "kafka://" + ",".join(f"127.0.0.{n}:19092" for n in range(1, NODES + 1))
#: No replication option: ``migrate`` replicates a new keyspace min(3, nodes) = 3 times.
BACKEND_URL = (
    "cassandra://" + ",".join(f"127.0.0.{n}:19042" for n in range(1, NODES + 1))
    + "/streamtasks"
)
BOOTSTRAP = BROKER_URL.split("://", 1)[1]


def cluster_env(prefix: str, **extra: str) -> dict[str, str]:
    """A fresh namespace's environment with the library's default durability settings.

    On this cluster the defaults are the production ones: three replicas of every topic
    (``min.insync.replicas`` 2 follows), the keyspace replicated three times, written and
    read at LOCAL_QUORUM, claims at LOCAL_SERIAL.
    """
    return worker_env(new_namespace(prefix), **extra)


def services(*args: str, timeout: float = 300) -> str:
    """Run ``services.sh --nodes 3 <args>``; raise with its output if it fails."""
    proc = subprocess.run(["bash", str(SERVICES_SH), "--nodes", str(NODES), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"services.sh --nodes {NODES} {' '.join(args)} exited "
                           f"{proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
                           f"--- stderr ---\n{proc.stderr}")
    return proc.stdout


def kill(kind: str, node: int) -> float:
    """SIGKILL node ``node`` of ``kind`` (``kafka`` / ``cassandra``); return when it died."""
    services(f"{kind}-kill", str(node))
    return time.monotonic()


def start(kind: str, node: int) -> None:
    """Start node ``node`` of ``kind`` again; return once it serves."""
    services(f"{kind}-start", str(node))


def leaders(topic: str) -> Counter[int]:
    """``broker id -> partitions of topic it leads`` (broker id = node number)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    return Counter(p.leader for p in meta.partitions.values() if p.leader >= 0)


def wait_in_sync(topics: list[str], timeout_s: float = 180) -> None:
    """Wait until every partition of ``topics`` has all three replicas in sync."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    deadline = time.monotonic() + timeout_s
    behind: list[str] = []
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=10)
        behind = [f"{t}[{p}] isr {part.isrs}" for t in topics
                  for p, part in meta.topics[t].partitions.items() if len(part.isrs) < NODES]
        if not behind:
            return
        time.sleep(1)
    raise AssertionError(f"replicas not in sync after {timeout_s}s: {behind[:5]}")


def _cassandra() -> Any:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    return Cluster([(f"127.0.0.{n}", 19042) for n in range(1, NODES + 1)], connect_timeout=5,
                   protocol_version=4, execution_profiles={EXEC_PROFILE_DEFAULT: profile})


def cassandra_nodes_up() -> int:
    """How many Cassandra nodes the driver sees up."""
    cluster = _cassandra()
    try:
        cluster.connect()
        return sum(1 for h in cluster.metadata.all_hosts() if h.is_up)
    finally:
        cluster.shutdown()


def keyspace_replication(keyspace: str) -> dict[str, str]:
    """The replication map of ``keyspace`` (``system_schema.keyspaces``)."""
    cluster = _cassandra()
    try:
        row = cluster.connect().execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            (keyspace,)).one()
        return dict(row.replication) if row else {}
    finally:
        cluster.shutdown()


def drop_keyspace(keyspace: str) -> None:
    """Drop ``keyspace`` if it exists."""
    cluster = _cassandra()
    try:
        cluster.connect().execute(f'DROP KEYSPACE IF EXISTS "{keyspace}"', timeout=120)
    finally:
        cluster.shutdown()


def percentiles(values: list[float], points: tuple[int, ...] = (0, 50, 90, 99, 100)) -> str:
    """``p0=… p50=…`` of ``values`` (nearest rank), for printing."""
    ordered = sorted(values)
    if not ordered:
        return "no values"
    return " ".join(
        f"p{p}={ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]:.0f}"
        for p in points)
