"""Helpers of the conformance suites: waiting with a deadline, a recording broker context,
numbered frames."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from .._envelope import Envelope, IdGenerator, decode_envelope, encode_envelope
from .._member import Member
from ..brokers import Broker

__all__ = ["Node", "Recorder", "drain", "eventually", "numbered_frame", "receive_n", "seq_of"]


async def eventually(
    check: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,  # noqa: ASYNC109 - retried until then, not one cancel scope
    interval: float = 0.02,
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


async def receive_n(
    member: Member,
    count: int,
    timeout: float = 5.0,  # noqa: ASYNC109 - the failure says how many came
) -> list[Envelope]:
    """Receive exactly ``count`` envelopes within ``timeout`` (else TimeoutError, saying how
    many came)."""
    got: list[Envelope] = []
    try:
        with anyio.fail_after(timeout):
            while len(got) < count:
                got.append(await member.receive())
    except TimeoutError:
        raise AssertionError(
            f"{member!r} received {len(got)} of {count} envelopes within {timeout} s"
        ) from None
    return got


async def drain(member: Member, settle: float = 0.1) -> list[Envelope]:
    """Everything that arrives until nothing more came for ``settle`` seconds."""
    got: list[Envelope] = []
    while True:
        with anyio.move_on_after(settle) as scope:
            got.append(await member.receive())
        if scope.cancelled_caught:
            return got


_ids = IdGenerator()


def numbered_frame(room: str, seq: int, origin: str = "contract", size: int = 0) -> bytes:
    """An envelope frame whose payload carries ``seq`` (and ``size`` padding bytes)."""
    payload = seq.to_bytes(8, "big") + bytes(size)
    return encode_envelope(
        Envelope(id=_ids.next(), room=room, origin=origin, ts=time.time(), payload=payload)
    )


def seq_of(frame: bytes) -> int:
    """The ``seq`` of a :func:`numbered_frame` (-1 for anything else)."""
    try:
        return int.from_bytes(decode_envelope(frame).payload[:8], "big")
    except Exception:
        return -1


@dataclass(eq=False)
class Recorder:
    """The receiving side of a broker started by the suite: what its context was handed."""

    data: list[tuple[str, bytes]] = field(default_factory=list)
    direct: list[bytes] = field(default_factory=list)
    control: list[bytes] = field(default_factory=list)
    reconnects: int = 0

    def on_data(self, room: str, frame: bytes) -> None:
        self.data.append((room, frame))

    def on_direct(self, frame: bytes) -> None:
        self.direct.append(frame)

    def on_control(self, frame: bytes) -> None:
        self.control.append(frame)

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def of(self, room: str) -> list[bytes]:
        """The frames received on ``room``'s channel, in arrival order."""
        return [frame for got, frame in self.data if got == room]


@dataclass(eq=False)
class Node:
    """A broker the suite started for one node, and what it received."""

    node_id: str
    broker: Broker
    received: Recorder
