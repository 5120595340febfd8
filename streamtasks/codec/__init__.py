"""Encoding of task messages and values (Avro), and argument conversion by type hints.

- :class:`AvroCodec`: task messages and results as Avro single-object encoded bytes.
- :func:`to_json_text`: the JSON text form of a result, for reading rows in ``cqlsh``.
- :func:`to_plain`, :func:`check_arguments`: what the sender does with arguments.
- :func:`bind_arguments`: what the worker does with them before calling the task.
"""

from streamtasks.codec.avro import AvroCodec
from streamtasks.codec.base import Codec
from streamtasks.codec.convert import bind_arguments, check_arguments, to_plain
from streamtasks.codec.jsontext import to_json_text

__all__ = [
    "AvroCodec",
    "Codec",
    "bind_arguments",
    "check_arguments",
    "to_json_text",
    "to_plain",
]
