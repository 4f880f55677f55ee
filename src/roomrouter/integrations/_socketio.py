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
node, then sent to the room's local clients by python-socketio itself (``skip_sid`` included).
One Member per client would hold the same subscriptions, but would queue, decode and encode
every message once per client.

Payloads are msgpack (msgspec), never pickle: bytes inside emitted data travel as msgpack
binary, and nothing read from the broker is ever unpickled.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .._envelope import Envelope
from .._errors import (
    ConfigurationError,
    DeliveryGap,
    InvalidRoomName,
    MemberClosed,
    MissingDependency,
    PayloadTooLarge,
    RoomRouterError,
    RouterNotRunning,
)
from .._member import Member
from .._router import RoomRouter

try:
    import socketio
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency("socketio", "socketio") from exc

__all__ = ["RoomRouterManager", "Restore"]

#: A Socket.IO room: a name, or ``None`` for "every client of the namespace". Integers are
#: allowed since python-socketio allows any hashable; they stay distinct from their str form.
RoomKey = str | int | None


# -- the messages nodes exchange (the envelope payload) --------------------------------------
# Tagged msgpack arrays: a node that meets a tag it does not know drops the message (counted)
# instead of misreading it, so new kinds can be added later.


class _Emit(msgspec.Struct, array_like=True, tag=1):
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


class _Disconnect(msgspec.Struct, array_like=True, tag=2):
    sid: str


class _EnterRoom(msgspec.Struct, array_like=True, tag=3):
    sid: str
    room: RoomKey


class _LeaveRoom(msgspec.Struct, array_like=True, tag=4):
    sid: str
    room: RoomKey


class _CloseRoom(msgspec.Struct, array_like=True, tag=5):
    room: RoomKey


class _Ack(msgspec.Struct, array_like=True, tag=6):
    key: RoomKey
    id: int
    args: list[Any]


_Message = _Emit | _Disconnect | _EnterRoom | _LeaveRoom | _CloseRoom | _Ack

#: Multi-room emits a node remembers whom it served for: far more than can be in flight at
#: once; an older one evicted would at worst serve a client in several of its rooms twice.
_SERVED_EMITS: Final = 4096

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_Message)


def _encode(message: _Message) -> bytes:
    try:
        return _encoder.encode(message)
    except (TypeError, msgspec.EncodeError) as exc:
        # What json.dumps would refuse for a local client too: a programming error, not ours.
        raise TypeError(f"Socket.IO data cannot be sent to other nodes: {exc}") from exc


def _as_args(data: Any) -> list[Any]:
    # AsyncManager.emit's rule: a tuple is several arguments, None is none, else one.
    if isinstance(data, tuple):
        return list(data)
    return [] if data is None else [data]


def _rooms_of(to: Any) -> list[RoomKey]:
    # python-socketio's rule (get_participants): a non-str sized value is a list of rooms.
    rooms = list(to) if hasattr(to, "__len__") and not isinstance(to, str) else [to]
    for room in rooms:
        if room is not None and (isinstance(room, bool) or not isinstance(room, str | int)):
            raise InvalidRoomName(f"a Socket.IO room must be a str or an int, not {room!r}")
    return rooms


def _skips(skip_sid: Any) -> list[str]:
    if skip_sid is None:
        return []
    return [s for s in (skip_sid if isinstance(skip_sid, list) else [skip_sid]) if s is not None]


class _OffsetIds:
    """UUIDv7 ids whose 12 ``rand_a`` bits are the sub-millisecond fraction (RFC 9562,
    method 3), strictly increasing here. Offsets of emits made by nodes of one host (or with
    synchronised clocks) then follow the time of the emits to about 0.25 µs; the router's
    ids, with a counter from a random start, leave ids of two nodes in one millisecond
    unordered, which would send a recovered client two nodes' emits out of order."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0  # milliseconds << 12 | fraction

    def next(self) -> str:
        ns = time.time_ns()
        stamp = ((ns // 1_000_000) << 12) | ((ns % 1_000_000) * 4096 // 1_000_000)
        self._last = stamp = max(stamp, self._last + 1)
        rand = secrets.randbits(62)
        value = ((stamp >> 12) << 80) | (0x7 << 76) | ((stamp & 0xFFF) << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(eq=False, slots=True)
class Restore:
    """A session to restore in ``pre_connect``: its sid and rooms, and the offset after which
    its client missed the room emits. ``recovered`` is set once it was (all missed emits
    found); otherwise the connection was made a new session."""

    sid: str
    rooms: list[RoomKey]
    since: str
    recovered: bool = False


@dataclass(eq=False, slots=True)
class _Link:
    """This node's membership of one roomrouter room, on behalf of all its local clients."""

    name: str
    namespace: str
    room: RoomKey
    member: Member
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None


