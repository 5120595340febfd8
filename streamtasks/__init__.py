"""streamtasks: distributed tasks for Python on Apache Kafka and Apache Cassandra."""

from streamtasks import states
from streamtasks.app import App
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
from streamtasks.result import AsyncResult
from streamtasks.settings import Settings
from streamtasks.task import Task

__all__ = [
    "App",
    "ArgumentError",
    "AsyncResult",
    "BackendError",
    "BrokerError",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "MessageTooLargeError",
    "ResultTimeout",
    "Retry",
    "SendError",
    "Settings",
    "StreamTasksError",
    "Task",
    "TaskError",
    "TaskFailed",
    "TaskRevoked",
    "UnknownTaskError",
    "states",
]
__version__ = "0.1.0"
