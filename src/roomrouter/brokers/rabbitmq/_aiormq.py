"""The aiormq adapter: every aiormq internal the RabbitMQ backend touches, and nothing else.

The publish path frames ``basic.publish`` itself and writes batches of frames on aiormq's
connection (see ``_publisher``): aiormq's public ``basic_publish`` takes the channel lock and
waits for one writer round per message, which costs 2-4x the confirmed publishes per second
(``benchmarks/rabbitmq_publish_path.py``). Doing so needs three internals of aiormq's
channel: its delivery-tag counter, its table of pending confirmations (aiormq settles an entry
on ``basic.ack`` and ``basic.nack``, one or ``multiple``), and its connection's write queue.
They were read in aiormq 7.2; this module refuses, at import, any aiormq outside
:data:`SUPPORTED` rather than corrupting the delivery-tag sequence of a version that changed
them. The pin of the ``rabbitmq`` extra says the same.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import aiormq
from aiormq.abc import AbstractConnection, ChannelFrame

from ..._errors import ConfigurationError

__all__ = ["SUPPORTED", "check_version", "expect_confirm", "frame_max", "write_frames"]

#: The aiormq versions whose internals were read (the ``aiormq`` pin of the rabbitmq extra).
SUPPORTED = ">=7.2,<8"
_LOWEST, _BEYOND = (7, 2), (8, 0)


def check_version(version: str) -> None:
    """Raise :class:`~roomrouter.ConfigurationError` unless ``version`` is in :data:`SUPPORTED`."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if not _LOWEST <= (major, minor) < _BEYOND:
        raise ConfigurationError(
            f"the RabbitMQ backend supports aiormq {SUPPORTED}, not aiormq {version} (it relies "
            f'on a few of its internals): pip install "aiormq{SUPPORTED}"'
        )


check_version(importlib.metadata.version("aiormq"))


class _Confirmation:
    """An entry of aiormq's confirmation table: aiormq calls ``set_result(frame)`` on
    ``basic.ack`` and ``set_exception(DeliveryError)`` on ``basic.nack`` (after ``done()``);
    this one hands the answer straight to ``settle``, in the step that read the frame (an
    asyncio future would cost one more turn of the event loop per publish). aiormq does not
    touch the table when the channel closes: the caller settles what is left then."""

    __slots__ = ("_settle",)

    def __init__(self, settle: Callable[[BaseException | None], object]) -> None:
        self._settle = settle

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, frame: object) -> None:
        self._settle(None)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(exc)


def expect_confirm(
    channel: aiormq.Channel, settle: Callable[[BaseException | None], object]
) -> None:
    """Take the next delivery tag of a confirm channel and register its confirmation, as
    ``basic_publish`` does: ``settle(None)`` on ``basic.ack``, ``settle(DeliveryError)`` on
    ``basic.nack``; nothing if the channel closes first. Call it in the same synchronous step
    that queues the publish's bytes."""
    table: dict[int, Any] = channel.confirmations  # typed for its futures; duck-typed here
    channel.delivery_tag += 1
    table[channel.delivery_tag] = _Confirmation(settle)


async def write_frames(channel: aiormq.Channel, payload: bytes) -> None:
    """Queue wire bytes (whole frames: aiormq's heartbeats share the queue) on the channel's
    connection; its writer task sends them in queue order."""
    await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))


def frame_max(connection: AbstractConnection) -> int:
    """The frame size negotiated with the server (``connection.tune``)."""
    return int(connection.connection_tune.frame_max)
