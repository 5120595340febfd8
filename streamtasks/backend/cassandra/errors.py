"""Driver errors as BackendErrors that name the hosts and what to check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamtasks.errors import BackendError

if TYPE_CHECKING:
    from streamtasks.backend.cassandra.connection import CassandraOptions


def backend_error(err: BaseException, action: str, opts: CassandraOptions) -> BackendError:
    """Return a BackendError for ``err`` met while doing ``action``.

    The message names the hosts and keyspace and what to check; a BackendError is
    returned as is. The password is never part of it.
    """
    if isinstance(err, BackendError):
        return err
    from cassandra import (
        AuthenticationFailed,
        OperationTimedOut,
        ReadTimeout,
        Unavailable,
        UnresolvableContactPoints,
        WriteTimeout,
    )
    from cassandra.cluster import NoHostAvailable
    from cassandra.protocol import SyntaxException

    where = f"Cassandra at {opts.hosts_text} (keyspace {opts.keyspace})"
    if isinstance(err, NoHostAvailable):
        errors = getattr(err, "errors", None) or {}
        detail = "; ".join(f"{host}: {why}" for host, why in errors.items()) or str(err)
        hint = "that Cassandra is running and listening there, and the host:port in the URL"
        if any(isinstance(why, AuthenticationFailed) for why in errors.values()):
            hint = "the username and password options of the backend URL"
        elif "protocol" in detail.lower():
            hint = "the protocol_version option of the backend URL (4 for Cassandra 3.x)"
        elif opts.ssl:
            hint += ", and the TLS options (ssl_ca, ssl_cert, ssl_check_hostname)"
        return BackendError(f"{where}: {action} failed, no host available ({detail}); "
                            f"check {hint}")
    if isinstance(err, UnresolvableContactPoints):
        return BackendError(f"{where}: {action} failed, no host name of the backend URL "
                            "resolves to an address; check the host names in the URL")
    if isinstance(err, OperationTimedOut):
        return BackendError(
            f"{where}: {action} timed out after {opts.request_timeout_s}s ({err}); check "
            "that the nodes are up and not overloaded, or raise request_timeout"
        )
    if isinstance(err, Unavailable):
        return BackendError(
            f"{where}: {action} failed, not enough live replicas for consistency "
            f"{opts.consistency} ({err}); check that the nodes are up and that the "
            "keyspace's replication (replication_factor, local_dc) fits the consistency"
        )
    if isinstance(err, ReadTimeout | WriteTimeout):
        return BackendError(
            f"{where}: {action} failed, replicas did not answer in time at consistency "
            f"{opts.consistency} ({err}); check node health and load"
        )
    message = str(err)
    if "unconfigured table" in message or "Undefined column name" in message or (
        "does not exist" in message and ("eyspace" in message or "table" in message)
    ):
        return BackendError(
            f"{where}: {action} failed, the tables do not exist or are not up to date "
            f"({message}); run `streamtasks migrate`"
        )
    if isinstance(err, SyntaxException):
        return BackendError(f"{where}: {action} failed, invalid CQL ({message})")
    return BackendError(f"{where}: {action} failed: {type(err).__name__}: {message}")
