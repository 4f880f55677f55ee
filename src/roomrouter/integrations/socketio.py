"""python-socketio on roomrouter: :class:`RoomRouterManager` is a client manager for
``socketio.AsyncServer`` that routes each Socket.IO room through a roomrouter room, so a node
receives only the messages of rooms it has clients in. :class:`AsyncServer` is
``socketio.AsyncServer`` with socket.io's connection state recovery across nodes, whose
:meth:`AsyncServer.history` reads a room's persisted emits back (:class:`StoredEmit`).

Needs the ``socketio`` extra: ``pip install "roomrouter[socketio]"``; importing this module
without it raises :class:`~roomrouter.MissingDependency`.
"""

from ._sio_history import StoredEmit
from ._sio_recovery import AsyncServer
from ._socketio import RoomRouterManager

__all__ = ["AsyncServer", "RoomRouterManager", "StoredEmit"]
