"""Consistency levels: which ones the backend accepts, and for what.

Task rows take any level Cassandra offers for reads and writes. Group joins and chord
claims need more, and :func:`check_group_consistency` refuses what cannot keep them
correct (see ``docs/backend.md``).
"""

from __future__ import annotations

from streamtasks.errors import ConfigError

#: The consistency levels of a lightweight transaction's Paxos phase.
SERIAL_LEVELS = ("SERIAL", "LOCAL_SERIAL")
#: Levels that count replicas instead of a majority: a read after a write at such a level
#: need not see the write once the keyspace keeps more than one replica.
_COUNTED_LEVELS = ("ONE", "LOCAL_ONE", "ANY", "TWO", "THREE")


def consistency_level(name: str) -> int:
    """Return the driver's value of a consistency level named ``name`` (any case).

    Raises:
        ConfigError: no such level; the message lists the known ones.

    """
    from cassandra import ConsistencyLevel

    try:
        return int(ConsistencyLevel.name_to_value[name.upper()])
    except KeyError:
        names = ", ".join(sorted(ConsistencyLevel.name_to_value))
        raise ConfigError(f"unknown Cassandra consistency {name!r}; use one of {names}") from None


def check_read_write_consistency(level: str) -> None:
    """Refuse a level that plain reads and writes cannot use (SERIAL, LOCAL_SERIAL).

    Raises:
        ConfigError: naming the setting consistency.

    """
    if level.upper() in SERIAL_LEVELS:
        raise ConfigError(
            f"Cassandra consistency {level} (setting consistency, or the backend URL option "
            "consistency) is a serial level, which plain reads and writes cannot use; use "
            "LOCAL_QUORUM, and serial_consistency for the claims"
        )


def default_serial_consistency(level: str) -> str:
    """Return the claims' serial level for ``level``: LOCAL_SERIAL for a LOCAL_ one."""
    return "LOCAL_SERIAL" if level.upper().startswith("LOCAL_") else "SERIAL"


def check_serial_consistency(serial: str) -> None:
    """Refuse a serial consistency other than SERIAL or LOCAL_SERIAL.

    Raises:
        ConfigError: naming the backend URL option serial_consistency.

    """
    if serial.upper() not in SERIAL_LEVELS:
        raise ConfigError(
            f"backend URL option serial_consistency={serial}: chord claims need SERIAL or "
            "LOCAL_SERIAL"
        )


def replicas(replication: dict[str, str]) -> dict[str, int]:
    """Return the replicas a keyspace keeps per data center (``system_schema`` form).

    ``replication`` is the keyspace's replication map, e.g. ``{'class':
    '...SimpleStrategy', 'replication_factor': '3'}`` (returned as ``{'*': 3}``) or
    ``{'class': '...NetworkTopologyStrategy', 'dc1': '3', 'dc2': '3'}``. A transient
    factor ``'3/1'`` counts its full replicas (3); data centers without replicas are left out.
    """
    counts: dict[str, int] = {}
    for key, value in replication.items():
        if key == "class":
            continue
        try:
            count = int(str(value).split("/", 1)[0])
        except ValueError:
            continue
        if count > 0:
            counts["*" if key == "replication_factor" else key] = count
    return counts


def check_group_consistency(
    consistency: str, serial_consistency: str, replication: dict[str, str], keyspace: str
) -> list[str]:
    """Refuse consistency levels under which group joins and claims cannot be correct.

    A join writes a member's row and then counts its shard: of members joining at once,
    the last must see every row, which needs reads and writes whose replica sets overlap
    (a QUORUM-class level) once the keyspace keeps more than one replica. A claim is a
    lightweight transaction: its Paxos phase must be SERIAL or LOCAL_SERIAL, and
    LOCAL_SERIAL only decides within one data center.

    Args:
        consistency: the level of reads and writes (``Settings.consistency`` or the URL
            option ``consistency``).
        serial_consistency: the level of the claims' Paxos phase.
        replication: the keyspace's replication map, as in ``system_schema.keyspaces``.
        keyspace: named in the messages.

    Returns:
        Warnings: a configuration that is safe but may leave a chord waiting.

    Raises:
        ConfigError: naming the setting to change.

    """
    level, serial = consistency.upper(), serial_consistency.upper()
    check_serial_consistency(serial)
    counts = replicas(replication)
    total = sum(counts.values())
    if level in _COUNTED_LEVELS and total > 1:
        raise ConfigError(
            f"Cassandra consistency {level} (setting consistency, or the backend URL option "
            f"consistency) cannot make chord joins correct: keyspace {keyspace} keeps "
            f"{total} replicas, so a member's read may miss another's write and the chord "
            "never fires; use LOCAL_QUORUM (or QUORUM)"
        )
    data_centers = len(counts) if "*" not in counts else 1
    warnings: list[str] = []
    if data_centers > 1:
        if serial == "LOCAL_SERIAL":
            raise ConfigError(
                f"backend URL option serial_consistency=LOCAL_SERIAL (the default with a "
                f"LOCAL_ consistency) cannot make chord claims correct: keyspace {keyspace} "
                f"is replicated to {data_centers} data centers ({', '.join(sorted(counts))}) "
                "and workers in two of them could both win a claim; set "
                "serial_consistency=SERIAL"
            )
        if level.startswith("LOCAL_"):
            warnings.append(
                f"Cassandra consistency {level} on keyspace {keyspace} replicated to "
                f"{data_centers} data centers: chord joins are counted within one data "
                "center, so members of one chord must run in one data center (else use "
                "QUORUM)"
            )
    return warnings
