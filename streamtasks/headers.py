"""Record headers: what routing and operators need without decoding the value."""

from __future__ import annotations

from collections.abc import Mapping

from streamtasks.message import TaskMessage

TASK_ID = "st-id"
TASK_NAME = "st-name"
ATTEMPT = "st-attempt"
ETA_MS = "st-eta-ms"
TRACEPARENT = "traceparent"


def task_headers(msg: TaskMessage) -> dict[str, bytes]:
    """Return the headers of a task record."""
    headers = {
        TASK_ID: msg.id.encode(),
        TASK_NAME: msg.name.encode(),
        ATTEMPT: str(msg.attempt).encode(),
    }
    if msg.eta_ms is not None:
        headers[ETA_MS] = str(msg.eta_ms).encode()
    if msg.traceparent:
        headers[TRACEPARENT] = msg.traceparent.encode()
    return headers


def header_text(headers: Mapping[str, bytes], name: str) -> str | None:
    """Return a header as text, or None when absent or not UTF-8."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None
