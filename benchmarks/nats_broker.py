"""The NATS broker alone, in one process, without a receiver: what its publish paths cost,
beside the JetStream ceiling of raw nats-py on the same server.

    python benchmarks/nats_broker.py                 # medians of 3
    python benchmarks/nats_broker.py --n 20000 --concurrency 64 --rounds 5

Rows (publishes per second from ``--concurrency`` tasks, and CPU µs per publish):

* ``publish``: ``NatsBroker.publish`` (core publish + the shared confirmation round trip);
* ``persistent, not live`` / ``persistent, live``: ``publish_persistent`` (two JetStream
  publishes; then the live publish and its confirmation);
* ``raw js.publish``: nats-py's ``JetStream.publish`` to one stream (one write, awaited).

``--before DIR``: each round also runs the broker rows on the roomrouter source tree in
``DIR/src`` (another version: ``git archive <commit> src | tar -x -C DIR``) in a child
process, labelled ``(before)``, so before and after are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio


async def _timed(n: int, concurrency: int, one: Callable[[], Awaitable[object]]) -> list[float]:
    per_task = n // concurrency

    async def task() -> None:
        for _ in range(per_task):
            await one()

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(task)
    done = per_task * concurrency
    return [done / (time.perf_counter() - wall), (time.process_time() - cpu) / done * 1e6]


async def _round(args: argparse.Namespace) -> dict[str, list[float]]:
    import nats

    from roomrouter._envelope import Envelope, IdGenerator, encode_envelope
    from roomrouter.brokers import BrokerContext
    from roomrouter.brokers.nats import Names, NatsBroker

    ns = "bench" + uuid.uuid4().hex[:8]
    ids = IdGenerator()

    def frame() -> bytes:
        envelope = Envelope(id=ids.next(), room="R", origin="n", ts=0.0, payload=b"x" * 100)
        return encode_envelope(envelope)

    rows: dict[str, list[float]] = {}
    async with anyio.create_task_group() as tg:
        broker = NatsBroker(args.url)
        context = BrokerContext("n", ns, lambda r, f: None, lambda f: None, lambda: None, tg)
        await broker.start(context)
        try:
            rows["publish"] = await _timed(
                args.n, args.concurrency, lambda: broker.publish("R", b"x" * 100)
            )
            rows["persistent, not live"] = await _timed(
                args.n,
                args.concurrency,
                lambda: broker.publish_persistent("R", frame(), live=False),
            )
            rows["persistent, live"] = await _timed(
                args.n, args.concurrency, lambda: broker.publish_persistent("R", frame(), live=True)
            )
        finally:
            await broker.aclose()
            tg.cancel_scope.cancel()
    client = await nats.connect(args.url)
    try:
        js = client.jetstream()
        name = f"BENCH_{ns}"
        await js.add_stream(name=name, subjects=[f"{ns}.>"])
        rows["raw js.publish"] = await _timed(
            args.n, args.concurrency, lambda: js.publish(f"{ns}.R", b"x" * 100)
        )
        await js.delete_stream(name)
        for kind in ("STORE", "RECENT", "META"):
            await client.request(f"$JS.API.STREAM.DELETE.{Names.of(ns).stream(kind)}", b"")
    finally:
        await client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a roomrouter tree (DIR/src) to measure beside this one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(anyio.run(_round, args)), flush=True)
        return
    runs = []
    for _ in range(args.rounds):
        rows = anyio.run(_round, args)
        if args.before:
            env = {**os.environ, "PYTHONPATH": os.path.join(args.before, "src")}
            child = [sys.executable, __file__, "--child", "--url", args.url, "--n", str(args.n),
                     "--concurrency", str(args.concurrency)]  # fmt: skip
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            before = json.loads(out.stdout.strip().splitlines()[-1])
            rows.update({f"{k} (before)": v for k, v in before.items() if k != "raw js.publish"})
        runs.append(rows)
        print(json.dumps(runs[-1]), flush=True)
    print(f"\n{args.n} publishes of 100 B, {args.concurrency} tasks, medians of {args.rounds}\n")
    print("| path | publishes/s | CPU µs/publish |")
    print("|---|---|---|")
    for row in runs[0]:
        rate = statistics.median(r[row][0] for r in runs)
        cpu = statistics.median(r[row][1] for r in runs)
        print(f"| {row} | {rate:,.0f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
