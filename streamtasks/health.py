"""The operations endpoints of a worker or delay forwarder: /metrics, /healthz, /readyz.

- ``/healthz`` (liveness): 200 while the process's loops turn — the worker loop, and the
  delay forwarder's loop when it runs — each within ``stall_s`` (default
  ``max(30, 2 * shutdown_grace_s)``: a revoke may hold a loop for the grace period).
  Else 503: Kubernetes restarts the pod.
- ``/readyz`` (readiness): 200 when the process is a group member owning partitions (or
  still in its startup window), Kafka answers a metadata request, and — for a worker —
  Cassandra answers a read. Else 503. Both answers are JSON saying what was checked and
  why it failed.
- ``/metrics``: the Prometheus exposition of the process's :class:`WorkerMetrics`.

Served by a stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread; broker
and database probes are cached (``metrics.CachedProbe``) and bounded in time, so a probe
never hangs and probing often costs nothing. ``docs/metrics.md`` has the details.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import exposition

from streamtasks.errors import ConfigError
from streamtasks.metrics import CACHE_TTL_S, CACHE_WAIT_S, CachedProbe, Probed, WorkerMetrics

if TYPE_CHECKING:
    from streamtasks.app import App
    from streamtasks.worker.consumer import Worker
    from streamtasks.worker.delayer import DelayForwarder
    from streamtasks.worker.runtime import PartitionRuntime

log = structlog.get_logger("streamtasks.health")

#: A process owning no partition is still ready this long after it started (joining a
#: group and the first rebalance take a few seconds; topic creation may take more).
STARTUP_S = 60.0
#: The id read to see that Cassandra answers (no task has it; the read finds nothing).
PROBE_TASK_ID = str(uuid.UUID(int=0))


def stall_seconds(shutdown_grace_s: float) -> float:
    """How long a loop may go without a turn before the process counts as stuck.

    A revoke or a drain holds the loop up to the grace period; twice that, at least 30 s.
    """
    return max(30.0, 2 * shutdown_grace_s)


@dataclass(slots=True)
class Verdict:
    """An answer of a health endpoint: ok or not, and the JSON body saying why."""

    ok: bool
    checks: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """Return the JSON body: status, the failures' reasons, and each check."""
        return {"status": "ok" if self.ok else "fail", "reasons": self.reasons,
                "checks": self.checks}


