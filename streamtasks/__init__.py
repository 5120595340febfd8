"""streamtasks: distributed tasks for Python on Apache Kafka and Apache Cassandra."""

from streamtasks import states
from streamtasks.app import App
from streamtasks.context import Request, current_task
from streamtasks.errors import (
    ArgumentError,
    BackendError,
    BrokerError,
    ConfigError,
    DecodeError,
    EncodeError,
    MessageTooLargeError,
    ResultTimeout,
    Retry,
    SendError,
    StreamTasksError,
    TaskError,
    TaskFailed,
    TaskRevoked,
    UnknownTaskError,
)
from streamtasks.result import AsyncResult, ChainResult, GroupResult
from streamtasks.settings import Settings
from streamtasks.signature import Chain, Chord, Group, Signature, chain, chord, group
from streamtasks.task import Task

__all__ = [
    "App",
    "ArgumentError",
    "AsyncResult",
    "BackendError",
    "BrokerError",
    "Chain",
    "ChainResult",
    "Chord",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "Group",
    "GroupResult",
    "MessageTooLargeError",
    "Request",
    "ResultTimeout",
    "Retry",
    "SendError",
    "Settings",
    "Signature",
    "StreamTasksError",
    "Task",
    "TaskError",
    "TaskFailed",
    "TaskRevoked",
    "UnknownTaskError",
    "chain",
    "chord",
    "current_task",
    "group",
    "states",
]
__version__ = "0.1.0"
