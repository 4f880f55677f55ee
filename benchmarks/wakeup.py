"""What one member wake-up and one delivery cost, in microseconds (issue 23).

    python benchmarks/wakeup.py                          # 10,000 members, asyncio and uvloop
    python benchmarks/wakeup.py --members 2000 --batches 1,4,16,64 --rounds 3

One process, one router on the memory broker (no broker in the measured path), ``--members``
members in one room, each drained by a task of its own with ``async for`` (or
``receive_batch()`` with ``--api batch``), as an app's per-connection send loop would. With
delivery batching on (a delay no run reaches), ``k`` envelopes are published into the room's
batch and flushed at once with ``router.flush_batches()``; the clock runs from the flush to
the moment the last member took its ``k``-th envelope. That time, divided by the members, is
one member's cost for a batch of ``k``: a straight line in ``k`` whose value at 0 is the
**wake-up** (the flush's queueing of the batch, the future's result, the loop's handle and
the task's step into and out of the member's loop) and whose slope is the cost of one more
**delivery** (the member's ``__anext__`` and the app's loop body). The line is fitted by
least squares over ``--batches``; the median of ``--rounds`` per point is used.

Beside it, the per-envelope path the router takes without a delay: ``k`` publishes, each
followed by a yield (an awaited publish does that), so every member is woken per envelope.

Figures are reported, not asserted; on a shared machine run it when nothing else runs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel

from roomrouter import MemberClosed, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

ROOM = "hall"
LONG = 60.0  # a batch delay no run reaches: the flush is the benchmark's


async def _measure(args: argparse.Namespace, batched: bool) -> dict[int, float]:
    """Median seconds per point ``k`` (from the flush, or the first publish, to the last
    member's ``k``-th envelope)."""
    members_n = args.members
    router = RoomRouter(
        MemoryBroker("wakeup"),
        linger=0,
        inbox_size=max(args.batches) * 2,
        delivery_batch_delay=LONG if batched else 0,
        delivery_batch_max=max(args.batches),
    )
    remaining = 0
    done = anyio.Event()

    async def drain(member: Any) -> None:
        nonlocal remaining, done
        if args.api == "batch":
            try:
                while True:
                    batch = await member.receive_batch()
                    remaining -= len(batch)
                    if remaining == 0:
                        done.set()
            except MemberClosed:
                return
        async for _ in member:
            remaining -= 1
            if remaining == 0:
                done.set()

    times: dict[int, list[float]] = {k: [] for k in args.batches}
    payload = b"x" * 100
    async with router, anyio.create_task_group() as tg:
        for i in range(members_n):
            member = router.member(f"m{i}")
            await member.join(ROOM)
            tg.start_soon(drain, member)
        await anyio.sleep(0.1)
        gc.collect()
        for _ in range(args.rounds):
            for k in args.batches:
                remaining, done = members_n * k, anyio.Event()
                if batched:
                    for _ in range(k):
                        await router.publish(ROOM, payload)
                    started = time.perf_counter()
                    router.flush_batches(ROOM)
                else:
                    started = time.perf_counter()
                    for _ in range(k):
                        await router.publish(ROOM, payload)
                        await anyio.lowlevel.checkpoint()  # the members run per envelope
                await done.wait()
                times[k].append(time.perf_counter() - started)
        tg.cancel_scope.cancel()
    return {k: statistics.median(values) for k, values in times.items()}


def _fit(points: dict[int, float], members: int) -> tuple[float, float]:
    """Least-squares (intercept, slope) of µs per member against k."""
    xs = list(points)
    ys = [points[k] / members * 1e6 for k in xs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument(
        "--batches", type=lambda s: [int(k) for k in s.split(",")], default=[1, 4, 16, 64]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--api", choices=("receive", "batch"), default="receive")
    parser.add_argument("--loops", default="asyncio,uvloop", help="comma-separated")
    parser.add_argument(
        "--paths",
        default="batch,envelope",
        help="comma-separated: batch, envelope (envelope alone runs on trees without "
        "router.flush_batches, for a before/after of the delay-0 path)",
    )
    args = parser.parse_args()
    print(
        f"{args.members:,} members drain with {args.api}; batches {args.batches}; "
        f"medians of {args.rounds}; Python {sys.version.split()[0]}"
    )
    print(
        f"{'loop':<8} {'path':<22} "
        + " ".join(f"{f'k={k} µs/m':>11}" for k in args.batches)
        + f" {'wake-up µs':>11} {'delivery µs':>12}"
    )
    for loop in args.loops.split(","):
        options = {"use_uvloop": loop == "uvloop"}
        for batched in [path == "batch" for path in args.paths.split(",")]:
            points = anyio.run(_measure, args, batched, backend_options=options)
            wake, delivery = _fit(points, args.members)
            path = "batch (one wake-up)" if batched else "per envelope (delay 0)"
            cells = " ".join(f"{points[k] / args.members * 1e6:>11.2f}" for k in args.batches)
            print(f"{loop:<8} {path:<22} {cells} {wake:>11.2f} {delivery:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
