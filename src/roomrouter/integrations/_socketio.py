"""python-socketio's client manager on roomrouter.

python-socketio's pub/sub managers (``AsyncRedisManager``, ``AsyncAioPikaManager``, ...) put
every emit of every node on one channel that every node reads: with N nodes, each node handles
the traffic of all rooms. :class:`RoomRouterManager` maps each Socket.IO room onto a roomrouter
room instead, so a node is subscribed at the broker to exactly the Socket.IO rooms it has
clients in, and an emit to a room whose clients are all on the emitting node never reaches the
broker (roomrouter's dynamic subscription and local bypass).

What is a roomrouter room here:

* every Socket.IO room of every Socket.IO namespace, including the room named after each sid
  (so an emit, a disconnect, an ``enter_room`` addressed to one client reaches the one node that
  has it) and the namespace-wide room ``None`` (an emit with no ``to`` reaches every client of
  the namespace on every node that has one);
* one room per node (``sio-node:<node id>``), joined only once this node waits for an ack from
  a client on another node: the ack comes back through it.

One roomrouter :class:`~roomrouter.Member` stands for all the local clients of one Socket.IO
room (not one per client): the node joins the roomrouter room when the room's first local
client enters it and leaves when the last one leaves, which is exactly the condition for the
node to be subscribed; an incoming envelope is decoded and its Socket.IO packet encoded once per
node, then handed to the room's local clients in one loop, with no task per client
(:mod:`._sio_fanout`; ``skip_sid`` included): a delivery batch of the room is handed over in
one step, and each client's Engine.IO writer wakes once per batch (docs/batching.md). One
Member per client would hold the same subscriptions, but would queue, decode and encode every
message once per client.

Payloads are msgpack (msgspec), never pickle: bytes inside emitted data travel as msgpack
binary, and nothing read from the broker is ever unpickled.

The manager is three layers, one module each: the messages on the wire (:mod:`._sio_wire`),
this node's rooms -- the router's lifecycle, one member per local Socket.IO room, and its
reader (:mod:`._sio_hosting`) --, and python-socketio's manager API on top (here); what a
recovering client is sent is :mod:`._sio_replay`.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .._envelope import Envelope
from .._errors import PayloadTooLarge
from .._router import RoomRouter
from ._sio_fanout import send_to_room
from ._sio_hosting import HostingManager, Link
from ._sio_replay import Holds, OffsetIds, Restore, read_missed
from ._sio_wire import (
    Ack,
    CloseRoom,
    Disconnect,
    Emit,
    EnterRoom,
    LeaveRoom,
    Message,
    RoomKey,
    as_args,
    encode,
    rooms_of,
    skips,
)

__all__ = ["RoomRouterManager"]

#: Multi-room emits a node remembers whom it served for: far more than can be in flight at
#: once; an older one evicted would at worst serve a client in several of its rooms twice.
_SERVED_EMITS: Final = 4096


class RoomRouterManager(HostingManager):
    """A python-socketio ``AsyncManager`` whose nodes exchange emits through roomrouter.

    ``RoomRouterManager("redis://127.0.0.1:6379/0", namespace="chat")`` builds a router on any
    roomrouter broker URL with the router's keyword options, and runs it with the server: it
    starts when python-socketio initializes the manager (its first connection; or earlier,
    with ``await manager.start()`` from a startup hook) and closes with ``await
    server.shutdown()`` (or ``await manager.aclose()``). ``RoomRouterManager(router=router)``
    uses a router the application starts and closes itself.

    Contract, for servers of one roomrouter namespace:

    * ``emit(..., to=room)`` reaches every client of ``room`` on every node once (a client in
      several rooms of a list ``to`` once too), minus ``skip_sid``; with no ``to``, every
      client of the Socket.IO namespace. Clients on the emitting node are served in process;
      the broker carries the emit only if another node has a client in the room.
    * ``emit(to=sid)``, ``disconnect``, ``enter_room``, ``leave_room`` of a client on another
      node, ``close_room``, and acks (``callback=``) of a client on another node work as with
      python-socketio's pub/sub managers.
    * A node receives envelopes only of the rooms it has clients in (plus its node room while
      it waits for remote acks). ``get_participants`` and ``get_rooms`` are local, as in
      python-socketio.
    * Every room name is a roomrouter room (see :meth:`room_name`); an unusable one raises
      :class:`~roomrouter.InvalidRoomName`, data msgpack cannot carry ``TypeError``, and data
      larger than the router's ``max_payload`` :class:`~roomrouter.PayloadTooLarge`, all
      before anything is sent; broker failures raise roomrouter's errors
      (:class:`~roomrouter.BrokerUnavailable`, ...), after this node's clients were served.
    """

    name = "roomrouter"

    def __init__(
        self,
        url: str | None = None,
        *,
        router: RoomRouter | None = None,
        logger: logging.Logger | None = None,
        **router_options: Any,
    ) -> None:
        super().__init__(url, router=router, logger=logger, **router_options)
        # Multi-room emit id -> sids served for it here, oldest first (bounded, see Emit.multi).
        self._served: OrderedDict[str, set[str]] = OrderedDict()
        # Connection state recovery (set by roomrouter's AsyncServer, see _sio_recovery):
        # whether room emits carry offsets and are persisted, the offsets' generator, and the
        # clients being recovered, with the packets held back until their missed ones were sent.
        self.recovery = False
        self._offsets = OffsetIds()
        self._holds = Holds()
        #: (eio sid, namespace) -> the session the next pre_connect restores (set by the
        #: server); its ``recovered`` says afterwards whether it was.
        self.restoring: dict[tuple[Any, str], Restore] = {}
        #: Called after a local client's rooms changed (the server re-saves its session).
        self.on_rooms_changed: Callable[[str, str], Awaitable[None]] | None = None

    # -- python-socketio's manager API -------------------------------------------------------------

    async def pre_connect(self, eio_sid: Any, namespace: Any) -> Any:
        """Register the client, then host its sid room and its namespace's room. A client that
        cannot be hosted (broker down) is refused: the server answers CONNECT_ERROR."""
        restore = self.restoring.pop((eio_sid, namespace), None)
        if restore is not None:
            sid = await self._restore(eio_sid, namespace, restore)
            if sid is not None:
                return sid
        sid = await super().pre_connect(eio_sid, namespace)
        if sid is None:
            return None
        try:
            await self._host(self.room_name(namespace, None), namespace, None)
            await self._host(self.room_name(namespace, sid), namespace, sid)
        except Exception:
            self._get_logger().exception("roomrouter manager: cannot register %s", sid)
            self.basic_disconnect(sid, namespace)
            await self._close_released()
            return None
        except BaseException:
            self.basic_disconnect(sid, namespace)
            await self._close_released()
            raise
        return sid

    async def _restore(self, eio_sid: Any, namespace: str, restore: Restore) -> str | None:
        """Register the client under its previous sid in its previous rooms, and hold back
        what is emitted to it from now on until :meth:`connect`; then read what it missed
        after ``restore.since`` from the rooms' recent caches. None if it cannot be restored
        (the sid is in use here, or the caches no longer hold all it missed)."""
        sid = restore.sid
        if self._is_local(sid, namespace) or (namespace, sid) in self._holds:
            return None
        self._holds.open(namespace, sid)
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
            self.basic_enter_room(sid, namespace, sid, eio_sid=eio_sid)
            self.pending_connect.setdefault(namespace, []).append(sid)
            await self._host(self.room_name(namespace, None), namespace, None)
            await self._host(self.room_name(namespace, sid), namespace, sid)
            for room in restore.rooms:
                await self.enter_room(sid, namespace, room, eio_sid=eio_sid)
            # From here every emit to its rooms reaches this node (held back for it): what it
            # missed before is in the caches, read now.
            names = [self.room_name(namespace, room) for room in [None, sid, *restore.rooms]]
            missed = await read_missed(self.router, names, sid, restore.since)
        except Exception:
            self._get_logger().exception("roomrouter manager: cannot restore %s", sid)
            missed = None
        if missed is None:
            self._holds.drop(namespace, sid)
            self.basic_disconnect(sid, namespace)
            await self._close_released()
            return None
        self._holds.prepend(namespace, sid, missed)
        restore.recovered = True
        return sid

    def offset_now(self) -> str:
        """A new offset: a position after every emit offset this node made so far, and after
        those of other nodes made before now (clocks allowing)."""
        return self._offsets.next()

    async def connect(self, sid: Any, namespace: Any) -> Any:
        """Mark the client connected (the server sent its CONNECT answer); a recovered one then
        gets what it missed and what was held back for it, in offset order, then goes live."""
        sid = await super().connect(sid, namespace)
        sent: set[str] = set()
        while (held := self._holds.take(namespace or "/", sid)) is not None:
            batch = {offset: (event, args) for offset, event, args in held if offset not in sent}
            for offset in sorted(batch):
                sent.add(offset)
                event, args = batch[offset]
                await send_to_room(self, event, (*args, offset), namespace or "/", sid, None)
        self._holds.end(namespace or "/", sid, sent)
        return sid

    async def enter_room(self, sid: Any, namespace: Any, room: Any, eio_sid: Any = None) -> None:
        """Add a client of this node to ``room`` (returns once the node hosts the room), or ask
        the node of a remote client to."""
        namespace = namespace or "/"
        (room,) = rooms_of([room])
        name = self.room_name(namespace, room)
        if not self._is_local(sid, namespace):
            await self._publish(namespace, [sid], EnterRoom(sid, room))
            return
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        try:
            await self._host(name, namespace, room)
        except BaseException:
            self.basic_leave_room(sid, namespace, room)
            await self._close_released()
            raise
        if sid in self.rooms.get(namespace, {}).get(room, ()):  # not left meanwhile
            self.router.track_presence(name, str(sid))
        if self.on_rooms_changed is not None and self.is_connected(sid, namespace):
            await self.on_rooms_changed(sid, namespace)

    async def leave_room(self, sid: Any, namespace: Any, room: Any) -> None:
        """Remove a client of this node from ``room`` (the node leaves the roomrouter room with
        the room's last local client), or ask the node of a remote client to."""
        namespace = namespace or "/"
        if not self._is_local(sid, namespace):
            (room,) = rooms_of([room])
            await self._publish(namespace, [sid], LeaveRoom(sid, room))
            return
        await super().leave_room(sid, namespace, room)
        await self._close_released()
        if self.on_rooms_changed is not None and self.is_connected(sid, namespace):
            await self.on_rooms_changed(sid, namespace)

    async def close_room(self, room: Any, namespace: Any) -> None:
        """Remove every client of every node from ``room``."""
        namespace = namespace or "/"
        (room,) = rooms_of([room])
        await super().close_room(room, namespace)
        await self._close_released()
        await self._publish(namespace, [room], CloseRoom(room))

    async def can_disconnect(self, sid: Any, namespace: Any) -> bool:
        """True if ``sid`` is a client of this node (the server disconnects it); otherwise the
        request goes to the client's node, and False."""
        namespace = namespace or "/"
        if self._is_local(sid, namespace):
            return bool(await super().can_disconnect(sid, namespace))
        await self._publish(namespace, [sid], Disconnect(sid))
        return False

    async def disconnect(self, sid: Any, namespace: Any, **kwargs: Any) -> None:
        """Forget a client of this node (the server calls it so, with ``ignore_queue=True``),
        or, called by the application, disconnect a client of any node."""
        namespace = namespace or "/"
        if kwargs.get("ignore_queue"):
            self._holds.drop(namespace, sid)
            await super().disconnect(sid, namespace)
            await self._close_released()
        elif self.is_connected(sid, namespace):
            await self.server.disconnect(sid, namespace=namespace, ignore_queue=True)
        elif self.eio_sid_from_sid(sid, namespace) is not None:  # connecting or disconnecting
            await super().disconnect(sid, namespace)
            await self._close_released()
        else:
            await self._publish(namespace, [sid], Disconnect(sid))

    async def emit(
        self,
        event: Any,
        data: Any,
        namespace: Any,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        """Emit to the clients of ``to`` (a room, a sid, a list of them, or ``None`` for the
        whole namespace) on every node; see the class docstring."""
        room = to or room
        if kwargs.get("ignore_queue"):
            await self._emit_here(event, data, namespace, room, skip_sid, callback)
            return
        namespace = namespace or "/"
        rooms = rooms_of(room)
        names = [self.room_name(namespace, r) for r in rooms]
        if callback is not None and (room is None or len(rooms) != 1):
            raise ValueError("Cannot use callback without a room set.")  # as python-socketio
        remote = not (callback is not None and self.is_sid_room(namespace, rooms[0]))
        # With recovery, an emit without ack carries an offset (socket.io's rule) and is
        # persisted: one id per room's envelope, the newest being the offset everyone gets.
        ids = [self._offsets.next() for _ in names] if self.recovery and callback is None else []
        offset = ids[-1] if ids else None
        if remote:
            await self._ready()
            multi = secrets.token_hex(8) if len(rooms) > 1 else None
            payload = encode(
                Emit(event, as_args(data), rooms, skips(skip_sid), None, multi, offset)
            )
            if len(payload) > self.router.max_payload:
                # Refused before anyone is served: not only the emitting node's clients.
                raise PayloadTooLarge(
                    f"the emit is {len(payload)} bytes encoded; the router's max_payload is "
                    f"{self.router.max_payload}"
                )
        # Local clients first, in process: the broker is for the other nodes only.
        if offset is None:
            await self._emit_here(event, data, namespace, room, skip_sid, callback)
        else:
            await self._serve(event, as_args(data), namespace, rooms, skips(skip_sid), offset)
        if not remote:
            return  # a client of this node is on no other node
        if callback is not None:
            await self._host(self._node_room(self.router.node_id), "", None)
            ack = self._generate_ack_id(rooms[0], callback)
            payload = encode(Emit(event, as_args(data), rooms, skips(skip_sid), ack))
        for i, name in enumerate(names):
            await self._publish_to(name, payload, id=ids[i] if ids else None)

    # -- to and from the other nodes ---------------------------------------------------------------

    async def _publish(self, namespace: str, rooms: list[RoomKey], message: Message) -> None:
        payload = encode(message)
        for room in rooms:
            await self._publish_to(self.room_name(namespace, room), payload)

    async def _publish_to(self, name: str, payload: bytes, *, id: str | None = None) -> None:
        await self._ready()
        link = self._links.get(name)
        # This node's clients were served by python-socketio already: not again via its member.
        # An emit with an offset is persisted: that is what puts it in the room's recent cache,
        # which recoveries read (docs/socketio.md, "Connection state recovery").
        await self.router.publish(
            name, payload, exclude=link.member if link else None, persist=id is not None, id=id
        )

    async def _serve(
        self,
        event: str,
        args: list[Any],
        namespace: str,
        rooms: list[RoomKey],
        skip: list[str],
        offset: str,
    ) -> None:
        """Send an emit with an offset to this node's clients of ``rooms``: a client being
        recovered gets it later, in offset order with its missed ones (see ``Holds``)."""
        skip = list(skip)
        if self._holds:
            members = self.rooms.get(namespace, {})
            skip += self._holds.divert(namespace, members, rooms, skip, (offset, event, args))
            skip += self._holds.already_sent(namespace, members, rooms, offset)
        room: Any = rooms[0] if len(rooms) == 1 else rooms
        await send_to_room(self, event, (*args, offset), namespace, room, skip)

    async def _emit_here(
        self, event: Any, data: Any, namespace: Any, room: Any, skip_sid: Any, callback: Any
    ) -> None:
        """Send an emit to this node's clients of ``room``: without a callback in one loop
        (one encode, no task per client: :mod:`._sio_fanout`); with one, by python-socketio,
        which needs an ack id per client."""
        if not callback:  # python-socketio's test
            await send_to_room(self, event, data, namespace, room, skip_sid)
        else:
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback
            )

    async def _handle(self, link: Link, envelope: Envelope, message: Message) -> None:
        namespace = link.namespace
        if isinstance(message, Emit):
            await self._handle_emit(link, envelope, message)
        elif isinstance(message, Ack):
            await self.trigger_callback(message.key, message.id, message.args)
        elif isinstance(message, CloseRoom):
            await super().close_room(message.room, namespace)
            await self._close_released()
        elif not self._is_local(message.sid, namespace):
            return  # the client left meanwhile
        elif isinstance(message, Disconnect):
            await self.server.disconnect(message.sid, namespace=namespace, ignore_queue=True)
        elif isinstance(message, EnterRoom):
            await self.enter_room(message.sid, namespace, message.room)
        else:
            await self.leave_room(message.sid, namespace, message.room)

    async def _handle_emit(self, link: Link, envelope: Envelope, message: Emit) -> None:
        namespace = link.namespace
        skip = set(message.skip)
        if message.multi is not None:
            # The clients this node already served from another room's envelope of the same
            # emit. Remembered rather than computed from the other rooms' members now, which
            # may have changed since that envelope was handled.
            served = self._served.pop(message.multi, set())
            skip |= served
            served.update(sid for sid in self.rooms.get(namespace, {}).get(link.room, ()))
            self._served[message.multi] = served
            if len(self._served) > _SERVED_EMITS:
                self._served.popitem(last=False)
        if message.offset is not None and message.ack is None:
            await self._serve(
                message.event, message.args, namespace, [link.room], list(skip), message.offset
            )
            return
        callback = None
        if message.ack is not None:
            callback = functools.partial(
                self._return_ack, envelope.origin, message.rooms[0], message.ack
            )
        await self._emit_here(
            message.event, tuple(message.args), namespace, link.room, list(skip), callback
        )

    async def _return_ack(self, origin: str, key: RoomKey, ack: int, *args: Any) -> None:
        if origin == self.router.node_id:
            await self.trigger_callback(key, ack, list(args))
        else:
            await self._publish_to(self._node_room(origin), encode(Ack(key, ack, list(args))))
