"""What a Python Cassandra client costs per task row: rows/s and client CPU per row.

    python bench/driver_ceiling.py [--rows 20000] [--window 256] [--rounds 3]
                                   [--variants a,b,...] [--json]

Each variant inserts ``--rows`` rows of the project's task-row shape (the ``tasks`` table
and the 21 bound values of ``streamtasks/backend/cassandra/rows.py``'s ``insert_task``:
a SUCCESS row with a result, timestamps, nulls for the lineage columns, ``USING TTL``)
through one prepared statement, ``--window`` requests in flight, at LOCAL_QUORUM. Each
runs in a fresh subprocess (so one driver's threads do not tax the next one), alternated
in one run, the order rotated each round; the table shows the median of the rounds and
every round's figure. Clock and CPU (``time.process_time``: every thread of the process,
the drivers' own I/O threads included) start after connecting, preparing and a warm-up of
500 rows, and stop when the last write is acknowledged. Parameters are built before the
clock, in the form each driver takes.

Variants (``--variants``; alternatives run with ``bench/.venv-drivers/bin/python``, see
``bench/README.md`` for the setup):

- ``project``: cassandra-driver through the project's own ``Connection`` (token-aware
  DC-aware routing, the upsert retry policy, dict rows, protocol 4, client timestamps)
  and ``store_many``'s loop: ``execute_async`` + ``add_callbacks``, a semaphore slot a row.
- ``lean-v4`` / ``lean-v5``: cassandra-driver with the cheapest settings found: no token
  awareness, tuple rows, no client timestamp (the server stamps the write), no retry
  policy object, protocol 4 or 5, the same loop.
- ``scylla-driver``: the ScyllaDB fork of cassandra-driver, ``lean-v4``'s settings.
- ``acsylla``: asyncio bindings of the DataStax C/C++ driver, a semaphore-bounded window.
- ``acsylla-batch1``: the same, each row as an UNLOGGED BATCH of one statement.
- ``scyllapy``: asyncio bindings of the ScyllaDB Rust driver, the same window.
- ``writer``: the project's acsylla row writer (``fastwrite.AcsyllaWriter``) as
  ``store_many`` uses it: rows handed ``--batch`` at a time, ``--window`` rows in flight.
- ``listing-batched`` / ``listing-single``: listing entries through that writer, ``--group``
  entries per partition key, as one UNLOGGED BATCH per partition or one INSERT per entry;
  the figures are per entry.

``writer``, ``listing-batched`` and ``listing-single`` take the writer of another source
tree as ``VARIANT@TREE`` (e.g. ``writer@/tmp/old``: A/B of two writers in one run).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / "bench" / ".venv-drivers" / "bin" / "python"
BACKEND = os.environ.get("STREAMTASKS_BACKEND", "cassandra://127.0.0.1:9042/streamtasks")
HOST, PORT = BACKEND.split("://", 1)[1].split("/", 1)[0].split(":")
KEYSPACE = BACKEND.rsplit("/", 1)[-1].split("?", 1)[0]
TTL_S = 3600
WARMUP = 500
#: variant → does it run in the alternatives' venv
VARIANTS = {"project": False, "lean-v4": False, "lean-v5": False,
            "scylla-driver": True, "acsylla": False, "acsylla-batch1": False, "scyllapy": True,
            "writer": False, "listing-batched": False, "listing-single": False}
#: The variants that write through the project's acsylla writer (``VARIANT@TREE``).
WRITER_VARIANTS = ("writer", "listing-batched", "listing-single")


def insert_cql() -> str:
    """The project's row INSERT (``_prepare_rows``), on this keyspace.

    The columns are read from ``rows.py``'s source: the alternatives' venv has none of
    the project's dependencies.
    """
    tree = ast.parse((ROOT / "streamtasks/backend/cassandra/rows.py").read_text())
    columns = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "")
                   == "_TASK_COLUMNS")
    return (f'INSERT INTO "{KEYSPACE}".tasks ({", ".join(columns)}) VALUES '
            f'({", ".join("?" for _ in columns)}) USING TTL ?')


def row_values(n: int, run: str) -> list[list[Any]]:
    """``n`` rows as the worker writes a finished no-op task (timestamps as epoch ms)."""
    now = int(time.time() * 1000)
    return [[f"{run}-{i:07d}", "bench.noop", "default", "SUCCESS", "null", b"\x00", None,
             None, None, 1, "driver-ceiling", now, now, now, now, None, None, None, None,
             None, TTL_S] for i in range(n)]


class Clock:
    """Wall clock and process CPU (every thread of the process) from now to :meth:`stop`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        """Return (wall seconds, CPU seconds) since the clock started."""
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# ------------------------------------------------------------ cassandra-driver family

