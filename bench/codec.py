"""Codec benchmark: Avro single-object encoding of tasks; prints figures, asserts nothing.

    python bench/codec.py

Side by side: our AvroCodec and the alternative Celery users know, JSON (stdlib), on the
same payloads (JSON cannot carry bytes, big ints, Decimal or datetimes exactly; it is shown
for speed only).
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamtasks.codec import AvroCodec
from streamtasks.message import TaskMessage


def best(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number  # type: ignore[arg-type]


def main() -> int:
    codec = AvroCodec()
    cases = {
        "small task (nested kwargs)": TaskMessage(
            id="7f0c7c1e-0000-4000-8000-000000000001", name="datasets.import", queue="default",
            args=[42, "sales"], kwargs={"options": {"dry_run": False, "tags": ["a", "b"]}}),
        "1M-int list argument": TaskMessage(
            id="7f0c7c1e-0000-4000-8000-000000000002", name="sum", queue="default",
            args=[list(range(1_000_000))]),
    }
    print(f"{'payload':30} {'bytes':>10} {'encode':>12} {'decode':>12}   codec")
    for label, msg in cases.items():
        number = 2000 if len(msg.args) != 1 else 3
        data = codec.encode_task(msg)
        enc = best(lambda m=msg: codec.encode_task(m), number)
        dec = best(lambda d=data: codec.decode_task(d), number)
        print(f"{label:30} {len(data):>10,} {enc * 1e6:>10,.0f}us {dec * 1e6:>10,.0f}us   avro")
        plain = {"id": msg.id, "name": msg.name, "args": msg.args, "kwargs": msg.kwargs}
        text = json.dumps(plain).encode()
        jenc = best(lambda p=plain: json.dumps(p).encode(), number)
        jdec = best(lambda t=text: json.loads(t), number)
        print(f"{'':30} {len(text):>10,} {jenc * 1e6:>10,.0f}us {jdec * 1e6:>10,.0f}us   json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
