"""One settings object: defaults, then a YAML file, then ``STREAMTASKS_*`` env vars, then flags.

Settings are a pydantic-settings model: every value is type-checked when settings are built
and a bad one is refused with a :class:`~streamtasks.errors.ConfigError` naming the setting,
where it came from, what is expected and what was given (never a secret). Passwords are
:class:`~pydantic.SecretStr`, shown as ``**********`` in ``repr`` and errors.

Nothing is read at import time, and nothing when settings are built directly
(``Settings(concurrency=4)`` is the defaults plus those values): :meth:`Settings.from_env`
reads the environment and the file when called.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from streamtasks.errors import ConfigError

if TYPE_CHECKING:
    from streamtasks.delays import DelayTier
    from streamtasks.topology import Topology

ENV_PREFIX = "STREAMTASKS_"

#: The log levels a ``log_level`` setting may name (any case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _lowered(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _uppered(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _replicas(value: Any) -> Any:
    """A count of replicas, ``auto`` (any case) being 0 (:mod:`streamtasks.replicas`)."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value == "auto":
            return 0
        if not value.isdigit():
            raise ValueError("expected a whole number of replicas, or auto (also 0)")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError("expected a whole number of replicas, or auto (also 0)")
    return value


LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"],
                     BeforeValidator(_lowered)]
LogFormat = Annotated[Literal["json", "console", "auto"], BeforeValidator(_lowered)]
AtLeastOne = Annotated[int, Field(ge=1)]
NotNegative = Annotated[int, Field(ge=0)]
NotNegativeFloat = Annotated[float, Field(ge=0)]
#: A count of replicas, or 0 / ``auto``: chosen from the cluster when a topic is created.
Replicas = Annotated[int, BeforeValidator(_replicas), Field(ge=0)]