def _thread_window(window: int, send: Callable[[Any, Callable[[Any], None],
                                                 Callable[[BaseException], None]], None],
                   rows: list[Any]) -> None:
    """``store_many``'s loop: a semaphore slot per row, released by the driver's callback."""
    slots = threading.BoundedSemaphore(window)
    done = threading.Event()
    left = [len(rows)]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(_rows: object) -> None:
        slots.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    def failed(err: BaseException) -> None:
        errors.append(err)
        one(None)

    for values in rows:
        slots.acquire()
        send(values, one, failed)
    if not done.wait(600):
        raise SystemExit(f"{left[0]} writes unacknowledged after 600 s")
    if errors:
        raise SystemExit(f"{len(errors)} writes failed, first: {errors[0]!r}")


def cassandra_driver(variant: str, rows: list[list[Any]], window: int) -> tuple[float, float]:
    """Run one cassandra-driver variant; return the measured (wall, CPU) seconds."""
    if variant == "project":
        sys.path.insert(0, str(ROOT))
        from streamtasks import Settings
        from streamtasks.backend.cassandra.connection import (
            CassandraOptions,
            Connection,
        )
        from streamtasks.backend.cassandra.rows import _prepare_rows
        conn = Connection(CassandraOptions.from_url(BACKEND, Settings()))
        session, statements = conn.prepared("rows", _prepare_rows)
        prepared, close = statements.insert_task, conn.close
    else:
        from cassandra import ConsistencyLevel
        from cassandra.cluster import (
            EXEC_PROFILE_DEFAULT,
            Cluster,
            ExecutionProfile,
        )
        from cassandra.policies import DCAwareRoundRobinPolicy
        from cassandra.query import tuple_factory
        profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(),
                                   consistency_level=ConsistencyLevel.LOCAL_QUORUM,
                                   row_factory=tuple_factory, request_timeout=30)
        cluster = Cluster([HOST], port=int(PORT), protocol_version=5 if variant == "lean-v5"
                          else 4, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                          compression=False)
        session = cluster.connect()
        session.use_client_timestamp = False
        prepared = session.prepare(insert_cql())
        close = cluster.shutdown

    def send(values: Any, ok: Callable[[Any], None], err: Callable[[BaseException], None],
             ) -> None:
        session.execute_async(prepared, values).add_callbacks(ok, err)

    _thread_window(window, send, rows[:WARMUP])
    clock = Clock()
    _thread_window(window, send, rows[WARMUP:])
    figures = clock.stop()
    close()
    return figures


# ------------------------------------------------------------ asyncio drivers

async def _async_timed(window: int, start: Callable[[Any], Any],
                       rows: list[Any]) -> tuple[float, float]:
    """Warm up on the first rows, then return (wall, CPU) seconds of the rest."""
    await _async_window(window, start, rows[:WARMUP])
    clock = Clock()
    await _async_window(window, start, rows[WARMUP:])
    return clock.stop()


async def _async_window(window: int, start: Callable[[Any], Any], rows: list[Any]) -> None:
    import asyncio
    slots = asyncio.Semaphore(window)
    pending: set[Any] = set()

    errors: list[BaseException] = []

    def finished(task: Any) -> None:
        pending.discard(task)
        slots.release()
        if task.exception() is not None:
            errors.append(task.exception())

    for values in rows:
        await slots.acquire()
        task = asyncio.ensure_future(start(values))
        pending.add(task)
        task.add_done_callback(finished)
    while pending:
        await asyncio.wait(list(pending))
    if errors:
        raise SystemExit(f"{len(errors)} writes failed, first: {errors[0]!r}")


async def _acsylla(rows: list[list[Any]], window: int, batch_of_one: bool = False,
                   ) -> tuple[float, float]:
    import acsylla
    cluster = acsylla.create_cluster([HOST], port=int(PORT), protocol_version=4,
                                     consistency=acsylla.Consistency.LOCAL_QUORUM,
                                     log_level="error")
    session = await cluster.create_session(keyspace=KEYSPACE)
    prepared = await session.create_prepared(insert_cql())

    async def start(values: list[Any]) -> None:
        statement = prepared.bind()
        statement.bind_list(values)
        if not batch_of_one:
            await session.execute(statement)
            return
        batch = acsylla.create_batch_unlogged()
        batch.add_statement(statement)
        await session.execute_batch(batch)

    figures = await _async_timed(window, start, rows)
    await session.close()
    return figures


