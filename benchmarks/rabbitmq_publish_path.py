"""What the RabbitMQ backend's publish path costs, against aiormq's public ``basic_publish``.

    python benchmarks/rabbitmq_publish_path.py                  # 30,000 publishes x 3 rounds
    python benchmarks/rabbitmq_publish_path.py --publishes 100000 --rounds 5

One process, one RabbitMQ (``--amqp-url``), ``--tasks`` concurrent publisher tasks, each
awaiting RabbitMQ's confirm of every publish (``--size``-byte frames, to a topic exchange
nothing is bound to). Three publish paths, interleaved round by round:

* **roomrouter**: ``RabbitMQBroker.publish`` (the transport core's outbox; frames packed in
  batches and written on aiormq's connection through the ``_aiormq`` adapter);
* **basic_publish**: aiormq's public ``Channel.basic_publish`` on a confirm channel (what the
  backend would do without aiormq's internals);
* **basic_publish(wait=False)**: the same without waiting for the writer to drain.

Prints, per path, the median of the rounds: confirmed publishes per second and process CPU
microseconds per publish (the CPU figure moves less with other load on the host). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aiormq

from roomrouter import RoomRouter
from roomrouter.brokers.rabbitmq import RabbitMQBroker


async def _run(
    publish: Callable[[], Awaitable[object]], total: int, tasks: int
) -> tuple[float, float]:
    per_task = total // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await publish()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    count = per_task * tasks
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) / count * 1e6


async def _roomrouter(url: str, frame: bytes, total: int, tasks: int) -> tuple[float, float]:
    async with RoomRouter(RabbitMQBroker(url), namespace=f"bench{uuid.uuid4().hex[:8]}") as router:
        broker = router.broker
        return await _run(lambda: broker.publish("R", frame), total, tasks)


async def _basic_publish(
    url: str, frame: bytes, total: int, tasks: int, wait: bool
) -> tuple[float, float]:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = f"bench.publish-path.{uuid.uuid4().hex[:8]}"
        await channel.exchange_declare(exchange, exchange_type="topic", auto_delete=False)
        try:
            return await _run(
                lambda: channel.basic_publish(frame, exchange=exchange, routing_key="k", wait=wait),
                total,
                tasks,
            )
        finally:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--publishes", type=int, default=30_000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    frame = b"x" * args.size
    paths: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "roomrouter": lambda: _roomrouter(args.amqp_url, frame, args.publishes, args.tasks),
        "basic_publish": lambda: _basic_publish(
            args.amqp_url, frame, args.publishes, args.tasks, True
        ),
        "basic_publish(wait=False)": lambda: _basic_publish(
            args.amqp_url, frame, args.publishes, args.tasks, False
        ),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            results[name].append(await run())
    version = importlib.metadata.version("aiormq")
    print(
        f"{args.publishes:,} confirmed publishes of {args.size} B, {args.tasks} tasks, "
        f"median of {args.rounds} interleaved rounds (aiormq {version})"
    )
    for name, figures in results.items():
        rate = statistics.median(r for r, _ in figures)
        cpu = statistics.median(c for _, c in figures)
        rounds = ", ".join(f"{r:,.0f}" for r, _ in figures)
        print(f"  {name:26s} {rate:>9,.0f} msg/s  {cpu:6.1f} us CPU/publish  (rounds: {rounds})")


if __name__ == "__main__":
    asyncio.run(main())