class Settings(BaseSettings):
    """Every setting of an app and its workers.

    Attributes:
        broker: broker URL, ``kafka://host:9092[,host2:9092][?client.option=value]`` or
            ``memory://``.
        backend: backend URL, ``cassandra://host:9042[,host2]/keyspace[?consistency=...]``
            or ``memory://``.
        broker_password: the Kafka SASL password (``sasl.password``), kept out of the URL.
        backend_password: the Cassandra password, kept out of the URL.
        namespace: prefix of every topic name (``{namespace}.{queue}``).
        default_queue: queue of tasks that name none.
        partitions: partitions of topics the library creates.
        replication_factor: replication factor of topics the library creates (0 or
            ``auto``, the default: ``min(3, brokers)`` of the brokers serving when a topic
            is created, so 3 on a production cluster and 1 on a single broker).
        retention_ms: retention of task topics.
        max_message_bytes: largest task record; topics and producer are set to it.
        create_topics: let ``send`` and the worker create missing topics.
        result_expires_s: TTL of result rows.
        group_expires_s: TTL of a group's join and trigger rows (a chord can wait this
            long for its last member; default 7 days, at least ``result_expires_s``).
        min_insync_replicas: ``min.insync.replicas`` of topics the library creates
            (0 or ``auto``, the default: 2 when the topic's replication factor is 3 or
            more, else 1).
        concurrency: tasks run at once per worker process.
        inline_max_ms: a sync task whose runs average below this runs in the worker's
            loop thread, not a pool thread (a hop costs more than such a task; 0: never).
        max_in_flight: records held by a worker (running or waiting) before it pauses.
        commit_interval_s: how often a worker commits its done watermarks.
        shutdown_grace_s: how long a draining worker waits for running tasks.
        consistency: Cassandra consistency level of reads and writes.
        backend_max_in_flight: concurrent Cassandra writes per process, from threads
            other than a worker's loop (whose writes ``max_in_flight`` bounds).
        track_started: write STARTED as soon as any task starts (one more write per
            task; per task: ``@app.task(track_started=True)``).
        track_started_after_ms: a task still running this long after it started gets one
            STARTED write (one waiting this long behind its key: RECEIVED); shorter tasks
            cost none (0: never).
        track_pending: write PENDING when a task is sent (one more write per send).
        log_format: ``json``, ``console``, or ``auto`` (JSON when stdout is not a terminal).
        log_level: ``debug``, ``info``, ``warning``, ``error``, ``critical`` (when not
            set: INFO for a worker, WARNING for a client program or command).
        log_repeat_interval_s: a warning or error repeated within this many seconds is
            counted, not printed again (a client retrying a service that is down; 0: off).
        metrics_port: port of the worker's /metrics, /healthz, /readyz (0 disables).
        delay_tiers: the delay tiers, comma-separated (``1s,5s,30s,2m,10m,1h``).
        run_delayer: a worker also forwards its queues' delayed records when due.
        extra: free-form strings for applications (``STREAMTASKS_EXTRA`` as a JSON object).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="forbid", validate_default=False,
        hide_input_in_errors=True,
    )

    broker: str = "kafka://127.0.0.1:9092"
    backend: str = "cassandra://127.0.0.1:9042/streamtasks"
    broker_password: SecretStr | None = None
    backend_password: SecretStr | None = None
    namespace: str = "streamtasks"
    default_queue: str = "default"
    partitions: AtLeastOne = 6
    replication_factor: Replicas = 0
    retention_ms: AtLeastOne = 7 * 24 * 3600 * 1000
    max_message_bytes: AtLeastOne = 16 * 1024 * 1024
    create_topics: bool = True
    result_expires_s: AtLeastOne = 24 * 3600
    group_expires_s: AtLeastOne = 7 * 24 * 3600
    min_insync_replicas: Replicas = 0
    concurrency: AtLeastOne = 8
    inline_max_ms: NotNegativeFloat = 1.0
    max_in_flight: AtLeastOne = 1000
    commit_interval_s: NotNegativeFloat = 0.5
    shutdown_grace_s: NotNegativeFloat = 30.0
    consistency: Annotated[str, BeforeValidator(_uppered)] = "LOCAL_QUORUM"
    backend_max_in_flight: AtLeastOne = 256
    track_started: bool = False
    track_started_after_ms: NotNegativeFloat = 200.0
    track_pending: bool = False
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    log_repeat_interval_s: NotNegativeFloat = 30.0
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    delay_tiers: str = "1s,5s,30s,2m,10m,1h"
    run_delayer: bool = True
    extra: dict[str, str] = Field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        """Build settings from defaults and ``values`` only (no environment, no file).

        Raises:
            ConfigError: an unknown setting or a bad value, one line per problem.
        """
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _BadValues(err) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: Any, *_others: Any, **_named: Any
    ) -> tuple[Any, ...]:
        """Built directly, settings are defaults plus the given values (see :meth:`from_env`)."""
        return (init_settings,)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from a YAML file, ``STREAMTASKS_*`` env vars and overrides.

        Later sources win: defaults < file < environment < ``overrides`` (flags, or
        arguments given in code; ``None`` means not given). The file is ``config_file``
        or ``$STREAMTASKS_CONFIG``.

        Raises:
            ConfigError: an unreadable file, an unknown setting or a bad value, naming the
                setting, its source (file, variable or argument) and what is expected.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        path = config_file or env.get(ENV_PREFIX + "CONFIG")
        if path:
            from_file = _read_yaml(Path(path))
            values.update(from_file)
            origins.update(dict.fromkeys(from_file, f"file {path}"))
        try:
            from_env = _EnvMapping(cls, env)()
        except SettingsError as err:  # a structured setting whose variable is not JSON
            text = str(err).replace('source "_EnvMapping"', f"the {ENV_PREFIX}* environment")
            raise ConfigError(f"{text}: give it as JSON") from None
        values.update(from_env)
        origins.update({name: f"env {ENV_PREFIX}{name.upper()}" for name in from_env})
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        origins.update(dict.fromkeys(given, "argument"))
        return cls._checked(values, origins)

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping of names to values (strings are converted).

        Raises:
            ConfigError: an unknown setting or a bad value, one line per problem.
        """
        return cls._checked(dict(values), {})

    @classmethod
    def _checked(cls, values: dict[str, Any], origins: Mapping[str, str]) -> Settings:
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            where = {origins.get(name, "") for name in unknown} - {""}
            raise ConfigError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}"
                + (f" in {', '.join(sorted(where))}" if where else "")
                + f"; known settings: {', '.join(sorted(cls.model_fields))}"
            )
        try:
            return cls(**values)
        except _BadValues as err:
            raise ConfigError(_describe(err.problems, origins)) from None

    def replace(self, **values: Any) -> Settings:
        """Return a copy with ``values`` changed, checked like any settings.

        Raises:
            ConfigError: an unknown setting or a bad value.
        """
        # Only what was set is carried, so what was left to its default stays so (a
        # level not asked for is still "not asked for").
        current = {name: getattr(self, name) for name in self.model_fields_set}
        return type(self)._checked({**current, **values}, dict.fromkeys(values, "argument"))

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        """Check what depends on more than one value, the URLs and the delay tiers.

        Raises:
            ConfigError: naming the setting and the accepted range.
        """
        if self.max_in_flight < self.concurrency:
            raise ConfigError(
                f"max_in_flight ({self.max_in_flight}) must be at least concurrency "
                f"({self.concurrency})"
            )
        from streamtasks.replicas import check_min_insync_replicas

        check_min_insync_replicas(self.replication_factor, self.min_insync_replicas)
        from streamtasks.delays import parse_tiers

        parse_tiers(self.delay_tiers)
        parse_url(self.broker, "broker")
        parse_url(self.backend, "backend")
        return self

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        """Fields as pydantic shows them, with any password in the URLs hidden."""
        for name, value in super().__repr_args__():
            yield name, safe_url(value) if name in _URL_SETTINGS else value

    @property
    def topology(self) -> Topology:
        """The topic and group names and topic specs these settings describe."""
        return _topology_of(self)

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