async def _scyllapy(rows: list[list[Any]], window: int) -> tuple[float, float]:
    from scyllapy import Consistency, ExecutionProfile, Scylla
    scylla = Scylla([f"{HOST}:{PORT}"], keyspace=KEYSPACE, default_execution_profile=
                    ExecutionProfile(consistency=Consistency.LOCAL_QUORUM))
    await scylla.startup()
    prepared = await scylla.prepare(insert_cql())

    def start(values: list[Any]) -> Any:
        return scylla.execute(prepared, values)

    figures = await _async_timed(window, start, rows)
    await scylla.shutdown()
    return figures


def timestamps_as(rows: list[list[Any]], convert: Callable[[int], Any]) -> list[list[Any]]:
    """Convert the four timestamp values (epoch ms) to the form a driver binds.

    scyllapy binds datetimes; acsylla binds a number as epoch *seconds*.
    """
    out = []
    for row in rows:
        row = list(row)
        for i in (11, 12, 13, 14):
            row[i] = convert(row[i])
        out.append(row)
    return out


def verify(values: list[list[Any]]) -> None:
    """Read the first and last rows back (cassandra-driver or its fork, after the clock).

    A driver that bound a value wrongly (a timestamp off by 1,000) fails the run here.
    """
    from cassandra.cluster import Cluster
    cluster = Cluster([HOST], port=int(PORT))
    try:
        session = cluster.connect()
        for row in (values[0], values[-1]):
            got = session.execute(
                f'SELECT state, blobasbigint(timestampasblob(finished_at)), attempts FROM '
                f'"{KEYSPACE}".tasks WHERE task_id = %s', (row[0],)).one()
            if got is None or tuple(got) != (row[3], row[13], row[9]):
                raise SystemExit(f"row {row[0]} read back as {got}, wrote "
                                 f"{(row[3], row[13], row[9])}")
    finally:
        cluster.shutdown()


# ------------------------------------------------------------ the project's acsylla writer

