"""Codec benchmark: Avro single-object encoding of tasks; prints figures, asserts nothing.

    python bench/codec.py

Side by side: our AvroCodec, its decode with the compiled reader (``codec/_reader.py``)
and with fastavro alone (the reader removed, as before it), and the alternative Celery
users know, JSON (stdlib), on the same payloads (JSON cannot carry bytes, big ints,
Decimal or datetimes exactly; it is shown for speed only). Times are the best of 5 runs
in process CPU time (the machine is shared).
"""

from __future__ import annotations

import json
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamtasks.codec import AvroCodec
from streamtasks.message import TaskMessage


def best(fn: object, number: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=5, timer=time.process_time)  # type: ignore[arg-type]
    return min(runs) / number


def fastavro_only() -> AvroCodec:
    """The codec with its compiled readers removed: fastavro reads every body."""
    codec = AvroCodec()
    for family in (codec._tasks, codec._values):
        family._read_body = dict.fromkeys(family._read_body)
    return codec


def main() -> int:
    codec, reference = AvroCodec(), fastavro_only()
    cases = {
        "no-op task (as bench sends)": TaskMessage(
            id="7f0c7c1e-0000-4000-8000-000000000000", name="bench.noop", queue="default",
            traceparent="00-d070ff6711c0865c70e131c9e8228590-ac118088e1b1d592-01"),
        "small task (nested kwargs)": TaskMessage(
            id="7f0c7c1e-0000-4000-8000-000000000001", name="datasets.import", queue="default",
            args=[42, "sales"], kwargs={"options": {"dry_run": False, "tags": ["a", "b"]}}),
        "1M-int list argument": TaskMessage(
            id="7f0c7c1e-0000-4000-8000-000000000002", name="sum", queue="default",
            args=[list(range(1_000_000))]),
    }
    print(f"{'payload':30} {'bytes':>10} {'encode':>10} {'decode':>10} {'fastavro':>10}   codec")
    for label, msg in cases.items():
        number = 2000 if len(msg.args) != 1 else 3
        data = codec.encode_task(msg)
        enc = best(lambda m=msg: codec.encode_task(m), number)
        dec = best(lambda d=data: codec.decode_task(d), number)
        ref = best(lambda d=data: reference.decode_task(d), number)
        print(f"{label:30} {len(data):>10,} {enc * 1e6:>8,.1f}us {dec * 1e6:>8,.1f}us "
              f"{ref * 1e6:>8,.1f}us   avro")
        plain = {"id": msg.id, "name": msg.name, "args": msg.args, "kwargs": msg.kwargs}
        text = json.dumps(plain).encode()
        jenc = best(lambda p=plain: json.dumps(p).encode(), number)
        jdec = best(lambda t=text: json.loads(t), number)
        print(f"{'':30} {len(text):>10,} {jenc * 1e6:>8,.1f}us {jdec * 1e6:>8,.1f}us "
              f"{'':>10}   json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
