"""Result backends: where task states and results are stored.

``backend_from_url`` picks the implementation by URL scheme: ``cassandra://`` (imported
lazily, so the driver is loaded only when used) or ``memory://``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamtasks.backend.base import ResultBackend, TaskMeta
from streamtasks.backend.memory import MemoryBackend
from streamtasks.codec.base import Codec
from streamtasks.errors import ConfigError
from streamtasks.settings import Settings, parse_url, safe_url

__all__ = ["MemoryBackend", "ResultBackend", "TaskMeta", "backend_from_url"]


def backend_from_url(
    url: str,
    settings: Settings,
    codec: Codec,
    json_text: Callable[[Any], str],
) -> ResultBackend:
    """Return the backend a URL names; nothing is connected yet.

    Args:
        url: ``cassandra://host:9042[,host2]/keyspace[?options]`` or ``memory://``
            (a fresh, empty in-process store on every call).
        settings: TTL, consistency and write concurrency of the Cassandra backend.
        codec: encodes results with their exact types.
        json_text: renders a result as JSON text (the human-readable column).

    Raises:
        ConfigError: an unknown scheme or a malformed URL.

    """
    scheme = parse_url(url, "backend").scheme
    if scheme == "memory":
        return MemoryBackend(codec)
    if scheme == "cassandra":
        from streamtasks.backend.cassandra import CassandraBackend

        return CassandraBackend(url, settings, codec, json_text)
    raise ConfigError(f"backend URL {safe_url(url)!r}: use cassandra://host:9042/keyspace or memory://")
