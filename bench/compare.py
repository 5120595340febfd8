"""Issue 10's comparison: streamtasks, Celery + Redis, Machinery + Redis and the bare-loop
ceiling on this machine in one run; prints one table, writes bench/results/latest.json.

    python bench/compare.py [--tasks 20000] [--roundtrips 200] [--out PATH]

Same task count (a burst of N no-op tasks) and concurrency (8) for every system, warm
workers (each has run a task before any clock starts). Per system:

- end to end: the clock runs from the first send to the last result durable. streamtasks:
  the committed offsets of the queue's consumer group reach the end of the queue (a
  worker commits a record only once its row is written), and a sample of 500 rows (the
  last one among them) reads SUCCESS from Cassandra. Celery and Machinery: every result
  reads SUCCESS from the Redis backend (MGET, 500 keys at a time).
- enqueue: N / (time to send the burst, flush included), the worker running beside the
  sender; for streamtasks also with no worker running, by ``.delay()`` and by ``app.send``.
- round trip: ``--roundtrips`` sequential send + get of one task with a warm, idle worker.
- RSS: the worker's resident memory at the end (for ``--processes 2``: supervisor and
  children added up).

A system whose tools are missing is not skipped: its row says FAILED and what is missing
(``make bench-deps`` installs them), and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import BROKER, make_env, send_tasks  # noqa: E402
from streamtasks import App, Settings  # noqa: E402

CONCURRENCY = 8
CELERY_PY = ROOT / "bench" / ".venv-celery" / "bin" / "python"
MACHINERY_DIR = ROOT / "bench" / "machinery"


class Missing(RuntimeError):
    """A tool a system needs is not installed."""


# -- helpers -----------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[int((len(ordered) - 1) * p / 100)]


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def stop(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- streamtasks -------------------------------------------------------------------------

def streamtasks_burst(tasks: int, roundtrips: int, processes: int) -> dict[str, Any]:
    namespace = f"bench-cmp{processes}p-{uuid.uuid4().hex[:8]}"
    env = make_env(namespace)
    app = App("bench", settings=Settings.from_env(env=env))

    @app.task(name="bench.noop")
    def noop() -> None:
        """The worker runs bench.bench_app's bench.noop; this one only sends."""

    app.backend.migrate()
    app.ensure_queue("default")
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamtasks.cli", "worker", "--app", "bench.bench_app:app",
         "--queues", "default", "--concurrency", str(CONCURRENCY),
         "--processes", str(processes)],
        cwd=ROOT, env={**os.environ, **env})
    group = topic = app.settings.topic("default")
    probe = Consumer({"bootstrap.servers": BROKER.split("://", 1)[1], "group.id": group})
    try:
        noop.delay().get(timeout=120)  # warm: assigned, connected, has run a task
        if processes > 1:  # both children in the group before the clock starts
            time.sleep(3)
            for _ in range(20):
                noop.delay().get(timeout=60)
            roundtrips_sent = 21
        else:
            roundtrips_sent = 1
        lat = []
        for _ in range(roundtrips):
            t0 = time.perf_counter()
            noop.delay().get(timeout=10)
            lat.append((time.perf_counter() - t0) * 1000)
        roundtrips_sent += roundtrips

        ids = []
        start = time.perf_counter()
        for _ in range(tasks):
            ids.append(noop.delay().id)
        app.flush(timeout_s=300)
        sent = time.perf_counter() - start
        target = roundtrips_sent + tasks
        partitions = [TopicPartition(topic, p) for p in range(app.settings.partitions)]
        while True:
            done = sum(max(tp.offset, 0) for tp in probe.committed(partitions, timeout=10))
            if done >= target:
                break
            if time.perf_counter() - start > 600:
                raise RuntimeError(f"{done - roundtrips_sent} of {tasks} committed after 600 s")
            time.sleep(0.01)
        total = time.perf_counter() - start
        sample = [*random.sample(ids[:-1], min(499, tasks - 1)), ids[-1]]
        rows = app.backend.fetch_many(sample)
        bad = [i for i, row in zip(sample, rows, strict=True)
               if row is None or row.state != "SUCCESS"]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(sample)} sampled rows not SUCCESS")
        rss = rss_mb(process_tree(worker.pid))
    finally:
        probe.close()
        stop(worker)
        app.close()
    return {"tasks": tasks, "end_to_end_per_s": tasks / total, "enqueue_per_s": tasks / sent,
            "seconds": total, "roundtrip_p50_ms": pct(lat, 50), "roundtrip_p99_ms": pct(lat, 99),
            "rss_mb": rss, "rows_checked": len(sample)}


