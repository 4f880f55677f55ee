"""Reading a room's recent-messages queue without consuming it (see ``recent`` in the node)."""

from __future__ import annotations

import asyncio
import uuid

import anyio
from aiormq.abc import AbstractConnection, DeliveredMessage
from pamqp import commands as pamqp_commands

from ._common import ERRORS
from ._names import SENTINEL

__all__ = ["read_recent"]


async def read_recent(
    conn: AbstractConnection, queue: str, recent_size: int, close_grace: float
) -> list[bytes]:
    """The frames of ``queue``, oldest first, left in place.

    On a channel of its own, take the queue as its *exclusive* consumer (RabbitMQ refuses a
    second one: the caller retries), publish a sentinel into it, collect every frame delivered
    before the sentinel, acknowledge only the sentinel (and those of readers that died before
    acking theirs) and close the channel: RabbitMQ puts the frames back in their places.
    """
    channel = await conn.channel(publisher_confirms=False)
    try:
        await channel.basic_qos(prefetch_count=recent_size + 16)
        token = uuid.uuid4().hex
        frames: list[bytes] = []
        strays: list[int] = []
        mine: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_message(message: DeliveredMessage) -> None:
            # Runs synchronously in delivery order (aiormq: one task each, in order).
            props = message.header.properties
            tag = getattr(message.delivery, "delivery_tag", 0)
            if props.message_type == SENTINEL:
                if props.message_id == token and not mine.done():
                    mine.set_result(tag)
                elif not mine.done():
                    strays.append(tag)  # a reader that died before acking its own
            elif not mine.done():
                frames.append(message.body)

        await channel.basic_consume(queue, on_message, exclusive=True, no_ack=False)
        await channel.basic_publish(
            b"",
            routing_key=queue,
            properties=pamqp_commands.Basic.Properties(message_id=token, message_type=SENTINEL),
        )
        tag = await mine
        for stray in strays:
            await channel.basic_ack(stray)
        await channel.basic_ack(tag)
        return frames
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(close_grace):
            try:
                await channel.close()  # the frames go back to their places
            except (*ERRORS, asyncio.CancelledError):
                pass
