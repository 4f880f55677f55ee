"""New-room churn: how many joins+leaves per second a node takes, and whether its broker
subscriptions keep up with its rooms (linger expiry must not starve behind new rooms).

    python benchmarks/churn.py                               # memory and redis, 200 tasks, 5 s
    python benchmarks/churn.py --backends redis --nodes 2 --tasks 200 --seconds 5 --linger 1

``--tasks`` tasks each repeat: a member joins a room nobody used before, then leaves it. With
``--nodes 2`` a second node (its own connections, same process) is in the cluster, so every
first join of a room waits for its acknowledgement. Reported per backend:

* joins/s during the churn;
* rooms still subscribed when the churn stops, and how many of them are *stale* (released more
  than linger + 1 s earlier: expiry fell behind);
* seconds from the end of the churn until the subscriptions equal the rooms with members
  (empty), bounded by ``--settle`` seconds.

Figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import time
import uuid

import anyio

from roomrouter import Broker, RoomRouter


def _broker(name: str, redis_url: str) -> Broker:
    if name == "memory":
        from roomrouter.brokers.memory import MemoryBroker

        return MemoryBroker("churn")
    from roomrouter._urls import broker_from_url

    return broker_from_url(redis_url)


async def run(name: str, args: argparse.Namespace) -> dict[str, float]:
    namespace = "churn" + uuid.uuid4().hex[:8]
    opts = {"namespace": namespace, "linger": args.linger}
    routers = [RoomRouter(_broker(name, args.redis_url), **opts) for _ in range(args.nodes)]
    for router in routers:
        await router.start()
    router = routers[0]
    released: dict[str, float] = {}
    joins = 0

    async def churn(worker: int, until: float) -> None:
        nonlocal joins
        member = router.member(f"w{worker}")
        i = 0
        while time.monotonic() < until:
            i += 1
            room = f"c{worker}-{i}"
            await member.join(room)
            joins += 1
            await member.leave(room)
            released[room] = time.monotonic()

    try:
        started = time.monotonic()
        until = started + args.seconds
        async with anyio.create_task_group() as tg:
            for worker in range(args.tasks):
                tg.start_soon(churn, worker, until)
        ended = time.monotonic()
        subscribed = router.subscribed_rooms
        stale = sum(1 for r in subscribed if released.get(r, ended) < ended - args.linger - 1.0)
        settle_deadline = ended + args.settle
        while router.subscribed_rooms and time.monotonic() < settle_deadline:
            await anyio.sleep(0.05)
        settled = time.monotonic() - ended if not router.subscribed_rooms else float("inf")
        return {
            "joins_per_s": joins / (ended - started),
            "joins": joins,
            "subscribed_at_end": len(subscribed),
            "stale_at_end": stale,
            "settle_s": settled,
        }
    finally:
        for r in routers:
            await r.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--linger", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=60.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print(
        f"{'backend':8} {'nodes':>5} {'joins/s':>9} {'joins':>8} {'subscribed at end':>18} "
        f"{'stale':>7} {'settled after':>14}"
    )
    for name in args.backends.split(","):
        r = await run(name.strip(), args)
        print(
            f"{name:8} {args.nodes:>5} {r['joins_per_s']:>9,.0f} {r['joins']:>8,.0f} "
            f"{r['subscribed_at_end']:>18,.0f} {r['stale_at_end']:>7,.0f} "
            f"{r['settle_s']:>13.2f}s"
        )


if __name__ == "__main__":
    anyio.run(main)
