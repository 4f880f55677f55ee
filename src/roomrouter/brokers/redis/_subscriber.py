"""One pub/sub connection, as both Redis brokers hold them: a single Redis has one per node,
a Redis Cluster one per shard master in use.

(Un)subscribe commands go out in one write and come back as confirmations that the
connection's reader passes to :meth:`Subscriber.on_reply`, which settles the waiting
:class:`Batch` and keeps :attr:`Subscriber.channels` (what the server confirmed). Sharded
pub/sub (``SSUBSCRIBE``) takes only channels of one slot per command, so on a cluster a batch
is one command per slot (``slotted``). The server may drop shard channels on its own (their
slot moved away): ``on_dropped`` hears of that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from ..._errors import BrokerUnavailable, describe
from ._common import NETWORK_ERRORS, pack, quiet_disconnect

__all__ = ["Batch", "Subscriber"]

_CHUNK = 1000  # channels per command where one command may take any
_MESSAGES = (b"message", b"smessage")
_SUBSCRIBED = (b"subscribe", b"ssubscribe")
_UNSUBSCRIBED = (b"unsubscribe", b"sunsubscribe")


@dataclass(slots=True)
class Batch:
    """A (S)SUBSCRIBE or (S)UNSUBSCRIBE batch waiting for the server's confirmations."""

    remaining: int
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def confirm(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class Subscriber:
    """The pub/sub connection ``conn`` to server ``node`` (see the module docstring)."""

    def __init__(
        self,
        node: str,
        conn: Connection,
        *,
        sharded: bool,
        slotted: bool = False,
        on_dropped: Callable[[Subscriber, bytes], object] | None = None,
    ) -> None:
        self.node = node
        self.conn = conn
        self.slotted = slotted
        self._sub, self._unsub = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._on_dropped = on_dropped
        #: Channels the server confirmed on this connection.
        self.channels: set[bytes] = set()
        self._waiting: dict[bool, dict[bytes, deque[Batch]]] = {True: {}, False: {}}
        self.closing = False
        self.last_read = anyio.current_time()
        #: When this idle connection was PINGed (None: not waiting for a PONG).
        self.pinged_at: float | None = None

    async def send(self, subscribe: bool, channels: list[bytes], seconds: float) -> Batch:
        """Send (S)SUBSCRIBE (``subscribe``) or (S)UNSUBSCRIBE for ``channels`` in one write,
        within ``seconds``, and return the batch the reader confirms. A failed write closes
        the connection (its reader then sees it) and raises ``BrokerUnavailable``."""
        command = self._sub if subscribe else self._unsub
        table = self._waiting[subscribe]
        batch = Batch(len(channels))
        groups: list[list[bytes]]
        if self.slotted:
            by_slot: dict[int, list[bytes]] = {}
            for channel in channels:
                by_slot.setdefault(key_slot(channel), []).append(channel)
            groups = list(by_slot.values())
        else:
            groups = [channels[i : i + _CHUNK] for i in range(0, len(channels), _CHUNK)]
        for channel in channels:
            table.setdefault(channel, deque()).append(batch)
        try:
            with anyio.fail_after(seconds):
                await self.conn.send_packed_command(
                    b"".join(pack(command, *group) for group in groups), check_health=False
                )
        except NETWORK_ERRORS as exc:
            batch.fail(exc)
            await quiet_disconnect(self.conn)
            raise BrokerUnavailable(f"Redis {command.decode()} failed: {describe(exc)}") from exc
        return batch

    def on_reply(self, reply: Any) -> tuple[bytes, bytes] | None:
        """Account for one reply read on the connection: a message is returned as ``(channel,
        data)``; a confirmation settles its batch; anything else (PONG) is None."""
        self.last_read = anyio.current_time()
        if not isinstance(reply, list) or len(reply) < 3:
            return None
        kind, channel = reply[0], reply[1]
        if kind in _MESSAGES:
            return channel, reply[2]
        if kind in _SUBSCRIBED:
            self.channels.add(channel)
            self._confirm(True, channel)
        elif kind in _UNSUBSCRIBED:
            self.channels.discard(channel)
            if not self._confirm(False, channel) and self._on_dropped is not None:
                self._on_dropped(self, channel)  # not asked for: the server dropped it
        return None

    def _confirm(self, subscribe: bool, channel: bytes) -> bool:
        table = self._waiting[subscribe]
        waiters = table.get(channel)
        if not waiters:
            return False
        waiters.popleft().confirm()
        if not waiters:
            del table[channel]
        return True

    @property
    def confirming(self) -> bool:
        """A subscribe batch is waiting for the server."""
        return bool(self._waiting[True])

    def fail(self, error: BaseException) -> None:
        """Fail every batch waiting on this connection (it was lost or closed)."""
        for table in self._waiting.values():
            for waiters in table.values():
                for batch in waiters:
                    batch.fail(error)
            table.clear()

    async def ping(self) -> None:
        """PING (an idle connection's check: its answer moves :attr:`last_read`)."""
        try:
            await self.conn.send_packed_command(pack(b"PING"), check_health=False)
        except NETWORK_ERRORS:
            pass  # the reader sees the failure

    async def close(self, error: BaseException) -> None:
        self.closing = True
        self.fail(error)
        await quiet_disconnect(self.conn)
