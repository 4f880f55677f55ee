"""What each Socket.IO node receives from the broker: python-socketio's AsyncRedisManager vs
RoomRouterManager, for N nodes that each host one room.

    python benchmarks/socketio_fanout.py                          # 4 nodes, Redis
    python benchmarks/socketio_fanout.py --nodes 4 --messages 200 --redis redis://127.0.0.1:6379/0

Each node is a real ``socketio.AsyncServer`` in this process with one client registered in its
own room (the server's packet sending is replaced by a counter: no sockets, so the figures are
the managers' alone). Every node emits ``--messages`` events to every room. Reported per node:
messages the manager received from the broker, and how many of them were for the room it
hosts. Counted, not timed: the figures are exact and do not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import socketio

from roomrouter.integrations.socketio import RoomRouterManager


class CountingServer(socketio.AsyncServer):  # type: ignore[misc]
    """Counts the packets it would send to its clients instead of sending them."""

    delivered = 0

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        self.delivered += 1


class CountingRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's Redis manager, counting what its listener reads from the channel."""

    received = 0
    for_my_room = 0
    my_room: str = ""

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            self.received += 1
            if isinstance(message, bytes | str) and f'"room": "{self.my_room}"' in str(message):
                self.for_my_room += 1
            yield message


async def _wait(condition: Any, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def run(managers: list[Any], servers: list[CountingServer], messages: int) -> None:
    rooms = [f"room-{i}" for i in range(len(servers))]
    for i, manager in enumerate(managers):
        sid = await manager.connect(f"eio-{i}", "/")
        await manager.enter_room(sid, "/", rooms[i])
    for server in servers:
        for room in rooms:
            for k in range(messages):
                await server.emit("m", k, to=room)
    expected = messages * len(servers)  # each node's client gets every node's emits to its room
    await _wait(lambda: all(s.delivered >= expected for s in servers))
    await asyncio.sleep(0.5)  # anything late would still be counted
    assert all(s.delivered == expected for s in servers), [s.delivered for s in servers]


async def python_socketio(url: str, nodes: int, messages: int) -> list[tuple[int, int]]:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    managers = [CountingRedisManager(url, channel=channel) for _ in range(nodes)]
    servers = [CountingServer(client_manager=m, async_mode="asgi") for m in managers]
    for i, manager in enumerate(managers):
        manager.my_room = f"room-{i}"
        manager.initialize()
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    while (await client.pubsub_numsub(channel))[0][1] < nodes:
        await asyncio.sleep(0.01)
    await client.aclose()
    await run(managers, servers, messages)
    for server in servers:
        await server.shutdown()
    for manager in managers:
        manager.thread.cancel()
    return [(m.received, m.for_my_room) for m in managers]


async def roomrouter(url: str, nodes: int, messages: int) -> list[tuple[int, int]]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    managers = [RoomRouterManager(url, namespace=namespace, linger=0) for _ in range(nodes)]
    servers = [CountingServer(client_manager=m, async_mode="asgi") for m in managers]
    for manager in managers:
        manager.initialize()
        await manager.start()
    before = [m.router.stats()["broker_received"] for m in managers]
    await run(managers, servers, messages)
    # Every envelope a node receives is of a room it hosts (the router drops others and counts
    # them in dropped_not_hosted; the check below says there were none).
    counts = []
    for manager, start in zip(managers, before, strict=True):
        stats = manager.router.stats()
        assert stats["dropped_not_hosted"] == 0
        received = stats["broker_received"] - start
        counts.append((received, received))
    for server in servers:
        await server.shutdown()
    return counts


def report(name: str, counts: list[tuple[int, int]]) -> None:
    for i, (received, useful) in enumerate(counts):
        share = 100 * (received - useful) / received if received else 0.0
        print(
            f"{name:<28} node {i}: received {received:>6}, for its room {useful:>6} "
            f"({share:.0f}% for rooms it does not host)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--messages", type=int, default=200, help="per node and room")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    total = args.nodes * args.nodes * args.messages
    print(f"{args.nodes} nodes, one room each, {total} emits ({args.messages} per node and room)")
    report("python-socketio Redis", await python_socketio(args.redis, args.nodes, args.messages))
    report("roomrouter (redis)", await roomrouter(args.redis, args.nodes, args.messages))


if __name__ == "__main__":
    asyncio.run(main())
