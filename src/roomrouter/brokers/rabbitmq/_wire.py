"""AMQP 0-9-1 wire bytes of what the publisher writes in batches: ``basic.publish`` (built
with struct; tests compare it byte for byte with pamqp) and the no-wait declare and bind of a
room's recent queue (marshalled by pamqp: rare, once per room and ``recent_ttl / 4``)."""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands as pamqp_commands
from pamqp import frame as pamqp_frame

__all__ = ["bcc_properties", "persistent_properties", "publish_frames", "recent_queue_frames"]

# basic.publish is a method frame, a content header frame and body frames, each
# ``type(1) channel(2) size(4) payload 0xCE``. The method frame of a publish is a constant prefix
# plus two short strings, which is several times cheaper to build here than marshalling frame
# objects per message.
_FRAME_HEAD = struct.Struct(">BHI").pack
_CONTENT_HEADER = struct.Struct(">HHQH").pack  # class 60, weight 0, body size, property flags
_PUBLISH_METHOD = b"\x00\x3c\x00\x28\x00\x00"  # class 60 (basic), method 40 (publish), ticket 0
# Persisted frames carry two properties: ``headers`` = {"BCC": [store key, recent key, ...]} and
# ``delivery-mode`` = 2 (persistent). Flags: bit 13 headers, bit 12 delivery mode. A live frame
# addressed to several nodes carries the headers alone (``bcc_properties``).
_HEADERS_FLAG = 0x2000
_PERSISTENT_FLAGS = _HEADERS_FLAG | 0x1000
_LONG = struct.Struct(">I").pack


def publish_frames(
    channel: int,
    exchange: bytes,
    key: bytes,
    body: bytes,
    max_body: int,
    properties: bytes = b"",
    *,
    persistent: bool = True,
) -> bytes:
    """Wire bytes of one ``basic.publish`` (mandatory and immediate off). ``properties`` is the
    encoded property list after the flags: :func:`persistent_properties`, or with
    ``persistent=False`` :func:`bcc_properties`; empty: none."""
    method = b"".join(
        (_PUBLISH_METHOD, bytes((len(exchange),)), exchange, bytes((len(key),)), key, b"\x00")
    )
    if properties:
        flags = _PERSISTENT_FLAGS if persistent else _HEADERS_FLAG
        header = _CONTENT_HEADER(60, 0, len(body), flags) + properties
    else:
        header = _CONTENT_HEADER(60, 0, len(body), 0)
    parts = [
        _FRAME_HEAD(1, channel, len(method)),
        method,
        b"\xce",
        _FRAME_HEAD(2, channel, len(header)),
        header,
        b"\xce",
    ]
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        parts += (_FRAME_HEAD(3, channel, len(chunk)), chunk, b"\xce")
    return b"".join(parts)


def _bcc_table(bcc: list[bytes]) -> bytes:
    items = b"".join(b"S" + _LONG(len(k)) + k for k in bcc)
    entry = b"\x03BCC" + b"A" + _LONG(len(items)) + items
    return _LONG(len(entry)) + entry


def persistent_properties(bcc: list[bytes]) -> bytes:
    """The property list of a persisted frame: a field table ``{"BCC": [keys...]}`` (RabbitMQ's
    sender-selected distribution: extra routing keys, stripped before delivery), then delivery
    mode 2. Tests compare it with pamqp's marshalling."""
    return _bcc_table(bcc) + b"\x02"


def bcc_properties(bcc: list[bytes]) -> bytes:
    """The property list of a live frame addressed to several nodes: the ``{"BCC": [keys...]}``
    table alone (transient; ``publish_frames(..., persistent=False)``)."""
    return _bcc_table(bcc)


def recent_queue_frames(
    channel: int, queue: str, exchange: str, key: str, arguments: dict[str, Any]
) -> list[bytes]:
    """Wire bytes of a no-wait ``queue.declare`` of a recent queue and its no-wait
    ``queue.bind`` to the data exchange by ``key``."""
    return [
        pamqp_frame.marshal(
            pamqp_commands.Queue.Declare(
                queue=queue, durable=True, nowait=True, arguments=arguments
            ),
            channel,
        ),
        pamqp_frame.marshal(
            pamqp_commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=key, nowait=True),
            channel,
        ),
    ]