class Health:
    """Liveness and readiness of one worker or delay forwarder process.

    Args:
        app: the app whose broker (and backend, with ``check_backend``) are probed.
        metrics: the observer that learns the loops' turns.
        loops: the loops that must keep turning (``worker``, ``forwarder``).
        memberships: returns the group runtimes whose assignment makes the process ready.
        probe_topic: a topic whose metadata tells that Kafka answers.
        check_backend: also require the result backend (Cassandra) to answer.
        stall_s: longest time without a loop turn (see :func:`stall_seconds`).
        startup_s: how long a process without partitions is still ready.
        ttl_s: how long a Kafka or Cassandra probe answer is reused.
        wait_s: how long a probe may take before it counts as no answer.
    """

    def __init__(
        self,
        app: App,
        metrics: WorkerMetrics,
        *,
        loops: Sequence[str],
        memberships: Callable[[], Sequence[PartitionRuntime]],
        probe_topic: str,
        check_backend: bool,
        stall_s: float | None = None,
        startup_s: float = STARTUP_S,
        ttl_s: float = CACHE_TTL_S,
        wait_s: float = CACHE_WAIT_S,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.loops = tuple(loops)
        self.memberships = memberships
        self.stall_s = stall_s if stall_s is not None else stall_seconds(
            app.settings.shutdown_grace_s)
        self.startup_s = startup_s
        self.kafka = CachedProbe(lambda: app.broker.partition_count(probe_topic),
                                 ttl_s=ttl_s, wait_s=wait_s, name="kafka-probe")
        self.cassandra = (CachedProbe(lambda: app.backend.fetch(PROBE_TASK_ID), ttl_s=ttl_s,
                                      wait_s=wait_s, name="cassandra-probe")
                          if check_backend else None)

    @classmethod
    def of_worker(cls, worker: Worker, metrics: WorkerMetrics, **options: Any) -> Health:
        """Health of a worker: its loop, its forwarder's (when it runs one), Kafka, Cassandra."""
        loops = ["worker", "forwarder"] if worker.settings.run_delayer else ["worker"]
        return cls(worker.app, metrics, loops=loops, memberships=lambda: worker.runtimes,
                   probe_topic=worker.settings.topic(worker.queues[0]), check_backend=True,
                   **options)

    @classmethod
    def of_forwarder(cls, forwarder: DelayForwarder, metrics: WorkerMetrics,
                     **options: Any) -> Health:
        """Health of a delay forwarder running alone: its loop and Kafka (no Cassandra)."""
        settings = forwarder.settings
        probe = settings.tier_topic(forwarder.queues[0], forwarder.tiers[0])
        return cls(forwarder.app, metrics, loops=["forwarder"],
                   memberships=lambda: forwarder.runtimes, probe_topic=probe,
                   check_backend=False, **options)

    def liveness(self) -> Verdict:
        """Every loop turned within :attr:`stall_s`."""
        verdict = Verdict(True)
        for loop in self.loops:
            since = self.metrics.since_turn(loop)
            fresh = since <= self.stall_s
            verdict.checks[f"{loop}_loop"] = {"ok": fresh, "seconds_since_turn": round(since, 3),
                                              "turned": self.metrics.turned(loop)}
            if not fresh:
                verdict.ok = False
                verdict.reasons.append(
                    f"the {loop} loop has not turned for {since:.0f}s (limit {self.stall_s:.0f}s)")
        return verdict

    def readiness(self) -> Verdict:
        """Partitions owned (or starting), Kafka answering, Cassandra answering."""
        verdict = Verdict(True)
        self._check_membership(verdict)
        self._check_probe(verdict, "kafka", self.kafka)
        if self.cassandra is not None:
            self._check_probe(verdict, "cassandra", self.cassandra)
        return verdict

    def _check_membership(self, verdict: Verdict) -> None:
        runtimes = list(self.memberships())
        owned = {rt.group_id: len(rt.assigned) for rt in runtimes}
        uptime = self.metrics.clock() - self.metrics.created
        starting = uptime < self.startup_s
        ok = any(owned.values()) or starting
        verdict.checks["partitions"] = {"ok": ok, "assigned": owned, "starting": starting}
        if not ok:
            verdict.ok = False
            verdict.reasons.append(
                f"no partition assigned in groups {', '.join(owned) or '(none joined)'} "
                f"{uptime:.0f}s after start (more members than partitions, or a stuck "
                "rebalance)")

    @staticmethod
    def _check_probe(verdict: Verdict, what: str, probe: CachedProbe[Any]) -> None:
        answer: Probed[Any] = probe.get()
        if answer.late:
            why: str | None = f"{what}: no answer within {probe.wait_s:.0f}s"
        elif answer.error is not None:
            why = f"{what}: {type(answer.error).__name__}: {answer.error}"
        else:
            why = None
        verdict.checks[what] = {"ok": why is None} | ({"error": why} if why else {})
        if why is not None:
            verdict.ok = False
            verdict.reasons.append(why)


class OpsServer:
    """Serves /metrics, /healthz and /readyz in a daemon thread.

    Args:
        metrics: whose registry ``/metrics`` exposes.
        health: what ``/healthz`` and ``/readyz`` answer.
        port: the port to bind (0: any free port; read :attr:`port`).
        host: the address to bind (``0.0.0.0`` for a pod; tests use ``127.0.0.1``).

    Raises:
        ConfigError: the address cannot be bound (the port is taken).
    """

    def __init__(self, metrics: WorkerMetrics, health: Health, port: int,
                 host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.health = health
        try:
            self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        except OSError as err:
            raise ConfigError(f"cannot serve metrics and health on {host}:{port}: {err}; "
                              "choose another --metrics-port (or metrics_port)") from err
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="streamtasks-ops-http", daemon=True)

    @property
    def port(self) -> int:
        """The port bound."""
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        """Start serving; return self."""
        self._thread.start()
        log.info("metrics and health endpoints serving", port=self.port,
                 paths=["/metrics", "/healthz", "/readyz"])
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _handler_for(server: OpsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._metrics()
                elif path in ("/healthz", "/livez"):
                    self._verdict(server.health.liveness())
                elif path == "/readyz":
                    self._verdict(server.health.readiness())
                else:
                    self._send(404, "text/plain; charset=utf-8",
                               b"not found: try /metrics, /healthz, /readyz\n")
            except Exception as err:  # an endpoint's bug must not end the server thread
                log.error("ops endpoint failed", path=path,
                          error=f"{type(err).__name__}: {err}", exc_info=True)
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")

        def _metrics(self) -> None:
            accept = self.headers.get("Accept", "")
            encoder, content_type = exposition.choose_encoder(accept)
            self._send(200, content_type, encoder(server.metrics.registry))

        def _verdict(self, verdict: Verdict) -> None:
            body = json.dumps(verdict.body()).encode() + b"\n"
            self._send(200 if verdict.ok else 503, "application/json", body)

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes every few seconds: no access log."""

    return Handler


def serve_worker(worker: Worker, metrics: WorkerMetrics, port: int,
                 host: str = "0.0.0.0") -> OpsServer:
    """Serve the metrics and health of ``worker`` (built with ``observer=metrics``)."""
    metrics.watch_worker(worker)
    return OpsServer(metrics, Health.of_worker(worker, metrics), port, host).start()


def serve_forwarder(forwarder: DelayForwarder, metrics: WorkerMetrics, port: int,
                    host: str = "0.0.0.0") -> OpsServer:
    """Serve the metrics and health of a delay forwarder (built with ``observer=metrics``)."""
    metrics.watch_forwarder(forwarder)
    return OpsServer(metrics, Health.of_forwarder(forwarder, metrics), port, host).start()
