"""Local bypass vs cross-node delivery, per backend: latency and throughput.

    python benchmarks/bypass.py                       # memory and redis
    python benchmarks/bypass.py --backends memory,redis,rabbitmq,kafka --n 20000

For each backend it measures, in one process:

* **local**: one node, one member; publish -> receive latency (sequential, p50/p99) and the
  throughput of a publisher loop with a receiver draining concurrently. No broker traffic (the
  script checks the router counted zero broker publishes).
* **cross-node**: two nodes (each its own connections), the member on node B, ``--publishers``
  concurrent publisher tasks on node A; throughput from first publish to last receive, and
  publish -> receive latency (sequential round, p50/p99).

Figures are reported, not asserted. Both nodes run in the one process (one event loop, one
core), so cross-node figures include both sides' CPU; a real deployment splits them.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable

import anyio

from roomrouter import Broker, RoomRouter

Factory = Callable[[], Broker]


def _factories(args: argparse.Namespace) -> dict[str, Factory]:
    def memory() -> Broker:
        from roomrouter.brokers.memory import MemoryBroker

        return MemoryBroker("bench")

    def redis() -> Broker:
        from roomrouter.brokers.redis import RedisBroker

        return RedisBroker.from_url(args.redis_url)

    def rabbitmq() -> Broker:
        from roomrouter._urls import broker_from_url

        return broker_from_url(args.amqp_url)

    def kafka() -> Broker:
        from roomrouter._urls import broker_from_url

        return broker_from_url(args.kafka_url)

    return {"memory": memory, "redis": redis, "rabbitmq": rabbitmq, "kafka": kafka}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(publisher: RoomRouter, receiver_member: object, rounds: int) -> list[float]:
    from roomrouter import Member

    assert isinstance(receiver_member, Member)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await publisher.publish("bench", b"x" * 100)
        await receiver_member.receive()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


async def _throughput(
    publisher: RoomRouter, member: object, n: int, publishers: int, timeout: float
) -> float:
    from roomrouter import Member

    assert isinstance(member, Member)
    payload = b"y" * 100
    received = 0
    done = anyio.Event()

    async def receive() -> None:
        nonlocal received
        while received < n:
            await member.receive()
            received += 1
        done.set()

    async def publish(count: int) -> None:
        for _ in range(count):
            await publisher.publish("bench", payload)

    t0 = time.perf_counter()
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            per = n // publishers
            for i in range(publishers):
                tg.start_soon(publish, per + (1 if i < n % publishers else 0))
            await done.wait()
    elapsed = time.perf_counter() - t0
    if received < n:
        print(f"    (timeout: received {received}/{n})")
    return received / elapsed


async def bench_backend(name: str, factory: Factory, args: argparse.Namespace) -> dict[str, float]:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    opts = {"namespace": ns, "linger": 0.0, "inbox_size": args.n + 10}
    out: dict[str, float] = {}
    async with RoomRouter(factory(), **opts) as a:
        m = a.member("local")
        await m.join("bench")
        lat = await _latency(a, m, args.rounds)
        out["local_p50_us"], out["local_p99_us"] = _pct(lat, 0.5), _pct(lat, 0.99)
        out["local_msgs_per_s"] = await _throughput(a, m, args.n, 1, args.timeout)
        assert a.stats()["broker_publishes"] == 0, "local bypass used the broker"
        async with RoomRouter(factory(), **opts) as b:
            await m.leave("bench")
            remote = b.member("remote")
            await remote.join("bench")
            lat = await _latency(a, remote, args.rounds)
            out["cross_p50_us"], out["cross_p99_us"] = _pct(lat, 0.5), _pct(lat, 0.99)
            out["cross_msgs_per_s"] = await _throughput(
                a, remote, args.n, args.publishers, args.timeout
            )
            out["dropped_overflow"] = b.stats()["dropped_overflow"]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--n", type=int, default=20_000, help="messages per throughput run")
    parser.add_argument("--rounds", type=int, default=2_000, help="latency samples")
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument(
        "--kafka-url", default=os.environ.get("KAFKA_URL", "kafka://127.0.0.1:9092")
    )
    args = parser.parse_args()
    factories = _factories(args)
    rows = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(f"running {name} ...", flush=True)
        rows.append((name, await bench_backend(name, factories[name], args)))
    header = (
        f"{'backend':<10} {'local p50':>10} {'local p99':>10} {'local msg/s':>12} "
        f"{'cross p50':>10} {'cross p99':>10} {'cross msg/s':>12}"
    )
    print(f"\nn={args.n} latency rounds={args.rounds} publishers={args.publishers} "
          f"(latencies in microseconds)")  # fmt: skip
    print(header)
    for name, r in rows:
        print(
            f"{name:<10} {r['local_p50_us']:>10.0f} {r['local_p99_us']:>10.0f} "
            f"{r['local_msgs_per_s']:>12,.0f} {r['cross_p50_us']:>10.0f} "
            f"{r['cross_p99_us']:>10.0f} {r['cross_msgs_per_s']:>12,.0f}"
        )


if __name__ == "__main__":
    anyio.run(main)
