"""What the node (``_broker``, ``_publisher``) and the storage consumer (``_storage``) of the
RabbitMQ backend share: the client errors they map, connection helpers, one wording of a
failed connect, and the storage queue's declaration."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote, urlencode, urlsplit

import aiormq
import anyio
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from ..._errors import BrokerUnavailable, unreachable
from ._names import STORE_KEY

__all__ = [
    "ERRORS",
    "STABLE_AFTER",
    "bind",
    "connect",
    "declare_storage",
    "first_closed",
    "quiet_close",
    "really_cancelled",
    "unreachable_at",
]

#: What aiormq raises for a failed connection, channel or operation.
ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError, EOFError, RuntimeError)

#: A connection that served this long (seconds) resets the reconnect backoff; one that RabbitMQ
#: drops sooner after each restore meets a growing delay, not a reconnect storm that redeclares
#: and rebinds everything many times a second.
STABLE_AFTER = 1.0


def really_cancelled() -> bool:
    """aiormq hands out ``CancelledError`` as the *result* of a future when it closes a channel;
    only a cancel request on our own task is a real cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def unreachable_at(url: str, exc: BaseException) -> BrokerUnavailable:
    """The one wording of a failed connect (roomrouter._errors.unreachable) for ``url``."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    user = unquote(parts.username or "guest")
    return unreachable("RabbitMQ", parts.hostname, port, exc, user=user)


async def connect(url: str, name: str, operation_timeout: float) -> AbstractConnection:
    """A new connection to ``url`` that RabbitMQ lists under the client-given ``name``, within
    ``operation_timeout``."""
    conn = aiormq.Connection(url + ("&" if "?" in url else "?") + urlencode({"name": name}))
    try:
        with anyio.fail_after(operation_timeout):
            await conn.connect()
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await quiet_close(conn, operation_timeout)
        if isinstance(exc, ERRORS):
            raise unreachable_at(url, exc) from exc
        raise
    return conn


async def quiet_close(conn: AbstractConnection, grace: float) -> None:
    """Close ``conn``, ignoring its errors, giving up after ``grace`` seconds."""
    with anyio.move_on_after(grace):
        try:
            await conn.close()
        except (*ERRORS, asyncio.CancelledError):
            if really_cancelled():
                raise


async def first_closed(
    *sources: AbstractConnection | AbstractChannel | asyncio.Future[None],
) -> None:
    """Wait until any connection/channel closes (or a future is set)."""
    observers = [s if isinstance(s, asyncio.Future) else s.closing for s in sources]
    try:
        await asyncio.wait(observers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for source, observer in zip(sources, observers, strict=True):
            if observer is not source and not observer.done():
                observer.cancel()  # only stops this observer


async def bind(channel: AbstractChannel, queue: str, exchange: str, keys: list[str]) -> None:
    """Bind ``keys`` in one round trip: no-wait binds, then one confirmed bind as a fence.

    A channel executes methods in order, so the last BindOk means every bind before it took
    effect; a failing bind closes the channel, and the fence raises.
    """
    if not keys:
        return
    for key in keys[:-1]:
        await channel.queue_bind(queue, exchange, routing_key=key, nowait=True)
    await channel.queue_bind(queue, exchange, routing_key=keys[-1])


async def declare_storage(channel: AbstractChannel, exchange: str, queue: str) -> None:
    """Declare the data exchange and the namespace's storage queue bound to it by the storage
    key (idempotent; nodes and storage workers both do it, whoever comes first)."""
    await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.queue_bind(queue, exchange, routing_key=STORE_KEY.decode())
