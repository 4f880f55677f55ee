"""How long one member takes to join many rooms on RabbitMQ, and to leave them all.

    python benchmarks/rabbitmq_rooms.py                          # 1,000 rooms x 3 rounds
    python benchmarks/rabbitmq_rooms.py --rooms 2000 --rounds 5
    python benchmarks/rabbitmq_rooms.py --tree before=/tmp/old/src --tree after=src

Two routers on one RabbitMQ (``--amqp-url``); a member of the second joins ``--rooms`` rooms
at once (timed until every join returned: the broker confirmed the bindings and the first
router acknowledged the hosts), then closes (linger 0; timed until the router holds no
subscription: every binding was removed at RabbitMQ). Each ``--tree`` is a ``src`` directory
of roomrouter to measure (default: the installed one); with several, rounds alternate between
them, each measurement in a fresh process. Prints the median of the rounds per tree. Not a test.
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


async def _measure(url: str, rooms: int) -> dict[str, float]:
    import anyio

    from roomrouter import RoomRouter
    from roomrouter.brokers.rabbitmq import RabbitMQBroker

    namespace = f"bench{uuid.uuid4().hex[:8]}"
    opts = {"linger": 0.0, "discovery_window": 0.3}
    async with (
        RoomRouter(RabbitMQBroker(url), namespace=namespace, **opts),  # type: ignore[arg-type]
        RoomRouter(RabbitMQBroker(url), namespace=namespace, **opts) as b,  # type: ignore[arg-type]
    ):
        member = b.member("busy")
        names = [f"room-{i}" for i in range(rooms)]
        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for room in names:
                tg.start_soon(member.join, room)
        joined = time.perf_counter() - began
        began = time.perf_counter()
        await member.close()
        with anyio.fail_after(120):
            while b.stats()["subscribed_rooms"]:
                await anyio.sleep(0.005)
        left = time.perf_counter() - began
    return {"join": joined, "leave": left}


def _child(url: str, rooms: int) -> None:
    import anyio

    print(json.dumps(anyio.run(_measure, url, rooms)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.amqp_url, args.rooms)
        return
    trees = [t.split("=", 1) for t in args.tree] or [["installed", ""]]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, src in trees:
            env = dict(os.environ)
            if src:
                env["PYTHONPATH"] = os.path.abspath(src)
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--amqp-url", args.amqp_url,
                 "--rooms", str(args.rooms)],
                env=env, capture_output=True, text=True, timeout=600, check=True,
            )  # fmt: skip
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.rooms} rooms, median of {args.rounds} rounds (seconds)")
    print(f"{'tree':<12} {'join':>8} {'leave':>8}")
    for name, rows in results.items():
        join = statistics.median(r["join"] for r in rows)
        leave = statistics.median(r["leave"] for r in rows)
        print(f"{name:<12} {join:8.3f} {leave:8.3f}")


if __name__ == "__main__":
    main()
