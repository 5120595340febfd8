"""How many copies of a record or a row the library asks for when left automatic.

A replication setting of :data:`AUTO` (0, spelled ``auto`` in settings) is decided from
the cluster when the topic or keyspace is created: :func:`auto_replicas` of the nodes
seen then, so the production value (3) on a cluster of three or more and every node of a
smaller one (1 on the single node of ``make demo``). An explicit number always wins.
"""

from __future__ import annotations

from streamtasks.errors import ConfigError

#: A replication factor or ``min.insync.replicas`` chosen from the cluster at creation.
AUTO = 0
#: Replicas the production defaults keep of every topic and of the keyspace.
PRODUCTION_REPLICAS = 3


def auto_replicas(nodes: int) -> int:
    """Return the automatic replication on a cluster of ``nodes``: ``min(3, nodes)``, at least 1."""
    return max(1, min(PRODUCTION_REPLICAS, nodes))


def min_insync_replicas(replication_factor: int, configured: int) -> int:
    """Return the ``min.insync.replicas`` topics get.

    Args:
        replication_factor: the topics' replication factor (resolved, >= 1).
        configured: the setting; 0 picks 2 when the replication factor is 3 or more, else 1.
    """
    if configured > 0:
        return configured
    return 2 if replication_factor >= 3 else 1


def check_min_insync_replicas(replication_factor: int, configured: int) -> None:
    """Refuse a ``min_insync_replicas`` setting no topic could be written with.

    ``replication_factor`` may be :data:`AUTO`: then only a value above what automatic
    replication can ever reach (3) is refused here; a cluster too small for the value is
    refused when a topic is created (:func:`topic_replication`).

    Raises:
        ConfigError: the setting is negative, or above ``replication_factor`` (then no
            write with ``acks=all`` could ever be acknowledged).
    """
    if configured < 0:
        raise ConfigError(
            f"setting min_insync_replicas must be 0 (automatic) or at least 1, got {configured}"
        )
    if replication_factor == AUTO and configured > PRODUCTION_REPLICAS:
        raise ConfigError(
            f"setting min_insync_replicas ({configured}) is above the {PRODUCTION_REPLICAS} "
            "replicas that replication_factor=auto gives at most: no write with acks=all "
            "could be acknowledged; lower min_insync_replicas or set replication_factor"
        )
    if replication_factor != AUTO and configured > replication_factor:
        raise ConfigError(
            f"setting min_insync_replicas ({configured}) is above setting replication_factor "
            f"({replication_factor}): no write with acks=all could be acknowledged; lower "
            "min_insync_replicas or raise replication_factor"
        )


def topic_replication(replication_factor: int, configured_insync: int,
                      brokers: int) -> tuple[int, int]:
    """Return the (replication factor, ``min.insync.replicas``) of a topic created now.

    Args:
        replication_factor: the setting (:data:`AUTO`: :func:`auto_replicas` of ``brokers``).
        configured_insync: the ``min_insync_replicas`` setting (0: automatic).
        brokers: brokers in the cluster now (only read for an automatic factor).

    Raises:
        ConfigError: ``min_insync_replicas`` is above the factor chosen for this cluster.
    """
    replicas = replication_factor or auto_replicas(brokers)
    insync = min_insync_replicas(replicas, configured_insync)
    if insync > replicas:
        raise ConfigError(
            f"setting min_insync_replicas ({insync}) is above the replication factor "
            f"{describe_factor(replication_factor, brokers)}: no write with acks=all "
            "could be acknowledged; lower min_insync_replicas or add brokers"
        )
    return replicas, insync


def describe_factor(replication_factor: int, brokers: int) -> str:
    """Return ``3`` for an explicit factor, ``auto (2 on 2 brokers)`` for an automatic one."""
    if replication_factor != AUTO:
        return str(replication_factor)
    return f"auto ({auto_replicas(brokers)} on {brokers} broker{'s' if brokers != 1 else ''})"
