"""deploy/local/services.sh: usage errors of the cluster commands (no JVM is started)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[1] / "deploy" / "local" / "services.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SERVICES), *args], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (("--nodes", "2", "status"), "--nodes must be 1 or 3, got '2'"),
    (("--nodes", "3", "kafka-stop"), "kafka commands need a node number 1-3, got ''"),
    (("--nodes", "3", "cassandra-kill", "4"), "cassandra commands need a node number 1-3, got '4'"),
    (("kafka-start", "2"), "node '2' given but --nodes is 1"),
])
def test_a_usage_error_names_what_was_wrong_and_exits_2(args: tuple[str, ...],
                                                       message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_an_unknown_command_prints_the_usage_with_the_cluster_commands() -> None:
    proc = run("--nodes", "3", "bogus")
    assert proc.returncode == 2
    assert "services.sh --nodes 3 kafka-stop|kafka-start|cassandra-stop|cassandra-start N" in (
        proc.stdout)
    assert "set -euo" not in proc.stdout  # the usage ends with the comment block
