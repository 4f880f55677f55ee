"""A room emit to this node's clients without a task per client (issue 23).

python-socketio's ``AsyncManager.emit`` encodes an emit without callback once, then creates
one asyncio task per recipient (and per Engine.IO packet of the emit) and awaits them all.
For a room of n local clients and a batch of k emits that is k * n tasks and k waits, and
each client's Engine.IO writer wakes once per emit. :func:`send_to_room` keeps the encoding
once per emit and hands the Engine.IO packets to each recipient in a plain loop, through the
same server call python-socketio uses (``_send_eio_packet``). With the asyncio Engine.IO
server, for the websocket and the polling transport alike, that call only puts the packet in
the client's unbounded ``asyncio.Queue`` and does not suspend (a client past its ping timeout
is the exception: it is closed there, running its disconnect handler); so a whole batch of
emits is handed over in one step of the reader, and each client's writer task wakes once per
batch and takes every packet queued for it (the polling transport answers them in one HTTP
response; the websocket transport writes one frame per packet, as Engine.IO v4 requires).

Semantics are python-socketio's (so docs/architecture.md's guarantees 1 and 3 carry over to
each client): the same recipients (``get_participants``, taken before the
first send), ``skip_sid`` as a sid or list of sids, the data rules (a tuple is the list of
arguments, ``None`` none, anything else one), the same packets in the same order. A send that
raises for one client is logged and the others are still served, as python-socketio's
independent tasks are.
"""

from __future__ import annotations

from typing import Any

from .._errors import MissingDependency

try:
    from engineio import packet as eio_packet
    from socketio import packet as sio_packet
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency("socketio", "socketio") from exc

__all__ = ["send_to_room"]


def as_data(data: Any) -> list[Any]:
    """The emit's arguments, by python-socketio's rule."""
    if isinstance(data, tuple):
        return list(data)
    if data is None:
        return []
    return [data]


async def send_to_room(
    manager: Any, event: str, data: Any, namespace: str, room: Any, skip_sid: Any
) -> int:
    """Send ``event`` with ``data`` to this node's clients of ``room`` (a room, a list of
    rooms, or ``None`` for the namespace) of ``namespace``, minus ``skip_sid``; return how
    many clients it was handed to. ``manager`` is a python-socketio ``AsyncManager`` bound
    to its server."""
    if namespace not in manager.rooms:
        return 0
    skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
    recipients = [
        eio_sid for sid, eio_sid in manager.get_participants(namespace, room) if sid not in skip
    ]
    if not recipients:
        return 0
    server = manager.server
    encoded = server.packet_class(
        sio_packet.EVENT, namespace=namespace, data=[event, *as_data(data)]
    ).encode()
    packets = [
        eio_packet.Packet(eio_packet.MESSAGE, part)
        for part in (encoded if isinstance(encoded, list) else [encoded])
    ]
    send = server._send_eio_packet
    for eio_sid in recipients:
        try:
            for pkt in packets:
                await send(eio_sid, pkt)
        except Exception:
            # One client's broken transport must not cost the others their packet.
            manager._get_logger().exception("roomrouter manager: cannot send to %s", eio_sid)
    return len(recipients)
