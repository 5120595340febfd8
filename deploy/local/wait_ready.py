#!/usr/bin/env python3
"""Wait until a local service really serves requests (used by services.sh).

    wait_ready.py kafka HOST:PORT[,HOST:PORT...] [--timeout S] [--pid PID] [--nodes N]
    wait_ready.py cassandra HOST:PORT[,HOST:PORT...] [--timeout S] [--pid PID] [--nodes N]

Kafka: metadata answered and topic `streamtasks.healthcheck` created (or already there).
Cassandra: `SELECT release_version FROM system.local` answered.
With --nodes N, also: N brokers in the metadata / N Cassandra nodes up as the driver sees them.
If --pid is given and that process exits, give up at once.
Exit codes: 0 ready, 1 timed out, 2 process died. Client libraries are imported lazily;
without them only a TCP connect is checked (with a warning).
"""

import argparse
import logging
import os
import socket
import sys
import time

HEALTH_TOPIC = "streamtasks.healthcheck"


def alive(pid):
    """Whether process `pid` still runs (None: no process to watch)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def tcp_probe(host, port):
    """Fallback probe: the port accepts connections."""
    with socket.create_connection((host, port), timeout=2):
        return "tcp port open"


def kafka_probe_factory(bootstrap, nodes=1):
    """Probe: metadata answered (by ``nodes`` brokers) and the health-check topic exists."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    port = int(port)
    try:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic
    except ImportError:
        print("wait_ready: no confluent_kafka; only checking the TCP port", file=sys.stderr)
        return lambda: tcp_probe(host, port)

    def probe():
        admin = AdminClient(
            {
                "bootstrap.servers": bootstrap,
                "socket.connection.setup.timeout.ms": 2000,
                "log_level": 0,
                "logger": logging.getLogger("quiet"),
            }
        )
        md = admin.list_topics(timeout=3)
        if len(md.brokers) < nodes:
            raise RuntimeError(f"{len(md.brokers)} of {nodes} brokers in metadata")
        if HEALTH_TOPIC not in md.topics:
            fut = admin.create_topics(
                [NewTopic(HEALTH_TOPIC, num_partitions=1, replication_factor=min(nodes, 3))],
                operation_timeout=5,
                request_timeout=8,
            )[HEALTH_TOPIC]
            try:
                fut.result(timeout=10)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        return f"{len(md.brokers)} broker(s), cluster id {md.cluster_id}"

    return probe


def cassandra_probe_factory(address, nodes=1):
    """Probe: a CQL query is answered (and ``nodes`` nodes are up)."""
    host, _, port = address.split(",")[0].rpartition(":")
    port = int(port)
    try:
        from cassandra.cluster import Cluster
    except ImportError:
        print("wait_ready: no cassandra-driver; only checking the TCP port", file=sys.stderr)
        return lambda: tcp_probe(host, port)
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)

    def probe():
        tcp_probe(host, port)  # cheap pre-check, avoids slow driver timeouts
        cluster = Cluster([host], port=port, connect_timeout=3, control_connection_timeout=3)
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local", timeout=5).one()
            up = [h for h in cluster.metadata.all_hosts() if h.is_up]
            if len(up) < nodes:
                raise RuntimeError(f"{len(up)} of {nodes} nodes up")
            return f"Cassandra {row.release_version}, {len(up)} node(s) up"
        finally:
            cluster.shutdown()

    return probe


def main():
    """Poll until ready, timed out, or the watched process exited."""
    ap = argparse.ArgumentParser()
    ap.add_argument("service", choices=["kafka", "cassandra"])
    ap.add_argument("address", help="kafka: bootstrap (host:port[,...]); cassandra: host:port")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--pid", type=int)
    ap.add_argument("--nodes", type=int, default=1)
    args = ap.parse_args()
    factory = kafka_probe_factory if args.service == "kafka" else cassandra_probe_factory
    probe = factory(args.address, args.nodes)
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        if not alive(args.pid):
            print(f"wait_ready: {args.service} process {args.pid} exited", file=sys.stderr)
            return 2
        try:
            info = probe()
            print(f"{args.service} ready at {args.address}: {info}")
            return 0
        except Exception as e:  # any failure means "not yet"
            last = e
        if time.monotonic() >= deadline:
            print(
                f"wait_ready: {args.service} at {args.address} not ready after {args.timeout:.0f}s"
                f" (last error: {type(last).__name__}: {last})",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
