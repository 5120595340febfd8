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


@pytest.mark.parametrize("service,variable,url", [
    ("kafka", "STREAMTASKS_BROKER", "kafka://kafka.example:9092"),
    ("cassandra", "STREAMTASKS_BACKEND", "cassandra://db.example:9042/streamtasks"),
])
def test_restart_tests_fail_in_ci_against_an_external_cluster(
    monkeypatch: pytest.MonkeyPatch, service: str, variable: str, url: str
) -> None:
    """The integration suite's one skip (an external cluster) must never fire in CI."""
    from integration._services import require_restartable

    monkeypatch.setenv(variable, url)
    monkeypatch.setenv("CI", "true")
    # Caught as BaseException: a skip escaping here would skip this test, not fail it.
    with pytest.raises(BaseException) as in_ci:
        require_restartable(service)
    assert in_ci.type is pytest.fail.Exception
    assert "CI must run against the local services" in str(in_ci.value)
    monkeypatch.delenv("CI")
    with pytest.raises(BaseException) as outside:
        require_restartable(service)
    assert outside.type is pytest.skip.Exception
    assert "external cluster" in str(outside.value)


def test_restart_tests_run_against_the_local_services(monkeypatch: pytest.MonkeyPatch) -> None:
    from integration._services import require_restartable

    monkeypatch.delenv("STREAMTASKS_BROKER", raising=False)
    monkeypatch.delenv("STREAMTASKS_BACKEND", raising=False)
    monkeypatch.setenv("CI", "true")
    require_restartable("kafka")  # neither fails nor skips
    require_restartable("cassandra")
