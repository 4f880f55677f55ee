"""The one Redis publisher: a *lane* is a publisher connection to one server (a single Redis
has one lane, a Redis Cluster one per shard master) with its :class:`~.transport.Outbox`.

The lane's sender task takes everything queued while the previous round trip was in flight
and sends it as one pipeline (auto-pipelining): concurrent publishers reach the pipelined rate
instead of one round trip each. What a caller is told is the transport core's settle rule
(docs/architecture.md, guarantees 3 and 4): a publish that fails before its bytes were written
is "not sent" (:class:`~roomrouter.BrokerUnavailable`), one whose bytes were written and whose
answer never came is :class:`~roomrouter.PublishOutcomeUnknown`.

Answers, the same for both brokers:

* a reply is the publish's result (for a ``MULTI ... EXEC``: the last command's);
* a refusal (``-ERR ...``) is :class:`~roomrouter.BrokerUnavailable`: Redis ran nothing of it;
* a transaction that ran with an error inside is :class:`~roomrouter.PublishOutcomeUnknown`:
  Redis does not undo the other commands of a transaction, so part of it happened;
* a redirection (``-MOVED``/``-ASK``, Redis Cluster) is an answer without effect (a
  transaction holding one is discarded): the lane hands the publish to ``redirect``, which
  queues it on the node the answer names; the publish counts as not sent until sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ResponseError

from ..._errors import BrokerUnavailable, PublishOutcomeUnknown
from ..transport import Outbox, Send
from ._common import NETWORK_ERRORS, pack, quiet_disconnect

__all__ = ["Command", "Lane"]

log = logging.getLogger("roomrouter.redis")

_ASKING = pack(b"ASKING")


class Command:
    """One publish: pre-encoded command(s) and how many replies they produce. ``slot`` routes
    it on a cluster, unless a redirection named the node to send it to (``target``;
    ``asking``: an ASK, so it goes with ``ASKING`` in front)."""

    __slots__ = ("asking", "packed", "redirects", "replies", "slot", "target")

    def __init__(self, packed: bytes, replies: int, slot: int = 0) -> None:
        self.packed = packed
        self.replies = replies
        self.slot = slot
        self.redirects = 0
        self.target: str | None = None
        self.asking = False


#: ``redirect(send, answer)``: queue ``send`` (released from its lane) where ``answer`` says.
Redirect = Callable[[Send[Command], AskError], None]


class Lane:
    """The publisher connection to one server (``node``, ``host:port``), made by ``connect``
    when a batch needs it and dropped when it fails, and its outbox. ``on_failure`` is called
    after a failed round trip (a cluster reloads its slot map: the shard may have failed
    over); ``redirect`` takes MOVED/ASK answers (None: they are refusals)."""

    def __init__(
        self,
        node: str,
        connect: Callable[[], Awaitable[Connection]],
        timeout: float,
        *,
        service: str = "Redis publish",
        on_failure: Callable[[], object] | None = None,
        redirect: Redirect | None = None,
    ) -> None:
        self.node = node
        self.outbox: Outbox[Command] = Outbox(service, timeout, errors=NETWORK_ERRORS)
        self.conn: Connection | None = None
        self._connect = connect
        self._on_failure = on_failure
        self._redirect = redirect

    def submit(self, command: Command) -> Any:
        """Queue ``command`` (no ``await``: call order is send order); the future of its
        answer."""
        return self.outbox.submit(command)

    async def run(self) -> None:
        """The sender, and the outbox's deadline watch, until :meth:`close`."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.outbox.watch)
            try:
                while True:
                    await self._transmit(await self.outbox.take())
            except BrokerUnavailable:  # closed and empty
                pass
            finally:
                tg.cancel_scope.cancel()

    async def close(self, reason: str = "the broker is closed") -> None:
        self.outbox.close(reason)
        await self._drop()

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await quiet_disconnect(conn)

    async def _transmit(self, batch: list[Send[Command]]) -> None:
        failed = True
        async with self.outbox.transmit(batch) as tx:
            try:
                if self.conn is None:
                    self.conn = await self._connect()
                conn = self.conn
                sends = tx.sent()  # from here on Redis may run what it reads
                await conn.send_packed_command(
                    b"".join(_ASKING + s.item.packed if s.item.asking else s.item.packed
                             for s in sends),
                    check_health=False,
                )  # fmt: skip
                for send in sends:
                    command = send.item
                    if command.replies == 1 and not command.asking:  # the common case
                        try:
                            reply = await conn.read_response()
                        except ResponseError as exc:  # a refusal: the connection stays in sync
                            reply = exc
                        if isinstance(reply, Exception):
                            self._settle(tx, send, [reply])
                        else:
                            send.resolve(reply)
                    else:
                        self._settle(tx, send, await self._read(conn, command))
                failed = False
            finally:
                if failed:  # the connection is in an unknown state (or gone): a new one next
                    await self._drop()
        if failed and self._on_failure is not None:
            self._on_failure()

    @staticmethod
    async def _read(conn: Connection, command: Command) -> list[Any]:
        """The replies of ``command`` (a refusal is its ``ResponseError``), ASKING's left out."""
        replies: list[Any] = []
        for _ in range(command.replies + command.asking):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # a refusal: the connection stays in sync
                replies.append(exc)
        return replies[1:] if command.asking else replies

    def _settle(self, tx: Any, send: Send[Command], replies: list[Any]) -> None:
        """Settle ``send`` by its ``replies`` (see the module docstring)."""
        command = send.item
        redirection = next((r for r in replies if isinstance(r, AskError)), None)
        if redirection is not None and self._redirect is not None:
            tx.release(send)
            self._redirect(send, redirection)
            return
        reply = replies[-1]
        if command.replies > 1 and isinstance(reply, list):  # MULTI ... EXEC
            # The transaction ran: an error inside it did not undo the other commands.
            inner = next((r for r in reply if isinstance(r, Exception)), None)
            if inner is not None:
                send.refuse(
                    PublishOutcomeUnknown(f"Redis ran the transaction with an error: {inner}")
                )
                return
            reply = reply[-1]
        elif command.replies > 1:  # EXECABORT, or one of several PUBLISHes refused
            reply = next((r for r in replies if isinstance(r, Exception)), reply)
        if isinstance(reply, Exception):
            send.refuse(BrokerUnavailable(f"Redis refused the command: {reply}"))
        else:
            send.resolve(reply)
