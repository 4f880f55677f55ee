"""Two nodes of one in-memory cluster exchange room messages — no service needed.

    python examples/two_nodes.py

Alice is connected to node A, Bob to node B. Node A serves its own members in process (local
bypass) and uses the broker only for rooms that node B hosts too.
"""

from __future__ import annotations

import anyio

from roomrouter import RoomRouter


async def main() -> None:
    async with (
        RoomRouter.from_url("memory://demo", namespace="demo", linger=0) as node_a,
        RoomRouter.from_url("memory://demo", namespace="demo", linger=0) as node_b,
    ):
        alice = node_a.member("alice")
        carol = node_a.member("carol")
        bob = node_b.member("bob")
        await alice.join("lecture-42")
        await bob.join("lecture-42")
        await carol.join("a-only")

        await node_a.publish("lecture-42", b"hello from alice", exclude=alice)
        await node_b.publish("lecture-42", b"hi alice, bob here", exclude=bob)
        await node_a.publish("a-only", b"only node A hosts this room")

        for member in (bob, alice, carol):
            envelope = await member.receive()
            print(f"{member.id:>6} got {envelope.payload.decode()!r} in {envelope.room!r}"
                  f" from node {envelope.origin}")  # fmt: skip

        print(f"cluster rooms: {sorted(await node_b.rooms())}")
        for name, node in (("A", node_a), ("B", node_b)):
            s = node.stats()
            print(
                f"node {name} ({node.node_id}): broker publishes {s['broker_publishes']}, "
                f"bypassed {s['bypassed_publishes']}, subscribed {sorted(node.subscribed_rooms)}"
            )


if __name__ == "__main__":
    anyio.run(main)