def project_writer(variant: str, tree: Path, rows: list[list[Any]], window: int, batch: int,
                   group: int) -> tuple[float, float]:
    """Run a ``writer``/``listing-*`` variant with the writer of ``tree``; (wall, CPU) s."""
    sys.path.insert(0, str(tree))
    from streamtasks import Settings
    from streamtasks.backend.cassandra.connection import CassandraOptions
    from streamtasks.backend.cassandra.fastwrite import AcsyllaWriter
    from streamtasks.backend.cassandra.rows import _insert_cql

    url = BACKEND + ("&" if "?" in BACKEND else "?") + "writer=acsylla"
    options = CassandraOptions.from_url(url, Settings())
    writer = AcsyllaWriter(options, *_insert_cql(f'"{KEYSPACE}"'))
    if variant == "writer":
        calls = [(rows[i:i + batch], []) for i in range(0, len(rows), batch)]
    else:
        entries = listing_entries(rows)
        calls = [([], listing_batches(entries[i:i + batch], group, variant))
                 for i in range(0, len(entries), batch)]
    warm = WARMUP // batch + 1
    slots = threading.BoundedSemaphore(max(1, window // batch))
    errors: list[BaseException] = []

    def run(part: list[tuple[list[Any], list[Any]]]) -> None:
        left = threading.Semaphore(0)

        def done(error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
            slots.release()
            left.release()

        for task_rows, batches in part:
            slots.acquire()
            writer.write(task_rows, batches, "bench", done)
        for _ in part:
            if not left.acquire(timeout=600):
                raise SystemExit("a batch unacknowledged after 600 s")

    run(calls[:warm])
    loop_thread = writer._thread.native_id  # type: ignore[union-attr]
    clock, loop_cpu = Clock(), thread_cpu_s(loop_thread)
    run(calls[warm:])
    figures = clock.stop()
    LOOP_CPU_S.append(thread_cpu_s(loop_thread) - loop_cpu)
    writer.close()
    if errors:
        raise SystemExit(f"{len(errors)} batches failed, first: {errors[0]!r}")
    return figures


#: CPU seconds of the writer's loop thread over the timed rows (``writer`` variants).
LOOP_CPU_S: list[float] = []


def thread_cpu_s(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listing_entries(rows: list[list[Any]]) -> list[list[Any]]:
    """One listing entry per row: ``(queue, state, bucket, shard, updated, id, name, ttl)``."""
    return [[row[0].rsplit("-", 1)[0], "SUCCESS", row[14] - row[14] % 3_600_000, 0, row[14],
             row[0], row[1], TTL_S] for row in rows]


def listing_batches(entries: list[list[Any]], group: int, variant: str) -> list[list[Any]]:
    """``group`` entries per partition key; one batch each or one write per entry."""
    out = []
    for start in range(0, len(entries), group):
        part = [[*e[:3], start // group % 1_000_000, *e[4:]] for e in entries[start:start + group]]
        out.extend([part] if variant == "listing-batched" else [[e] for e in part])
    return out


# ------------------------------------------------------------ one variant, in a child

def child(variant: str, rows: int, window: int, batch: int = 1, group: int = 1,
          ) -> dict[str, Any]:
    """Run one variant here and return its figures."""
    name, _, tree = variant.partition("@")
    values = row_values(rows + WARMUP, f"dc-{name}-{uuid.uuid4().hex[:8]}")
    if name in WRITER_VARIANTS:
        elapsed, cpu = project_writer(name, Path(tree) if tree else ROOT, values, window,
                                      batch, group)
    elif variant in ("acsylla", "acsylla-batch1"):
        import asyncio
        elapsed, cpu = asyncio.run(_acsylla(timestamps_as(values, lambda ms: ms / 1000),
                                            window, batch_of_one=variant == "acsylla-batch1"))
    elif variant == "scyllapy":
        import asyncio
        from datetime import UTC, datetime
        elapsed, cpu = asyncio.run(_scyllapy(
            timestamps_as(values, lambda ms: datetime.fromtimestamp(ms / 1000, UTC)), window))
    else:
        elapsed, cpu = cassandra_driver(variant, values, window)
    if not name.startswith("listing-"):  # the listing variants write no task rows
        verify(values)
    figures = {"variant": variant, "rows_per_s": rows / elapsed,
               "cpu_us_per_row": cpu / rows * 1e6}
    if LOOP_CPU_S:
        figures["loop_cpu_us_per_row"] = LOOP_CPU_S[0] / rows * 1e6
    return figures


def measure(variant: str, rows: int, window: int, batch: int = 1, group: int = 1,
            ) -> dict[str, Any]:
    """Run ``variant`` in a fresh child process (the alternatives' venv for alternatives)."""
    python = str(VENV_PYTHON if VARIANTS[variant.partition("@")[0]] else sys.executable)
    proc = subprocess.run([python, __file__, "--child", variant, "--rows", str(rows),
                           "--window", str(window), "--batch", str(batch),
                           "--group", str(group)], capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=256,
                        help="rows (or listing entries) per write of the writer variants")
    parser.add_argument("--group", type=int, default=4,
                        help="listing entries per partition key (listing-* variants)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if min(ns.rows, ns.window, ns.rounds, ns.batch, ns.group) < 1:
        parser.error("--rows, --window, --rounds, --batch and --group must be >= 1")
    if ns.child:
        print(json.dumps(child(ns.child, ns.rows, ns.window, ns.batch, ns.group)))
        return 0
    variants = [v.strip() for v in ns.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v.partition("@")[0] not in VARIANTS
               or ("@" in v and v.partition("@")[0] not in WRITER_VARIANTS)]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if any(VARIANTS[v.partition("@")[0]] for v in variants) and not VENV_PYTHON.exists():
        parser.error(f"{VENV_PYTHON} is missing: see bench/README.md (driver ceiling)")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(ns.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            result = measure(variant, ns.rows, ns.window, ns.batch, ns.group)
            results[variant].append(result)
            loop = result.get("loop_cpu_us_per_row")
            print(f"round {r + 1}: {variant:14} {result['rows_per_s']:8,.0f} rows/s "
                  f"{result['cpu_us_per_row']:6.1f} µs CPU/row"
                  + ("" if loop is None else f", its loop thread {loop:.1f}"),
                  file=sys.stderr, flush=True)
    summary = {v: {key: statistics.median(x[key] for x in rs)
                   for key in ("rows_per_s", "cpu_us_per_row", "loop_cpu_us_per_row")
                   if key in rs[0]} | {"rounds": rs} for v, rs in results.items()}
    if ns.json:
        print(json.dumps({"rows": ns.rows, "window": ns.window, "variants": summary}))
        return 0
    print(f"{ns.rows} rows of the task-row shape, window {ns.window}, median of {ns.rounds} "
          "rounds (each round's figure after |)")
    print(f"{'variant':14} {'rows/s':>8} {'CPU µs/row':>10} | rounds: rows/s; CPU µs/row")
    for v, s in summary.items():
        rs = s["rounds"]
        print(f"{v:14} {s['rows_per_s']:8,.0f} {s['cpu_us_per_row']:10.1f} | "
              + " / ".join(f"{x['rows_per_s']:,.0f}" for x in rs) + "; "
              + " / ".join(f"{x['cpu_us_per_row']:.1f}" for x in rs)
              + ("" if "loop_cpu_us_per_row" not in s else
                 f"; loop thread {s['loop_cpu_us_per_row']:.1f} µs/row: "
                 + " / ".join(f"{x['loop_cpu_us_per_row']:.1f}" for x in rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
