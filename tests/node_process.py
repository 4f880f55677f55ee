"""A roomrouter node in its own process, for fault tests: joins rooms, prints its node id, then
waits (at most ``--lifetime`` seconds) to be killed.

    python -m tests.node_process URL NAMESPACE ROOM [ROOM ...]
        [--print-received]          print "got ROOM PAYLOAD" for every envelope received
        [--presence URL]            keep presence in that store
        [--stats]                   on each line "stats" on stdin, print the router's stats
                                    as one JSON line
        [--stall ROOM:SECONDS]      on the line "stall" on stdin: leave ROOM, then block the
                                    event loop for SECONDS (a synchronous sleep, like a GC
                                    pause or a blocking call), then print "resumed"
        [--stall-publish SECONDS:ROOM[,ROOM...]]
                                    on the line "stall" on stdin: print "stalling", block the
                                    event loop for SECONDS, then at once (no yield before)
                                    publish "from-stalled" to each ROOM, then print "resumed"
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import anyio

from roomrouter import Member, RoomRouter


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("rooms", nargs="+")
    parser.add_argument("--lifetime", type=float, default=60.0)
    parser.add_argument("--print-received", action="store_true")
    parser.add_argument("--stall", default=None)
    parser.add_argument("--stall-publish", default=None)
    parser.add_argument("--presence", default=None, help="presence store URL")
    parser.add_argument("--stats", action="store_true")
    args = parser.parse_args()
    router = RoomRouter.from_url(
        args.url, namespace=args.namespace, linger=0, heartbeat_interval=0.2, node_ttl=1.5,
        presence=args.presence,
    )  # fmt: skip
    async with router, anyio.create_task_group() as tg:
        member = router.member("in-child", info={"name": "child"})
        for room in args.rooms:
            await member.join(room)
        print(router.node_id, flush=True)
        if args.print_received:
            tg.start_soon(_print_received, member)
        if args.stats:
            tg.start_soon(_print_stats_on_request, router)
        if args.stall:
            room, _, seconds = args.stall.rpartition(":")
            tg.start_soon(_stall_on_request, member, room, float(seconds))
        if args.stall_publish:
            seconds, _, rooms = args.stall_publish.partition(":")
            tg.start_soon(_stall_then_publish, router, float(seconds), rooms.split(","))
        await anyio.sleep(args.lifetime)  # bounded: the process ends by itself
        tg.cancel_scope.cancel()
    sys.exit(0)


async def _print_received(member: Member) -> None:
    async for envelope in member:
        print(f"got {envelope.room} {envelope.payload.decode()}", flush=True)


async def _stall_on_request(member: Member, room: str, seconds: float) -> None:
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if line.strip() != "stall":
        return
    await member.leave(room)
    time.sleep(seconds)  # noqa: ASYNC251 - the point: the event loop stops for this long
    print("resumed", flush=True)


async def _stall_then_publish(router: RoomRouter, seconds: float, rooms: list[str]) -> None:
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if line.strip() != "stall":
        return
    print("stalling", flush=True)
    time.sleep(seconds)  # noqa: ASYNC251 - the point: the event loop stops for this long
    # What a request handler does after a blocking call: publish, before the loop read
    # anything (the control frames sent meanwhile are still unread).
    for room in rooms:
        await router.publish(room, b"from-stalled")
    print("resumed", flush=True)


async def _print_stats_on_request(router: RoomRouter) -> None:
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        if line.strip() == "stats":
            print(json.dumps(router.stats()), flush=True)


if __name__ == "__main__":
    anyio.run(main)