class RoomRouterManager(socketio.AsyncManager):  # type: ignore[misc]
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
        super().__init__()
        if (url is None) == (router is None):
            raise ConfigurationError("give RoomRouterManager a broker URL or router=, not both")
        if router is None:
            assert url is not None
            router = RoomRouter.from_url(url, **router_options)
            self._owns_router = True
            # Kept to build a new router after a failed start (a router starts once).
            self._url, self._router_options = url, router_options
        elif not isinstance(router, RoomRouter):
            raise ConfigurationError(f"router must be a RoomRouter, not {router!r}")
        elif router_options:
            raise ConfigurationError("router options go to the RoomRouter given as router=")
        else:
            self._owns_router = False
        self.router: RoomRouter = router
        self.logger = logger
        self._links: dict[str, _Link] = {}
        # Links whose last local client left, in a synchronous python-socketio method
        # (basic_leave_room); the next await of this manager closes their members.
        self._released: list[_Link] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Future[None] | None = None
        self._closed = False
        # Multi-room emit id -> sids served for it here, oldest first (bounded, see _Emit.multi).
        self._served: OrderedDict[str, set[str]] = OrderedDict()
        #: Messages from the broker that could not be decoded (dropped), and messages whose
        #: handling raised (logged); for monitoring.
        self.undecodable = 0
        self.handler_errors = 0
        #: Rooms told their messages may be missing (:class:`~roomrouter.DeliveryGap`: the
        #: node's data connection was lost; Socket.IO emits are live-only, so they are gone).
        self.delivery_gaps = 0
        # Connection state recovery (set by roomrouter's AsyncServer, see _sio_recovery):
        # whether room emits carry offsets and are persisted, the offsets' generator, and the
        # clients being recovered: (namespace, sid) -> packets held back until their missed
        # ones were sent, as (offset, event, args).
        self.recovery = False
        self._offsets = _OffsetIds()
        self._holds: dict[tuple[str, str], list[tuple[str, str, list[Any]]]] = {}
        #: (eio sid, namespace) -> the session the next pre_connect restores (set by the
        #: server); its ``recovered`` says afterwards whether it was.
        self.restoring: dict[tuple[Any, str], Restore] = {}
        #: Called after a local client's rooms changed (the server re-saves its session).
        self.on_rooms_changed: Callable[[str, str], Awaitable[None]] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def set_server(self, server: Any) -> None:
        """Called by ``socketio.AsyncServer``. The server's ``shutdown()`` gets this manager's
        :meth:`aclose` after it, since python-socketio tells its manager nothing at shutdown."""
        super().set_server(server)
        shutdown = server.shutdown

        @functools.wraps(shutdown)
        async def shutdown_then_close() -> None:
            try:
                await shutdown()
            finally:
                await self.aclose()

        server.shutdown = shutdown_then_close

    def initialize(self) -> None:
        """Called by the server before its first connection: start the router in one of the
        server's background tasks (connections wait for it in :meth:`pre_connect`)."""
        super().initialize()
        self._start_task()

    async def start(self) -> None:
        """Start now (the router connected and in the cluster when this returns), e.g. from an
        ASGI startup hook, so the node is ready before its first client. Optional: the server
        starts the manager on its first connection, and an emit starts it too."""
        await self._ready()

    async def aclose(self) -> None:
        """Leave every room, stop the readers and close the router if this manager built it.
        Idempotent; ``await server.shutdown()`` calls it."""
        if self._closed:
            return
        self._closed = True
        links = [*self._links.values(), *self._released]
        self._links.clear()
        self._released.clear()
        for link in links:
            await link.member.close()
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)
        if self._starting is not None and self._owns_router:
            try:
                await asyncio.shield(self._starting)
            except Exception:
                pass  # a failed start was logged and left nothing running
            await self.router.aclose()

    def _start_task(self) -> asyncio.Future[None]:
        if self._starting is None:
            if self.server is not None:
                starting = self.server.start_background_task(self._start_router)
            else:
                starting = asyncio.ensure_future(self._start_router())
            starting.add_done_callback(self._log_start_failure)
            self._starting = starting
        return self._starting

    async def _start_router(self) -> None:
        if self._owns_router:
            await self.router.start()

    def _log_start_failure(self, starting: asyncio.Future[None]) -> None:
        if not starting.cancelled() and starting.exception() is not None:
            self._get_logger().error(
                "roomrouter manager: the router did not start: %r", starting.exception()
            )

    async def _ready(self) -> None:
        if self._closed:
            raise RouterNotRunning("this RoomRouterManager was closed")
        starting = self._start_task()
        if self._failed(starting):
            self._renew()
            starting = self._start_task()
        try:
            # Shielded: the start is shared; a caller that gives up must not cancel it.
            await asyncio.shield(starting)
        except RoomRouterError:
            if self._starting is starting:
                self._renew()
            raise

    @staticmethod
    def _failed(starting: asyncio.Future[None]) -> bool:
        return starting.done() and not starting.cancelled() and starting.exception() is not None

    def _renew(self) -> None:
        """After a failed start of a router this manager built: build a new one, started by
        the next use. The broker may have been down only for a while (a cluster booting);
        a start that failed left nothing running to close."""
        if self._owns_router and not self._closed:
            self.router = RoomRouter.from_url(self._url, **self._router_options)
            self._starting = None

    # -- room names ------------------------------------------------------------------------------

    @staticmethod
    def room_name(namespace: str, room: RoomKey) -> str:
        """The roomrouter room that Socket.IO room ``room`` of Socket.IO namespace
        ``namespace`` travels in (``room=None``: the namespace's clients).

        Reversible and collision-free (a JSON array; ASCII, so control characters in a room
        name are escaped and allowed). Use it to reach a Socket.IO room with the router's own
        API, e.g. ``manager.router.rooms()`` or, in a cluster with presence, who is in it.
        """
        return "sio" + json.dumps([namespace or "/", room])

    @staticmethod
    def _node_room(node_id: str) -> str:
        return f"sio-node:{node_id}"

    # -- hosting: one member per local Socket.IO room ----------------------------------------

    async def _host(self, name: str, namespace: str, room: RoomKey) -> None:
        """Return once this node is in roomrouter room ``name`` (every emit to it from any node
        made afterwards is delivered here), or once the room lost its last local client again."""
        await self._ready()
        while True:
            link = self._links.get(name)
            if link is None:
                break
            await link.ready.wait()
            if link.error is not None:
                raise link.error
            if self._links.get(name) is link:
                return
            # That link was released or cancelled meanwhile: make our own, if still needed.
        if namespace and room not in self.rooms.get(namespace, ()):
            return  # its local clients left while we waited: nothing to host
        member = self.router.member(listed=False)  # its clients are listed, not it
        link = self._links[name] = _Link(name, namespace, room, member)
        reader = asyncio.create_task(self._read(link), name=f"roomrouter socketio {name}")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            await member.join(name)
        except MemberClosed:
            if self._links.get(name) is link:  # closed by the router, not released by us
                del self._links[name]
                link.error = RouterNotRunning("the router closed")
                raise link.error from None
        except BaseException as exc:
            if self._links.get(name) is link:
                del self._links[name]
            await member.close()
            if isinstance(exc, RoomRouterError):
                link.error = exc
            raise
        finally:
            link.ready.set()

    def basic_leave_room(self, sid: Any, namespace: Any, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        try:
            name = self.room_name(namespace, room)
        except TypeError:  # a room no link was made for (not JSON)
            return
        self.router.untrack_presence(name, str(sid))
        if room in self.rooms.get(namespace, ()):
            return
        link = self._links.pop(name, None)
        if link is not None:
            self._released.append(link)

    async def _close_released(self) -> None:
        while self._released:
            await self._released.pop().member.close()

    async def cluster_participants(self, namespace: str, room: RoomKey) -> list[tuple[str, str]]:
        """``(sid, node id)`` of every client in ``room`` on every node, oldest first — the
        cluster-wide counterpart of python-socketio's node-local ``get_participants``. Needs
        a router with presence (``RoomRouterManager(url, presence=True)`` on memory and Redis,
        or ``presence="redis://..."``); raises :class:`~roomrouter.ConfigurationError` without.
        The sid and namespace rooms are not tracked, only rooms clients entered."""
        await self._ready()
        entries = await self.router.presence(self.room_name(namespace or "/", room))
        return [(entry.member, entry.node) for entry in entries]

    def _is_local(self, sid: Any, namespace: str) -> bool:
        return bool(self.is_connected(sid, namespace) or self.is_pre_connected(sid, namespace))

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
        sid, key = restore.sid, (namespace, restore.sid)
        if self._is_local(sid, namespace) or key in self._holds:
            return None
        self._holds[key] = []
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
            missed = await self._missed(sid, namespace, [None, sid, *restore.rooms], restore.since)
        except Exception:
            self._get_logger().exception("roomrouter manager: cannot restore %s", sid)
            missed = None
        if missed is None:
            self._holds.pop(key, None)
            self.basic_disconnect(sid, namespace)
            await self._close_released()
            return None
        self._holds[key][:0] = missed
        restore.recovered = True
        return sid

    def offset_now(self) -> str:
        """A new offset: a position after every emit offset this node made so far, and after
        those of other nodes made before now (clocks allowing)."""
        return self._offsets.next()

    async def _missed(
        self, sid: str, namespace: str, rooms: list[RoomKey], since: str
    ) -> list[tuple[str, str, list[Any]]] | None:
        """The emits to ``rooms`` with an offset after ``since`` that ``sid`` was not skipped
        from, once each, in offset order; None if a cache may have lost some."""
        recovery = self.router._recovery
        reads = await asyncio.gather(
            *(recovery.since(self.room_name(namespace, room), since) for room in rooms)
        )
        found: dict[str, tuple[str, str, list[Any]]] = {}
        for envelopes, complete in reads:
            if not complete:
                return None
            for envelope in envelopes:
                try:
                    message = _decoder.decode(envelope.payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if (
                    isinstance(message, _Emit)
                    and message.offset is not None
                    and message.offset > since
                    and message.ack is None
                    and sid not in message.skip
                ):
                    found[message.offset] = (message.offset, message.event, message.args)
        return [found[offset] for offset in sorted(found)]

    async def connect(self, sid: Any, namespace: Any) -> Any:
        """Mark the client connected (the server sent its CONNECT answer); a recovered one then
        gets what it missed and what was held back for it, in offset order, then goes live."""
        sid = await super().connect(sid, namespace)
        key = (namespace or "/", sid)
        sent: set[str] = set()
        while True:
            held = self._holds.get(key)
            if held is None:
                return sid
            if not held:
                del self._holds[key]  # no await since the check: nothing can slip past
                return sid
            batch = {offset: (event, args) for offset, event, args in held if offset not in sent}
            held.clear()
            for offset in sorted(batch):
                sent.add(offset)
                event, args = batch[offset]
                await super().emit(event, (*args, offset), namespace or "/", room=sid)

    async def enter_room(self, sid: Any, namespace: Any, room: Any, eio_sid: Any = None) -> None:
        """Add a client of this node to ``room`` (returns once the node hosts the room), or ask
        the node of a remote client to."""
        namespace = namespace or "/"
        (room,) = _rooms_of([room])
        name = self.room_name(namespace, room)
        if not self._is_local(sid, namespace):
            await self._publish(namespace, [sid], _EnterRoom(sid, room))
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
            (room,) = _rooms_of([room])
            await self._publish(namespace, [sid], _LeaveRoom(sid, room))
            return
        await super().leave_room(sid, namespace, room)
        await self._close_released()
        if self.on_rooms_changed is not None and self.is_connected(sid, namespace):
            await self.on_rooms_changed(sid, namespace)

    async def close_room(self, room: Any, namespace: Any) -> None:
        """Remove every client of every node from ``room``."""
        namespace = namespace or "/"
        (room,) = _rooms_of([room])
        await super().close_room(room, namespace)
        await self._close_released()
        await self._publish(namespace, [room], _CloseRoom(room))

    async def can_disconnect(self, sid: Any, namespace: Any) -> bool:
        """True if ``sid`` is a client of this node (the server disconnects it); otherwise the
        request goes to the client's node, and False."""
        namespace = namespace or "/"
        if self._is_local(sid, namespace):
            return bool(await super().can_disconnect(sid, namespace))
        await self._publish(namespace, [sid], _Disconnect(sid))
        return False

    async def disconnect(self, sid: Any, namespace: Any, **kwargs: Any) -> None:
        """Forget a client of this node (the server calls it so, with ``ignore_queue=True``),
        or, called by the application, disconnect a client of any node."""
        namespace = namespace or "/"
        if kwargs.get("ignore_queue"):
            self._holds.pop((namespace, sid), None)
            await super().disconnect(sid, namespace)
            await self._close_released()
        elif self.is_connected(sid, namespace):
            await self.server.disconnect(sid, namespace=namespace, ignore_queue=True)
        elif self.eio_sid_from_sid(sid, namespace) is not None:  # connecting or disconnecting
            await super().disconnect(sid, namespace)
            await self._close_released()
        else:
            await self._publish(namespace, [sid], _Disconnect(sid))

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
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback
            )
            return
        namespace = namespace or "/"
        rooms = _rooms_of(room)
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
            payload = _encode(
                _Emit(event, _as_args(data), rooms, _skips(skip_sid), None, multi, offset)
            )
            if len(payload) > self.router.max_payload:
                # Refused before anyone is served: not only the emitting node's clients.
                raise PayloadTooLarge(
                    f"the emit is {len(payload)} bytes encoded; the router's max_payload is "
                    f"{self.router.max_payload}"
                )
        # Local clients first, in process: the broker is for the other nodes only.
        if offset is None:
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback
            )
        else:
            await self._serve(event, _as_args(data), namespace, rooms, _skips(skip_sid), offset)
        if not remote:
            return  # a client of this node is on no other node
        if callback is not None:
            await self._host(self._node_room(self.router.node_id), "", None)
            ack = self._generate_ack_id(rooms[0], callback)
            payload = _encode(_Emit(event, _as_args(data), rooms, _skips(skip_sid), ack))
        for i, name in enumerate(names):
            await self._publish_to(name, payload, id=ids[i] if ids else None)

    # -- to and from the other nodes ---------------------------------------------------------------

    async def _publish(self, namespace: str, rooms: list[RoomKey], message: _Message) -> None:
        payload = _encode(message)
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
        recovered gets it later, in offset order with its missed ones (see ``_holds``)."""
        skip = list(skip)
        if self._holds:
            members = self.rooms.get(namespace, {})
            for (held_ns, sid), held in self._holds.items():
                if held_ns != namespace or sid in skip:
                    continue
                if any(sid in members.get(room, ()) for room in rooms):
                    held.append((offset, event, args))
                    skip.append(sid)
        room: Any = rooms[0] if len(rooms) == 1 else rooms
        await super().emit(event, (*args, offset), namespace, room=room, skip_sid=skip)

    async def _read(self, link: _Link) -> None:
        """The reader of one link: handles each envelope in turn (so per room and origin in
        publish order); a bad one is counted and logged, never the end of the reader."""
        while True:
            try:
                envelope = await link.member.receive()
            except MemberClosed:
                break
            except DeliveryGap:
                self.delivery_gaps += 1
                self._get_logger().warning(
                    "roomrouter manager: emits to %s may have been lost (broker connection lost)",
                    link.name,
                )
                continue
            try:
                message = _decoder.decode(envelope.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.undecodable += 1
                self._get_logger().warning(
                    "roomrouter manager: dropped an undecodable message in %s", link.name
                )
                continue
            try:
                await self._handle(link, envelope, message)
            except Exception:
                self.handler_errors += 1
                self._get_logger().exception(
                    "roomrouter manager: handling a message of %s failed", link.name
                )
        if link.member.close_reason == "overflow" and self._links.get(link.name) is link:
            # The router's overflow="disconnect" policy closed the member of a room that still
            # has local clients: what overflowed is lost, but the room must be heard again.
            del self._links[link.name]
            try:
                await self._host(link.name, link.namespace, link.room)
            except Exception:
                self._get_logger().exception("roomrouter manager: cannot rejoin %s", link.name)

    async def _handle(self, link: _Link, envelope: Envelope, message: _Message) -> None:
        namespace = link.namespace
        if isinstance(message, _Emit):
            await self._handle_emit(link, envelope, message)
        elif isinstance(message, _Ack):
            await self.trigger_callback(message.key, message.id, message.args)
        elif isinstance(message, _CloseRoom):
            await super().close_room(message.room, namespace)
            await self._close_released()
        elif not self._is_local(message.sid, namespace):
            return  # the client left meanwhile
        elif isinstance(message, _Disconnect):
            await self.server.disconnect(message.sid, namespace=namespace, ignore_queue=True)
        elif isinstance(message, _EnterRoom):
            await self.enter_room(message.sid, namespace, message.room)
        else:
            await self.leave_room(message.sid, namespace, message.room)

    async def _handle_emit(self, link: _Link, envelope: Envelope, message: _Emit) -> None:
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
        await super().emit(
            message.event,
            tuple(message.args),
            namespace,
            room=link.room,
            skip_sid=list(skip),
            callback=callback,
        )

    async def _return_ack(self, origin: str, key: RoomKey, ack: int, *args: Any) -> None:
        if origin == self.router.node_id:
            await self.trigger_callback(key, ack, list(args))
        else:
            await self._publish_to(self._node_room(origin), _encode(_Ack(key, ack, list(args))))
