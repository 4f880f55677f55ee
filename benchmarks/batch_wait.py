"""The latency a delivery batch delay adds, alone: publish to receive of one member, paced.

    python benchmarks/batch_wait.py                       # delays 0 and 0.005, 1,000 publishes
    python benchmarks/batch_wait.py --delays 0,0.002,0.005,0.010 --count 2000

One process, one router on the memory broker, ``--members`` members in one room, each drained
by its own task with ``async for``; one publisher publishes every 7-13 ms (random, so a
publish is never in step with the loop's timers), always into an empty batch. Reported per
delay: p50 / p99 / max of publish -> receive of the first member the flush wakes (the batch's
wait and one task switch, without the fan-out's length) and of the last. The delay's cost is
the difference to the row of delay 0 in the same run; the delay is a bound on the batch's wait
(the timer is set 1 ms short, see src/roomrouter/_batching.py), so on a loop with nothing else
to do that difference stays within the delay.

Figures are reported, not asserted; on a shared machine run it when nothing else runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import anyio

from roomrouter import RoomRouter
from roomrouter.brokers.memory import MemoryBroker

ROOM = "hall"


def _row(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1e3:6.2f} {p99 * 1e3:6.2f} {ordered[-1] * 1e3:6.2f}"


async def _measure(delay: float, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    first: list[float] = []
    last: list[float] = []
    rnd = random.Random(1)
    router = RoomRouter(MemoryBroker("wait"), linger=0, delivery_batch_delay=delay)
    async with router, anyio.create_task_group() as tg:
        members = [router.member(f"m{i}") for i in range(args.members)]

        async def drain(member: object, into: list[float] | None) -> None:
            async for envelope in member:  # type: ignore[attr-defined]
                if into is not None:
                    into.append(time.time() - envelope.ts)

        for i, member in enumerate(members):
            await member.join(ROOM)
            into = first if i == 0 else last if i == len(members) - 1 else None
            tg.start_soon(drain, member, into)
        await anyio.sleep(0.1)
        for _ in range(args.count):
            await router.publish(ROOM, b"x" * 100)
            await anyio.sleep(rnd.uniform(0.007, 0.013))
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    return first, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,0.005", help="comma-separated seconds")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--count", type=int, default=1_000)
    args = parser.parse_args()
    print(f"{args.members} members, {args.count} publishes every 7-13 ms; ms p50 p99 max")
    print(f"{'delay ms':>8}  {'first member':>20}  {'last member':>20}")
    for delay in (float(d) for d in args.delays.split(",")):
        first, last = anyio.run(_measure, delay, args)
        print(f"{delay * 1e3:>8g}  {_row(first):>20}  {_row(last):>20}", flush=True)


if __name__ == "__main__":
    main()