class _BadValues(ConfigError):
    """Values refused by validation; described with their origins where those are known."""

    def __init__(self, problems: ValidationError) -> None:
        super().__init__(_describe(problems, {}))
        self.problems = problems


class _EnvMapping(EnvSettingsSource):
    """pydantic-settings' reading of ``STREAMTASKS_*`` variables, from a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._env.items()}


_SECRET_SETTINGS = ("broker_password", "backend_password")
_URL_SETTINGS = ("broker", "backend")


def _describe(err: ValidationError, origins: Mapping[str, str]) -> str:
    """One line per bad value: the setting, where it came from, what is expected, what came."""
    lines = []
    for problem in err.errors(include_url=False):
        name = ".".join(str(part) for part in problem["loc"]) or "settings"
        top = str(problem["loc"][0]) if problem["loc"] else ""
        origin = origins.get(top)
        given = problem.get("input")
        if top in _SECRET_SETTINGS:
            shown = "(hidden)"
        elif top in _URL_SETTINGS and isinstance(given, str):
            shown = repr(safe_url(given))
        else:
            shown = repr(given)
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r}; known settings: "
                         f"{', '.join(sorted(Settings.model_fields))}")
            continue
        lines.append(f"setting {name}{f' (from {origin})' if origin else ''}: "
                     f"{_expected(problem['msg'])} (given: {shown})")
    return "; ".join(lines)


def _expected(message: str) -> str:
    # pydantic says "Input should be a valid integer"; name the setting's expectation
    return (message.replace("Input should be", "expected").replace("Value should be", "expected")
            .replace("Value error, ", ""))


@dataclass(frozen=True, slots=True)
class ServiceURL:
    """A parsed broker or backend URL."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    path: str
    options: dict[str, str]


_DEFAULT_PORTS = {"kafka": 9092, "cassandra": 9042}
#: The URL forms each service takes (a URL of the other service is refused at once).
_URL_FORMS = {
    "broker": {"kafka": "kafka://host:9092", "memory": "memory://"},
    "backend": {"cassandra": "cassandra://host:9042/keyspace", "memory": "memory://"},
}
_ANY_FORM = {**_URL_FORMS["broker"], **_URL_FORMS["backend"]}


def safe_url(url: str) -> str:
    """Return ``url`` fit for a message: user info (``user:password@``) and secret options hidden.

    Works on malformed URLs too: everything between ``://`` and the last ``@`` goes.
    """
    from streamtasks.logs import redact_text

    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return redact_text(scheme + sep + rest)


def parse_url(url: str, what: str = "url") -> ServiceURL:
    """Parse ``scheme://host:port[,host:port]/path?k=v``.

    ``what`` names the URL in errors; ``broker`` and ``backend`` also limit the schemes to
    that service's.

    Raises:
        ConfigError: the URL has a scheme not taken here or a malformed host list.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    forms = _URL_FORMS.get(what, _ANY_FORM)
    if scheme not in forms:
        raise ConfigError(
            f"{what} URL {safe_url(url)!r}: scheme {scheme!r} is not taken here; use "
            f"{' or '.join(forms.values())}"
        )
    hosts: list[tuple[str, int]] = []
    if scheme != "memory":
        for item in filter(None, parts.netloc.split("@")[-1].split(",")):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            try:
                hosts.append((host, int(port) if port else _DEFAULT_PORTS[scheme]))
            except ValueError:
                shown = f" in {item!r}" if "@" not in url else ""  # a password may hold ':'
                raise ConfigError(f"{what} URL {safe_url(url)!r}: bad port{shown}") from None
        if not hosts:
            raise ConfigError(f"{what} URL {safe_url(url)!r} names no host")
    return ServiceURL(scheme, tuple(hosts), parts.path.strip("/"), dict(parse_qsl(parts.query)))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err}") from err
    except yaml.YAMLError as err:
        from streamtasks.logs import redact_text

        raise ConfigError(f"settings file {path} is not valid YAML: {redact_text(str(err))}") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping of setting names")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _topology_of(settings: Settings) -> Topology:
    """Return ``Topology.from_settings(settings)``, importing it on the first call only.

    topology imports the brokers, which import settings, so the import waits for the
    first use; an import statement in the property cost ~1 us per call.
    """
    global _topology_of
    from streamtasks.topology import Topology

    _topology_of = Topology.from_settings
    return Topology.from_settings(settings)
