"""The envelope every message travels in, its wire codec and its ids.

The wire form is a msgpack array whose first element is the format version (msgspec's struct
tag): a node that meets a version it does not know counts the frame as undecodable and drops it,
instead of misreading it.

Ids are UUIDv7 strings (RFC 9562): 48 bits of Unix milliseconds, then a 12-bit counter, then 62
random bits. The counter makes ids *strictly increasing per generator* even within one
millisecond (and across a clock step backwards, by borrowing from the future millisecond), so
the order of a node's ids is its publish order; the lowercase hex string sorts like the bytes.
"""

from __future__ import annotations

import random
import re
import time
import unicodedata
from typing import Final

import msgspec

from ._errors import ConfigurationError, InvalidRoomName

__all__ = [
    "MAX_ROOM_LENGTH",
    "WIRE_VERSION",
    "Envelope",
    "IdGenerator",
    "decode_envelope",
    "encode_envelope",
    "validate_id",
    "validate_room",
]

WIRE_VERSION: Final = 1
MAX_ROOM_LENGTH: Final = 1024


class Envelope(msgspec.Struct, frozen=True, array_like=True, tag=WIRE_VERSION, tag_field="v"):
    """One message of one room.

    ``payload`` is opaque to the library. ``origin`` is the node id of the publisher. ``ts`` is
    the publisher's wall clock in Unix seconds. ``id`` is time-ordered and unique.
    """

    id: str
    room: str
    origin: str
    ts: float
    payload: bytes
    headers: dict[str, str] = {}
    persist: bool = False


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """Encode ``envelope`` for the wire."""
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    """Decode a wire frame; raises ``msgspec.DecodeError`` (or ``ValidationError``) if invalid."""
    return _decoder.decode(data)


# Uniqueness across nodes needs unpredictability of a statistical kind, not secrecy: a
# per-process generator seeded from the OS is enough and avoids a system call per id.
_random = random.Random()


class IdGenerator:
    """Makes UUIDv7 ids that strictly increase for the lifetime of the generator."""

    __slots__ = ("_counter", "_last_ms")

    def __init__(self) -> None:
        self._last_ms = 0
        self._counter = 0

    def next(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms > self._last_ms:
            self._last_ms = ms
            # A random start leaves room to count within the millisecond while keeping ids
            # from different nodes in the same millisecond unordered-but-unique.
            self._counter = _random.getrandbits(10)
        else:
            self._counter += 1
            if self._counter > 0xFFF:
                self._last_ms += 1
                self._counter = 0
        ms = self._last_ms
        rand = _random.getrandbits(62)
        value = (ms << 80) | (0x7 << 76) | (self._counter << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# What IdGenerator makes: lowercase hex, version 7, variant 0b10. Lowercase matters: ids are
# compared as strings for order (history, recovery).
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def validate_id(value: object) -> str:
    """Return ``value`` if it is shaped like the ids :class:`IdGenerator` makes (a lowercase
    UUIDv7 string), else raise :class:`~roomrouter.ConfigurationError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigurationError(
            f"a message id must be a lowercase UUIDv7 string such as an Envelope.id: {value!r}"
        )
    return value


def validate_room(room: object, max_length: int = MAX_ROOM_LENGTH) -> str:
    """Return ``room`` if it is a valid room name, else raise :class:`InvalidRoomName`.

    Valid: a non-empty ``str`` of at most ``max_length`` characters with no control characters
    (Unicode category ``Cc``) and no unpaired surrogates. Everything else is allowed, including
    ``*``, ``?``, ``[``, ``.``, ``#``, spaces and any Unicode: backends treat names literally.
    """
    if not isinstance(room, str):
        raise InvalidRoomName(f"room name must be a str, not {type(room).__name__}")
    if not room:
        raise InvalidRoomName("room name must not be empty")
    if len(room) > max_length:
        raise InvalidRoomName(
            f"room name is {len(room)} characters long; the limit is {max_length}"
        )
    if not room.isprintable():
        for ch in room:
            category = unicodedata.category(ch)
            if category in ("Cc", "Cs"):
                raise InvalidRoomName(
                    f"room name {room!r} holds the control character U+{ord(ch):04X}"
                )
    return room
