"""One settings object: defaults, then a YAML file, then ``STREAMTASKS_*`` env vars, then flags.

Nothing is read at import time: :meth:`Settings.from_env` reads when called.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from streamtasks.errors import ConfigError

if TYPE_CHECKING:
    from streamtasks.delays import DelayTier
    from streamtasks.topology import Topology

ENV_PREFIX = "STREAMTASKS_"


@dataclass(slots=True)
class Settings:
    """Every setting of an app and its workers.

    Attributes:
        broker: broker URL, ``kafka://host:9092[,host2:9092][?client.option=value]`` or
            ``memory://``.
        backend: backend URL, ``cassandra://host:9042[,host2]/keyspace[?consistency=...]``
            or ``memory://``.
        namespace: prefix of every topic name (``{namespace}.{queue}``).
        default_queue: queue of tasks that name none.
        partitions: partitions of topics the library creates.
        replication_factor: replication factor of topics the library creates.
        retention_ms: retention of task topics.
        max_message_bytes: largest task record; topics and producer are set to it.
        create_topics: let ``send`` and the worker create missing topics.
        result_expires_s: TTL of result rows.
        group_expires_s: TTL of a group's join and trigger rows (a chord can wait this
            long for its last member; default 7 days, at least ``result_expires_s``).
        min_insync_replicas: ``min.insync.replicas`` of topics the library creates
            (0: 2 when ``replication_factor`` is 3 or more, else 1).
        concurrency: tasks run at once per worker process.
        inline_max_ms: a sync task whose runs average below this runs in the worker's
            loop thread, not a pool thread (a hop costs more than such a task; 0: never).
        max_in_flight: records held by a worker (running or waiting) before it pauses.
        commit_interval_s: how often a worker commits its done watermarks.
        shutdown_grace_s: how long a draining worker waits for running tasks.
        consistency: Cassandra consistency level of reads and writes.
        backend_max_in_flight: concurrent Cassandra writes per process.
        track_started: write a STARTED row when a task starts (one more write per task).
        log_format: ``json``, ``console``, or ``auto`` (JSON when stdout is not a terminal).
        log_level: ``debug``, ``info``, ``warning``, ``error``.
        metrics_port: port of the worker's /metrics, /healthz, /readyz (0 disables).
        delay_tiers: the delay tiers, comma-separated (``1s,5s,30s,2m,10m,1h``).
        run_delayer: a worker also forwards its queues' delayed records when due.
    """

    broker: str = "kafka://127.0.0.1:9092"
    backend: str = "cassandra://127.0.0.1:9042/streamtasks"
    namespace: str = "streamtasks"
    default_queue: str = "default"
    partitions: int = 6
    replication_factor: int = 1
    retention_ms: int = 7 * 24 * 3600 * 1000
    max_message_bytes: int = 16 * 1024 * 1024
    create_topics: bool = True
    result_expires_s: int = 24 * 3600
    group_expires_s: int = 7 * 24 * 3600
    min_insync_replicas: int = 0
    concurrency: int = 8
    inline_max_ms: float = 1.0
    max_in_flight: int = 1000
    commit_interval_s: float = 0.5
    shutdown_grace_s: float = 30.0
    consistency: str = "LOCAL_QUORUM"
    backend_max_in_flight: int = 256
    track_started: bool = False
    log_format: str = "auto"
    log_level: str = "info"
    metrics_port: int = 0
    delay_tiers: str = "1s,5s,30s,2m,10m,1h"
    run_delayer: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from a YAML file, ``STREAMTASKS_*`` env vars and overrides.

        Later sources win: defaults < file < environment < ``overrides``. The file is
        ``config_file`` or ``$STREAMTASKS_CONFIG``.

        Raises:
            ConfigError: an unknown setting or a value of the wrong form.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_read_yaml(Path(path)))
        for name in _field_names():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(values)

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping of names to values (strings are converted).

        Raises:
            ConfigError: an unknown setting or a value of the wrong form.
        """
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name not in types:
                known = ", ".join(sorted(types))
                raise ConfigError(f"unknown setting {name!r}; known settings: {known}")
            kwargs[name] = _convert(name, str(types[name]), value)
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check values that have a range.

        Raises:
            ConfigError: naming the setting and the accepted range.
        """
        positive = ("partitions", "replication_factor", "concurrency", "max_in_flight",
                    "max_message_bytes", "backend_max_in_flight")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"setting {name} must be at least 1, got {getattr(self, name)}")
        if self.max_in_flight < self.concurrency:
            raise ConfigError(
                f"max_in_flight ({self.max_in_flight}) must be at least concurrency "
                f"({self.concurrency})"
            )
        from streamtasks.topology import check_min_insync_replicas

        check_min_insync_replicas(self.replication_factor, self.min_insync_replicas)
        if self.log_format not in ("json", "console", "auto"):
            raise ConfigError(
                f"log_format must be 'json', 'console' or 'auto', got {self.log_format!r}"
            )
        from streamtasks.delays import parse_tiers

        parse_tiers(self.delay_tiers)
        parse_url(self.broker, "broker")
        parse_url(self.backend, "backend")

    @property
    def topology(self) -> Topology:
        """The topic and group names and topic specs these settings describe."""
        from streamtasks.topology import Topology

        return Topology.from_settings(self)

    def tiers(self) -> tuple[DelayTier, ...]:
        """Return the delay tiers, shortest first."""
        from streamtasks.delays import parse_tiers

        return parse_tiers(self.delay_tiers)

    # One-line delegates to the topology, kept for the code that names topics through
    # the settings.

    def topic(self, queue: str) -> str:
        """Return the topic name of ``queue`` (see :meth:`Topology.topic`)."""
        return self.topology.topic(queue)

    def dlq_topic(self, queue: str) -> str:
        """Return the dead-letter topic name of ``queue`` (see :meth:`Topology.dlq_topic`)."""
        return self.topology.dlq_topic(queue)

    def tier_topic(self, queue: str, tier: DelayTier) -> str:
        """Return the topic of one delay tier of ``queue`` (see :meth:`Topology.tier_topic`)."""
        return self.topology.tier_topic(queue, tier)

    def delayer_group_id(self, queue: str) -> str:
        """Return the group forwarding the delay tiers of ``queue`` (one per queue)."""
        return self.topology.delayer_group_id(queue)

    def group_id(self, queue: str) -> str:
        """Return the worker consumer group of ``queue`` (one per queue)."""
        return self.topology.group_id(queue)


@dataclass(frozen=True, slots=True)
class ServiceURL:
    """A parsed broker or backend URL."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    path: str
    options: dict[str, str]


_DEFAULT_PORTS = {"kafka": 9092, "cassandra": 9042}


def parse_url(url: str, what: str = "url") -> ServiceURL:
    """Parse ``scheme://host:port[,host:port]/path?k=v``.

    Raises:
        ConfigError: the URL has an unknown scheme or a malformed host list.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("kafka", "cassandra", "memory"):
        raise ConfigError(
            f"{what} URL {url!r}: unknown scheme {scheme!r}; use kafka://host:9092, "
            "cassandra://host:9042/keyspace or memory://"
        )
    hosts: list[tuple[str, int]] = []
    if scheme != "memory":
        for item in filter(None, parts.netloc.split("@")[-1].split(",")):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            try:
                hosts.append((host, int(port) if port else _DEFAULT_PORTS[scheme]))
            except ValueError:
                raise ConfigError(f"{what} URL {url!r}: bad port in {item!r}") from None
        if not hosts:
            raise ConfigError(f"{what} URL {url!r} names no host")
    return ServiceURL(scheme, tuple(hosts), parts.path.strip("/"), dict(parse_qsl(parts.query)))


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings) if f.name != "extra"]


def _convert(name: str, type_name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"setting {name}: expected {type_name}, got {value!r}") from None
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"settings file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping of setting names")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
