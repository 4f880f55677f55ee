"""What the nodes of a :class:`~roomrouter.integrations.socketio.RoomRouterManager` exchange:
the envelope payloads (tagged msgpack arrays, never pickle) and python-socketio's rules for the
arguments of an emit, applied before anything is encoded.

A node that meets a tag it does not know drops the message (counted) instead of misreading it,
so new kinds can be added later; bytes inside emitted data travel as msgpack binary.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from .._errors import InvalidRoomName

__all__ = [
    "Ack",
    "CloseRoom",
    "Disconnect",
    "Emit",
    "EnterRoom",
    "LeaveRoom",
    "Message",
    "RoomKey",
    "as_args",
    "decode",
    "encode",
    "rooms_of",
    "skips",
]

#: A Socket.IO room: a name, or ``None`` for "every client of the namespace". Integers are
#: allowed since python-socketio allows any hashable; they stay distinct from their str form.
RoomKey = str | int | None


class Emit(msgspec.Struct, array_like=True, tag=1):
    event: str
    args: list[Any]
    #: The emit's whole ``to`` (the first one keys the ack at the emitting node).
    rooms: list[RoomKey]
    skip: list[str]
    #: The ack id at the emitting node, whose node room the client's answer goes back to.
    ack: int | None = None
    #: For an emit to several rooms (one envelope per room): its id, so that a receiving node
    #: serves a client in several of the rooms once, as python-socketio's managers do.
    multi: str | None = None
    #: With connection state recovery (:mod:`._sio_recovery`): the emit's offset, sent to
    #: every client as its last argument; the same in every room's envelope of the emit.
    offset: str | None = None


class Disconnect(msgspec.Struct, array_like=True, tag=2):
    sid: str


class EnterRoom(msgspec.Struct, array_like=True, tag=3):
    sid: str
    room: RoomKey


class LeaveRoom(msgspec.Struct, array_like=True, tag=4):
    sid: str
    room: RoomKey


class CloseRoom(msgspec.Struct, array_like=True, tag=5):
    room: RoomKey


class Ack(msgspec.Struct, array_like=True, tag=6):
    key: RoomKey
    id: int
    args: list[Any]


Message = Emit | Disconnect | EnterRoom | LeaveRoom | CloseRoom | Ack

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The payload of ``message``; :class:`TypeError` for data msgpack cannot carry."""
    try:
        return _encoder.encode(message)
    except (TypeError, msgspec.EncodeError) as exc:
        # What json.dumps would refuse for a local client too: a programming error, not ours.
        raise TypeError(f"Socket.IO data cannot be sent to other nodes: {exc}") from exc


def decode(payload: bytes) -> Message | None:
    """The message in an envelope's payload, or None if it is none (garbage, an unknown tag)."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def as_args(data: Any) -> list[Any]:
    """``AsyncManager.emit``'s rule: a tuple is several arguments, None is none, else one."""
    if isinstance(data, tuple):
        return list(data)
    return [] if data is None else [data]


def rooms_of(to: Any) -> list[RoomKey]:
    """The rooms of an emit's ``to``: python-socketio's rule (``get_participants``), a non-str
    sized value is a list of rooms; raises :class:`~roomrouter.InvalidRoomName` for a room that
    is neither a str, an int nor None."""
    rooms = list(to) if hasattr(to, "__len__") and not isinstance(to, str) else [to]
    for room in rooms:
        if room is not None and (isinstance(room, bool) or not isinstance(room, str | int)):
            raise InvalidRoomName(f"a Socket.IO room must be a str or an int, not {room!r}")
    return rooms


def skips(skip_sid: Any) -> list[str]:
    """The sids of an emit's ``skip_sid`` (one, a list, or None)."""
    if skip_sid is None:
        return []
    return [s for s in (skip_sid if isinstance(skip_sid, list) else [skip_sid]) if s is not None]
