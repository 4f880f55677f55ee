"""The hosting layer of :class:`~roomrouter.integrations.socketio.RoomRouterManager`: the
router's lifecycle with the server, and this node's membership of roomrouter rooms -- one
:class:`~roomrouter.Member` per Socket.IO room that has a local client (joined with its first
local client, left with its last), each with a reader that hands every envelope to the
manager's ``_handle``, plus the presence of the local clients of those rooms.

What goes over the wire and what python-socketio's calls mean on it is the manager's
(:mod:`._socketio`); this module decides only when the node is subscribed to what.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .._envelope import Envelope
from .._errors import (
    ConfigurationError,
    DeliveryGap,
    MemberClosed,
    MissingDependency,
    RoomRouterError,
    RouterNotRunning,
)
from .._member import Member
from .._router import RoomRouter
from ._sio_wire import Message, RoomKey, decode

try:
    import socketio
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency("socketio", "socketio") from exc

__all__ = ["HostingManager", "Link"]


@dataclass(eq=False, slots=True)
class Link:
    """This node's membership of one roomrouter room, on behalf of all its local clients."""

    name: str
    namespace: str
    room: RoomKey
    member: Member
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None


class HostingManager(socketio.AsyncManager):  # type: ignore[misc]
    """A python-socketio ``AsyncManager`` on a roomrouter router that it starts with the
    server, with one member per local Socket.IO room; the base of ``RoomRouterManager`` (whose
    docstring has the options), which implements :meth:`_handle`."""

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
        self._links: dict[str, Link] = {}
        # Links whose last local client left, in a synchronous python-socketio method
        # (basic_leave_room); the next await of this manager closes their members.
        self._released: list[Link] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Future[None] | None = None
        self._closed = False
        #: Messages from the broker that could not be decoded (dropped), and messages whose
        #: handling raised (logged); for monitoring.
        self.undecodable = 0
        self.handler_errors = 0
        #: Rooms told their messages may be missing (:class:`~roomrouter.DeliveryGap`: the
        #: node's data connection was lost; Socket.IO emits are live-only, so they are gone).
        self.delivery_gaps = 0

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
        link = self._links[name] = Link(name, namespace, room, member)
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

    # -- the readers -------------------------------------------------------------------------------

    async def _read(self, link: Link) -> None:
        """The reader of one link: handles each envelope in turn (so per room and origin in
        publish order); a bad one is counted and logged, never the end of the reader. It takes
        what the room's delivery batch brought in one wake-up (``receive_batch``)."""
        while True:
            try:
                batch = await link.member.receive_batch()
            except MemberClosed:
                break
            except DeliveryGap:
                self.delivery_gaps += 1
                self._get_logger().warning(
                    "roomrouter manager: emits to %s may have been lost (broker connection lost)",
                    link.name,
                )
                continue
            for envelope in batch:
                message = decode(envelope.payload)
                if message is None:
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

    async def _handle(self, link: Link, envelope: Envelope, message: Message) -> None:
        """Act on one message of ``link``'s room (the manager's protocol)."""
        raise NotImplementedError