def streamtasks_send(tasks: int) -> dict[str, Any]:
    """Enqueue only, no worker: N ``.delay()`` + flush, then N ``app.send`` + flush."""
    app = App("bench", settings=Settings.from_env(
        env=make_env(f"bench-cmpsend-{uuid.uuid4().hex[:8]}")))

    @app.task(name="bench.noop")
    def noop() -> None:
        """Only sent."""

    app.ensure_queue("default")
    try:
        app.send("bench.noop")  # warm: connected, topic metadata known
        app.flush(timeout_s=60)
        t0 = time.perf_counter()
        for _ in range(tasks):
            noop.delay()
        app.flush(timeout_s=300)
        delay_rate = tasks / (time.perf_counter() - t0)
        return {"tasks": tasks, "delay_per_s": delay_rate, "send_per_s": send_tasks(app, tasks)}
    finally:
        app.close()


def ceiling(tasks: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ceiling.py"), "--tasks",
                          str(tasks), "--json"], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- Redis-backed systems ----------------------------------------------------------------

class Redis:
    """A throw-away redis-server on 127.0.0.1, a free port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise Missing("redis-server not found (apt-get install -y redis-server, or "
                          "make bench-deps)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.05)

    def close(self) -> None:
        stop(self.proc, timeout=10)

    def __enter__(self) -> Redis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def celery(tasks: int, roundtrips: int) -> dict[str, Any]:
    if not CELERY_PY.exists():
        raise Missing(f"{CELERY_PY} not found: Celery's own environment "
                      "(make bench-deps)")
    check = subprocess.run([str(CELERY_PY), "-c", "import celery, redis"],
                           capture_output=True, text=True)
    if check.returncode:
        raise Missing("celery[redis] not installed in bench/.venv-celery (make bench-deps): "
                      + check.stderr.strip().splitlines()[-1])
    with Redis() as redis:
        out = subprocess.run(
            [str(CELERY_PY), str(ROOT / "bench" / "celery_bench" / "run.py"), "--redis",
             redis.addr, "--tasks", str(tasks), "--roundtrips", str(roundtrips),
             "--concurrency", str(CONCURRENCY)],
            cwd=ROOT, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machinery(tasks: int, roundtrips: int, build_dir: Path) -> dict[str, Any]:
    go = shutil.which("go")
    if go is None:
        raise Missing("the go toolchain (go) not found: needed to build bench/machinery")
    binary = build_dir / "machinery-bench"
    built = subprocess.run([go, "build", "-o", str(binary), "."], cwd=MACHINERY_DIR,
                           env={**os.environ, "GOFLAGS": "-mod=mod"}, capture_output=True,
                           text=True, timeout=600)
    if built.returncode:
        raise Missing("go build of bench/machinery failed (github.com/RichardKnop/machinery/"
                      "v2 v2.0.13 from the Go module proxy): " + built.stderr.strip()[-400:])
    with Redis() as redis:
        worker = subprocess.Popen([str(binary), "worker", "-redis", redis.addr,
                                   "-concurrency", str(CONCURRENCY)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            out = subprocess.run([str(binary), "bench", "-redis", redis.addr, "-n", str(tasks),
                                  "-roundtrips", str(roundtrips)], check=True,
                                 capture_output=True, text=True, timeout=900)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["rss_mb"] = rss_mb([worker.pid])
        finally:
            stop(worker)
    return result


# -- report ------------------------------------------------------------------------------

def attempt(label: str, fn: Any, *args: Any) -> dict[str, Any]:
    print(f"-- {label} ...", file=sys.stderr, flush=True)
    try:
        return dict(fn(*args))
    except Missing as err:
        return {"error": f"missing: {err}"}
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or err.stdout or "").strip()[-400:]
        return {"error": f"{err.cmd[0]} exited {err.returncode}: {tail}"}
    except Exception as err:  # a row says what went wrong
        return {"error": f"{type(err).__name__}: {err}"}


def cell(row: dict[str, Any], key: str, fmt: str = "{:,.0f}") -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = (f"| {'system':44} | {'end to end /s':>13} | {'enqueue /s':>10} | "
            f"{'round trip p50 / p99 ms':>23} | {'RSS MB':>6} |")
    lines = [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
    for label, row in rows:
        if "error" in row:
            lines.append(f"| {label:44} | FAILED: {row['error']}")
            continue
        e2e = cell(row, "end_to_end_per_s")
        if row.get("drain_per_s") is not None:
            e2e = cell(row, "drain_per_s") + "*"
        rt = "-"
        if row.get("roundtrip_p50_ms") is not None:
            rt = f"{row['roundtrip_p50_ms']:.1f} / {row['roundtrip_p99_ms']:.1f}"
        lines.append(f"| {label:44} | {e2e:>13} | {cell(row, 'enqueue_per_s'):>10} | "
                     f"{rt:>23} | {cell(row, 'rss_mb'):>6} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in each burst")
    parser.add_argument("--roundtrips", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ns = parser.parse_args()
    n, rt = ns.tasks, ns.roundtrips

    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        results = {
            "streamtasks_1p": attempt("streamtasks, 1 worker process", streamtasks_burst,
                                      n, rt, 1),
            "streamtasks_2p": attempt("streamtasks, --processes 2", streamtasks_burst, n, rt, 2),
            "streamtasks_send": attempt("streamtasks, enqueue only", streamtasks_send, n),
            "ceiling": attempt("ceiling", ceiling, n),
            "celery_redis": attempt("Celery + Redis", celery, n, rt),
            "machinery_redis": attempt("Machinery + Redis", machinery, n, rt, Path(tmp)),
        }
    celery_version = results["celery_redis"].get("version", "5")
    rows = [
        ("streamtasks, 1 worker process (.delay())", results["streamtasks_1p"]),
        ("streamtasks, worker --processes 2 (.delay())", results["streamtasks_2p"]),
        ("streamtasks, enqueue only: .delay()",
         {"enqueue_per_s": results["streamtasks_send"].get("delay_per_s"),
          **{k: v for k, v in results["streamtasks_send"].items() if k == "error"}}),
        ("streamtasks, enqueue only: app.send",
         {"enqueue_per_s": results["streamtasks_send"].get("send_per_s"),
          **{k: v for k, v in results["streamtasks_send"].items() if k == "error"}}),
        (f"Celery {celery_version} + Redis, threads pool", results["celery_redis"]),
        ("Machinery v2.0.13 + Redis (Go)", results["machinery_redis"]),
        ("ceiling: bare Python loop, 1 INSERT/task", results["ceiling"]),
    ]
    text = table(rows)
    print()
    print(f"{n:,} no-op tasks per burst, concurrency {CONCURRENCY}, {rt} round trips; "
          f"{os.cpu_count()} cores")
    print(text)
    print("* the ceiling drains a backlog sent before its clock starts (no sender beside it)")
    one = results["streamtasks_1p"].get("end_to_end_per_s")
    ratios = {}
    for key, field in (("machinery_redis", "end_to_end_per_s"),
                       ("celery_redis", "end_to_end_per_s"), ("ceiling", "drain_per_s")):
        other = results[key].get(field)
        if one and other:
            ratios[f"streamtasks_1p_vs_{key}"] = one / other
    if ratios:
        print("streamtasks (1 process) end to end: " + ", ".join(
            f"{v:.2f}x {k.split('_vs_')[1]}" for k, v in ratios.items()))

    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/compare.py " + " ".join(sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "tasks": n, "roundtrips": rt, "concurrency": CONCURRENCY,
        "results": results, "ratios": ratios, "table": text,
    }, indent=2) + "\n")
    print(f"written {ns.out.relative_to(ROOT) if ns.out.is_relative_to(ROOT) else ns.out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
