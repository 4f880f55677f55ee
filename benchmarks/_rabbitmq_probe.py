"""Cross-node probe: throughput and publish->receive latency between two nodes over a broker.

Node B (a child process: its own event loop and CPU) joins one room; node A publishes N
messages to it from many concurrent tasks, every publish confirmed by the broker. B reports
when it has received all of them. Latency is B's receive time minus the envelope's ``ts`` (A's
wall clock when ``publish`` was called; same machine, same clock), so it includes queueing in A's
publish pipeline. A second, paced run (one publisher, ``--rate`` msg/s) shows latency without
that queueing.

    python benchmarks/_rabbitmq_probe.py                          # RabbitMQ at 127.0.0.1:5672
    python benchmarks/_rabbitmq_probe.py --url redis://127.0.0.1:6379/0

Not a test: it reports figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from roomrouter import RoomRouter
from roomrouter.brokers.rabbitmq import amqp_name

ROOM = "probe"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def receiver(url: str, namespace: str, runs: list[int]) -> None:
    """Node B: join, say ready, then for each run receive ``count`` envelopes and report."""
    async with RoomRouter.from_url(
        url, namespace=namespace, inbox_size=max(runs) + 10, discovery_window=0.3
    ) as router:
        member = router.member("b")
        await member.join(ROOM)
        print("ready", flush=True)
        for count in runs:
            latencies: list[float] = []
            first = last = 0.0
            with anyio.move_on_after(120):
                while len(latencies) < count:
                    envelope = await member.receive()
                    now = time.time()
                    if not latencies:
                        first = now
                    last = now
                    latencies.append(now - envelope.ts)
            print(
                json.dumps(
                    {
                        "received": len(latencies),
                        "first": first,
                        "last": last,
                        "p50_ms": 1000 * _percentile(latencies, 0.50) if latencies else None,
                        "p99_ms": 1000 * _percentile(latencies, 0.99) if latencies else None,
                        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else None,
                        "stats": router.stats(),
                    }
                ),
                flush=True,
            )


async def publisher(url: str, count: int, tasks: int, rate: float, paced: int) -> None:
    namespace = "probe-" + uuid.uuid4().hex[:8]
    child = await anyio.open_process(
        [sys.executable, __file__, "--role", "receiver", "--url", url, "--namespace", namespace,
         "--runs", f"{count},{paced}"],
        stderr=None,
    )  # fmt: skip
    assert child.stdout is not None
    lines = BufferedByteReceiveStream(child.stdout)

    async def readline() -> str:
        return (await lines.receive_until(b"\n", 1 << 20)).decode()

    try:
        assert (await readline()).strip() == "ready"
        async with RoomRouter.from_url(url, namespace=namespace, discovery_window=0.3) as router:
            with anyio.fail_after(10):
                while not router.remote_hosts(ROOM):
                    await anyio.sleep(0.01)
            payload = b"x" * 100

            # Run 1: saturated, ``tasks`` concurrent publishers.
            per_task = [count // tasks + (1 if i < count % tasks else 0) for i in range(tasks)]
            errors = 0

            async def burst(n: int) -> None:
                nonlocal errors
                for _ in range(n):
                    try:
                        await router.publish(ROOM, payload)
                    except Exception:
                        errors += 1

            started = time.time()
            async with anyio.create_task_group() as tg:
                for n in per_task:
                    tg.start_soon(burst, n)
            confirmed = time.time()
            report = json.loads(await readline())
            elapsed = report["last"] - started
            print(f"url: {url}")
            print(
                f"saturated: {count} msgs x {len(payload)} B, {tasks} publisher tasks: "
                f"all confirmed in {confirmed - started:.3f}s "
                f"({count / (confirmed - started):,.0f} msg/s confirmed), "
                f"received {report['received']} in {elapsed:.3f}s "
                f"({report['received'] / elapsed:,.0f} msg/s end to end), "
                f"latency p50 {report['p50_ms']:.2f} ms p99 {report['p99_ms']:.2f} ms, "
                f"publish errors {errors}"
            )

            # Run 2: paced, one publisher.
            interval = 1.0 / rate
            next_at = time.perf_counter()
            for _ in range(paced):
                await router.publish(ROOM, payload)
                next_at += interval
                await anyio.sleep(max(0.0, next_at - time.perf_counter()))
            report = json.loads(await readline())
            print(
                f"paced: {paced} msgs at {rate:.0f} msg/s, one publisher: received "
                f"{report['received']}, latency p50 {report['p50_ms']:.2f} ms "
                f"p99 {report['p99_ms']:.2f} ms"
            )
            print(f"receiver stats: {report['stats']}")
    finally:
        child.terminate()
        with anyio.move_on_after(10, shield=True):
            await child.wait()
        await child.aclose()
        if url.startswith(("amqp://", "amqps://")):
            await _delete_exchanges(url, namespace)


async def _delete_exchanges(url: str, namespace: str) -> None:
    """The namespace's exchanges are durable: remove them after the probe."""
    import aiormq

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for kind in ("data", "control", "direct"):
            await channel.exchange_delete(amqp_name(namespace, kind, exchange=True))
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("-n", "--count", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--paced", type=int, default=2000)
    parser.add_argument("--role", default="publisher", choices=["publisher", "receiver"])
    parser.add_argument("--namespace", default="")
    parser.add_argument("--runs", default="")
    args = parser.parse_args()
    if args.role == "receiver":
        runs = [int(x) for x in args.runs.split(",")]
        anyio.run(receiver, args.url, args.namespace, runs)
    else:
        anyio.run(publisher, args.url, args.count, args.tasks, args.rate, args.paced)


if __name__ == "__main__":
    main()
