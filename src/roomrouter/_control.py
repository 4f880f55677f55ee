"""The control frames the nodes of a namespace exchange, and their codec.

What each frame means, and why the cluster view stays right with them, is in ``_cluster.py``
(docs/architecture.md, "The cluster view"). This module is only the wire: msgpack arrays with
a one-letter tag, and, with a control secret, an HMAC-SHA256 tag after the body.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from ._stats import Stats

__all__ = [
    "TAG_SIZE",
    "Ack",
    "Bye",
    "ControlCodec",
    "Frame",
    "Heartbeat",
    "Hello",
    "Host",
    "State",
    "Sync",
    "Unhost",
    "decoder",
    "encoder",
    "sign",
]

# Short tags keep heartbeats small; array_like drops field names from the wire.


class _Msg(msgspec.Struct, array_like=True, tag_field="t"):
    node: str


class Hello(_Msg, tag="h"):
    gen: int
    rooms: list[str]
    started: float = 0.0  # wall time the node started (for inspection)
    members: int = 0  # its local members now (for inspection)


class State(_Msg, tag="s"):
    gen: int
    rooms: list[str]
    live: list[str]
    started: float = 0.0
    members: int = 0
    sync: int = 0  # the Sync this answers (0: none); trailing, so older nodes ignore it
    ready: bool = False  # the sender's own start is done (its live list is complete)


class Host(_Msg, tag="+"):
    gen: int
    rooms: list[str]
    barrier: int


class Unhost(_Msg, tag="-"):
    gen: int
    rooms: list[str]


class Ack(_Msg, tag="a"):
    barrier: int


class Heartbeat(_Msg, tag="b"):
    gen: int
    members: int = 0


class Sync(_Msg, tag="y"):
    seq: int = 0  # a resynchronisation's number, echoed by the State that answers it


class Bye(_Msg, tag="x"):
    pass


Frame = Hello | State | Host | Unhost | Ack | Heartbeat | Sync | Bye
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Frame)

#: Bytes of HMAC-SHA256 appended to every control frame when a control secret is set.
TAG_SIZE = 16


def sign(secret: bytes, body: bytes) -> bytes:
    """``body`` with its control-frame tag appended."""
    return body + hmac.new(secret, body, hashlib.sha256).digest()[:TAG_SIZE]


class ControlCodec:
    """Frames to bytes and back for one node: signed and checked when ``secret`` is set.
    What cannot be read is dropped and counted (``dropped_control_auth``: no valid tag;
    ``dropped_control_decode``: no frame), never raised into the broker's reader."""

    __slots__ = ("_secret", "_stats")

    def __init__(self, secret: bytes | None, stats: Stats) -> None:
        self._secret = secret
        self._stats = stats

    def encode(self, msg: Frame) -> bytes:
        body = encoder.encode(msg)
        return body if self._secret is None else sign(self._secret, body)

    def decode(self, frame: bytes) -> Frame | None:
        secret = self._secret
        if secret is not None:
            body = frame[:-TAG_SIZE]
            expected = hmac.new(secret, body, hashlib.sha256).digest()[:TAG_SIZE]
            if len(frame) <= TAG_SIZE or not hmac.compare_digest(expected, frame[-TAG_SIZE:]):
                self._stats.dropped_control_auth += 1
                return None
            frame = body
        try:
            return decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._stats.dropped_control_decode += 1
            return None
