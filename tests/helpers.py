"""Small helpers: tests wait for conditions with a deadline instead of sleeping."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable

import anyio

from roomrouter import Envelope, Member, RoomRouter
from roomrouter._envelope import IdGenerator, encode_envelope
from roomrouter.presence import PresenceEvent

__all__ = ["drain", "eventually", "forged_envelope", "receive_n", "watch_presence_into"]


async def eventually(
    check: Callable[[], object | Awaitable[object]], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Retry ``check`` (sync or async; it asserts) until it passes or ``timeout`` expires; then
    raise its last AssertionError."""
    deadline = anyio.current_time() + timeout
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                await result
            return
        except AssertionError:
            if anyio.current_time() >= deadline:
                raise
        await anyio.sleep(interval)


async def receive_n(member: Member, count: int, timeout: float = 5.0) -> list[Envelope]:
    """Receive exactly ``count`` envelopes within ``timeout``."""
    got: list[Envelope] = []
    with anyio.fail_after(timeout):
        while len(got) < count:
            got.append(await member.receive())
    return got


async def drain(member: Member, settle: float = 0.1) -> list[Envelope]:
    """Everything that arrives until nothing more came for ``settle`` seconds."""
    got: list[Envelope] = []
    while True:
        with anyio.move_on_after(settle) as scope:
            got.append(await member.receive())
        if scope.cancelled_caught:
            return got


async def watch_presence_into(
    router: RoomRouter, room: str, events: list[PresenceEvent], ready: anyio.Event
) -> None:
    """Collect ``room``'s presence events seen by ``router`` into ``events``; ``ready`` is set
    once the watch is in place. Run it in a task and cancel it."""
    async with router.watch_presence(room) as stream:
        ready.set()
        async for event in stream:
            events.append(event)


def forged_envelope(room: str, payload: bytes, origin: str = "forger") -> bytes:
    """An encoded envelope as a raw client of the broker would write it (not via publish)."""
    return encode_envelope(
        Envelope(id=IdGenerator().next(), room=room, origin=origin, ts=time.time(), payload=payload)
    )
