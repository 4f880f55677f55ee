"""A roomrouter node in its own process, for fault tests: joins rooms, prints its node id, then
waits (at most ``--lifetime`` seconds) to be killed.

    python -m tests.node_process URL NAMESPACE ROOM [ROOM ...]
"""

from __future__ import annotations

import argparse
import sys

import anyio

from roomrouter import RoomRouter


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("rooms", nargs="+")
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    router = RoomRouter.from_url(
        args.url, namespace=args.namespace, linger=0, heartbeat_interval=0.2, node_ttl=1.5
    )
    async with router:
        member = router.member("in-child")
        for room in args.rooms:
            await member.join(room)
        print(router.node_id, flush=True)
        await anyio.sleep(args.lifetime)  # bounded: the process ends by itself
    sys.exit(0)


if __name__ == "__main__":
    anyio.run(main)
