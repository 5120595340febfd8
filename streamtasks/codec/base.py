"""The codec seam: task messages and values to bytes and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from streamtasks.message import TaskMessage


class Codec(ABC):
    """Encodes task messages and result values; knows nothing of transport."""

    @abstractmethod
    def encode_task(self, msg: TaskMessage) -> bytes:
        """Encode a message; raises ``EncodeError`` naming the unsupported value."""

    @abstractmethod
    def decode_task(self, data: bytes) -> TaskMessage:
        """Decode a message; raises ``DecodeError`` saying what is wrong with the bytes."""

    @abstractmethod
    def encode_value(self, value: Any) -> bytes:
        """Encode one value (a result) with its exact types."""

    @abstractmethod
    def decode_value(self, data: bytes) -> Any:
        """Decode a value encoded by :meth:`encode_value`."""
