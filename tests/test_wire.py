"""What travels on the wire, on every backend: frames forged by a raw client of the broker, names
that must stay apart between namespaces, and caller-chosen message ids."""

from __future__ import annotations

import time

import pytest

from roomrouter import Envelope
from roomrouter._envelope import IdGenerator, encode_envelope

from .backends import Backend
from .conftest import ClusterFactory
from .helpers import drain, eventually, receive_n

pytestmark = pytest.mark.anyio

LONG_ROOM = "L" * 300  # RabbitMQ hashes routing keys of rooms this long


def _forged(room: str, payload: bytes, origin: str = "forger") -> bytes:
    return encode_envelope(
        Envelope(id=IdGenerator().next(), room=room, origin=origin, ts=time.time(), payload=payload)
    )


async def test_an_envelope_is_delivered_only_in_the_room_it_came_on(
    backend: Backend, cluster: ClusterFactory
) -> None:
    a, b = await cluster(2)
    victim, carrier, long_member = b.member("victim"), b.member("carrier"), b.member("long")
    await victim.join("victim")
    await carrier.join("r1")
    await long_member.join(LONG_ROOM)
    received = b.stats()["broker_received"]
    # Envelopes that name another room than the channel they are sent on: a forger with
    # publish rights on r1 (or on a room with a hashed key) must not reach the members of victim.
    await backend.inject(b, "r1", _forged("victim", b"forged on r1"))
    await backend.inject(b, LONG_ROOM, _forged("victim", b"forged on the long room"))
    await backend.inject(b, "r1", _forged(LONG_ROOM, b"forged for the long room"))
    # Garbage from a raw client is a counted drop too, and nothing good is lost around it.
    for junk in (b"", b"\xff\xfe garbage", b"\xc1"):
        await backend.inject(b, "r1", junk)
    # A well-formed envelope of the right room from a raw client is delivered (the check is
    # the room, not the publisher).
    await backend.inject(b, "r1", _forged("r1", b"honest raw"))
    await eventually(lambda: _assert_eq(b.stats()["broker_received"] - received, 7))
    for room in ("victim", "r1", LONG_ROOM):
        await a.publish(room, b"real " + room[:8].encode())
    assert [e.payload for e in await receive_n(victim, 1)] == [b"real victim"]
    assert [e.payload for e in await receive_n(carrier, 2)] == [b"honest raw", b"real r1"]
    assert [e.payload for e in await receive_n(long_member, 1)] == [b"real LLLLLLLL"]
    for member in (victim, carrier, long_member):
        assert await drain(member) == []
    stats = b.stats()
    assert (stats["dropped_room_mismatch"], stats["dropped_decode"]) == (3, 3)
    assert stats["task_restarts"] == 0


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected, (actual, expected)
