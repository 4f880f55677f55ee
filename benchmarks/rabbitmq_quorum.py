"""What a quorum queue costs per persisted message, against a classic durable queue.

    python benchmarks/rabbitmq_quorum.py                       # the local RabbitMQ, 5,000 x 3
    python benchmarks/rabbitmq_quorum.py --target single=amqp://guest:guest@127.0.0.1:5672/ \\
        --target cluster=amqp://guest:guest@127.0.0.1:P1/ --pids cluster=PID1,PID2,PID3

The three-node cluster is the tests' (tests/rabbitmq_cluster.py): ``pytest -p no:xdist
tests/test_rabbitmq_cluster.py -k quorum_cost -s`` with ``ROOMROUTER_QUORUM_BENCH=5000x3``
starts it and runs this script against it and the local server.

Per target (an AMQP URL; ``--pids`` names its Erlang VMs, default: the local server's), one
process publishes ``--messages`` persistent messages (``--size`` bytes, delivery mode 2) on one
confirm channel, at most ``--window`` unconfirmed, to a direct exchange that routes each to:

* ``classic``: one classic durable queue;
* ``quorum``: one quorum queue;
* ``quorum+classic``: a quorum and a classic queue (roomrouter's storage queue and a room's
  recent cache before issue 22's last part);
* ``quorum+quorum``: two quorum queues (the storage queue and a recent cache now).

Rounds alternate the layouts (``--rounds``, medians). Reported: confirmed messages per second,
the latency from publish to confirm (p50, p99, ms) and the broker's CPU per message (user +
system time of every VM of the target, from /proc, in microseconds; on a cluster the
followers' replication is included). Each queue is deleted after its round. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import aiormq
from pamqp.commands import Basic

LAYOUTS = {
    "classic": ("classic",),
    "quorum": ("quorum",),
    "quorum+classic": ("quorum", "classic"),
    "quorum+quorum": ("quorum", "quorum"),
}
_TICK = os.sysconf("SC_CLK_TCK")


def local_server_pids() -> list[int]:
    """The Erlang VM of the system's RabbitMQ (home /var/lib/rabbitmq)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        vm = bool(args) and args[0].endswith(b"beam.smp")
        if vm and b"/var/lib/rabbitmq" in args and b"rabbit" in args and b"boot" in args:
            found.append(int(entry))
    return found


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


async def run_layout(
    url: str, pids: list[int], queues: tuple[str, ...], messages: int, size: int, window: int
) -> dict[str, float]:
    """Publish ``messages`` persistent messages routed to ``queues`` (their types); the
    confirmed rate, latency percentiles (ms) and broker CPU µs per message."""
    connection = await aiormq.connect(url)
    tag = uuid.uuid4().hex[:8]
    exchange = f"bench.quorum.{tag}"
    names = [f"bench.quorum.{tag}.{i}.{kind}" for i, kind in enumerate(queues)]
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.exchange_declare(exchange, exchange_type="direct", auto_delete=True)
        for name, kind in zip(names, queues, strict=True):
            await channel.queue_declare(name, durable=True, arguments={"x-queue-type": kind})
            await channel.queue_bind(name, exchange, routing_key="k")
        body = os.urandom(size)
        properties = Basic.Properties(delivery_mode=2)
        latencies: list[float] = []
        slots = asyncio.Semaphore(window)

        async def one() -> None:
            async with slots:
                began = time.perf_counter()
                await channel.basic_publish(
                    body, exchange=exchange, routing_key="k", properties=properties
                )
                latencies.append(time.perf_counter() - began)

        # Warm up (the queues' processes, the channel), then measure.
        await asyncio.gather(*(one() for _ in range(min(200, messages))))
        latencies.clear()
        cpu, wall = _cpu_seconds(pids), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(messages)))
        wall, cpu = time.perf_counter() - wall, _cpu_seconds(pids) - cpu
        for name in names:
            declared = await channel.queue_declare(name, passive=True)
            assert declared.message_count == messages + min(200, messages), declared
        latencies.sort()
        return {
            "rate": messages / wall,
            "p50": latencies[len(latencies) // 2] * 1e3,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
            "cpu_us": cpu / messages * 1e6,
        }
    finally:
        try:
            cleanup = await connection.channel()
            for name in names:
                await cleanup.queue_delete(name)
            await cleanup.exchange_delete(exchange)
        finally:
            await connection.close()


async def main_async(args: argparse.Namespace) -> None:
    targets = dict(t.split("=", 1) for t in args.target) or {
        "single": "amqp://guest:guest@127.0.0.1:5672/"
    }
    pids = {k: [int(p) for p in v.split(",")] for k, v in (p.split("=", 1) for p in args.pids)}
    for name in targets:
        pids.setdefault(name, local_server_pids())
        if not pids[name]:
            raise SystemExit(f"no broker pid for {name}: give --pids {name}=PID,...")
    layouts = args.layouts.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):  # interleaved: every layout on every target, round by round
        for target, url in targets.items():
            for layout in layouts:
                row = await run_layout(
                    url, pids[target], LAYOUTS[layout], args.messages, args.size, args.window
                )
                results.setdefault((target, layout), []).append(row)
    print(
        f"{args.messages} persistent {args.size}-byte messages, window {args.window}, "
        f"median of {args.rounds} rounds"
    )
    print("| target | queues | confirmed msg/s | p50 ms | p99 ms | broker CPU µs/msg |")
    print("|---|---|---:|---:|---:|---:|")
    for (target, layout), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {target} | {layout} | {med['rate']:,.0f} | {med['p50']:.2f} | "
              f"{med['p99']:.2f} | {med['cpu_us']:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", default=[], metavar="NAME=AMQP_URL")
    parser.add_argument("--pids", action="append", default=[], metavar="NAME=PID,PID")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
