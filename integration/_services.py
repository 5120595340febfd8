"""Helpers for integration tests that need the local services (deploy/local/services.sh).

Addresses come from the same environment variables the library uses:
STREAMTASKS_BROKER  = kafka://host:port            (default kafka://127.0.0.1:9092)
STREAMTASKS_BACKEND = cassandra://host:port/keyspace (default cassandra://127.0.0.1:9042/streamtasks)
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
SERVICES_SH = REPO / "deploy" / "local" / "services.sh"

DEFAULT_BROKER = "kafka://127.0.0.1:9092"
DEFAULT_BACKEND = "cassandra://127.0.0.1:9042/streamtasks"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Backend:
    host: str
    port: int
    keyspace: str


def broker_url() -> str:
    return os.environ.get("STREAMTASKS_BROKER") or DEFAULT_BROKER


def backend_url() -> str:
    return os.environ.get("STREAMTASKS_BACKEND") or DEFAULT_BACKEND


def kafka_bootstrap() -> str:
    """`kafka://h1:p1,h2:p2` -> `h1:p1,h2:p2` (what confluent_kafka calls bootstrap.servers)."""
    url = broker_url()
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.split("/", 1)[0]


def cassandra_backend() -> Backend:
    """The first host of the backend URL (the driver finds the others) and its keyspace."""
    parts = urlsplit(backend_url())
    first = urlsplit(f"//{parts.netloc.split(',')[0]}")
    keyspace = parts.path.strip("/") or "streamtasks"
    return Backend(first.hostname or "127.0.0.1", first.port or 9042, keyspace)


def _is_local(hostports: list[tuple[str, int]], local_port: int) -> bool:
    return all(h in _LOCAL_HOSTS and p == local_port for h, p in hostports)


def broker_is_external() -> bool:
    """True if STREAMTASKS_BROKER points somewhere other than the services.sh broker."""
    pairs = []
    for hp in kafka_bootstrap().split(","):
        host, _, port = hp.rpartition(":")
        pairs.append((host.strip("[]"), int(port)))
    return not _is_local(pairs, 9092)


def backend_is_external() -> bool:
    """True if STREAMTASKS_BACKEND points somewhere other than the services.sh Cassandra."""
    b = cassandra_backend()
    return not _is_local([(b.host, b.port)], 9042)


def services(command: str, timeout: float = 240) -> str:
    """Run `deploy/local/services.sh <command>`; raise with its output if it fails."""
    proc = subprocess.run(
        ["bash", str(SERVICES_SH), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"services.sh {command} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc.stdout


def restart(service: str) -> None:
    """Stop and start one local service (`kafka` or `cassandra`); returns once it serves again."""
    services(f"{service}-stop")
    services(f"{service}-start")


def require_restartable(service: str) -> None:
    """Skip a restart test against an external cluster we may not restart — never in CI.

    In CI (``CI`` set) the services are the local ones ``make up`` started; an external
    address there is a misconfiguration, so the test fails instead of skipping.
    """
    import pytest

    external = broker_is_external() if service == "kafka" else backend_is_external()
    if not external:
        return
    why = f"{service} is an external cluster (STREAMTASKS_* env): it cannot be restarted here"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run against the local services")
    pytest.skip(why)
