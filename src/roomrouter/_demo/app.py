"""The demo chat server: a Starlette app on one :class:`~roomrouter.RoomRouter`.

Each WebSocket connection is one :class:`~roomrouter.Member`. The page (``static/index.html``)
and the server speak JSON text frames:

client -> server::

    {"type": "join", "room": "lobby", "name": "alice", "since": null}
    {"type": "send", "text": "hello"}

server -> client::

    {"type": "hello", "node": "<node id>", "broker": "memory", "history": 50,
     "max_payload": 16384, "presence": true}
    {"type": "joined", "room": "lobby", "mode": "history" | "since" | "live",
     "recovered": 3, "complete": true, "member": "<member id>"}
    {"type": "message", "id": "<envelope id>", "room": "lobby", "ts": 1730000000.0,
     "node": "<origin node>", "name": "alice", "text": "hello"}
    {"type": "messages", "messages": [<message frame>, ...]}
    {"type": "presence", "room": "lobby", "members": [<member>, ...]}
    {"type": "presence_event", "kind": "join" | "leave", "room": "lobby", "member": <member>}
    {"type": "error", "request": "join" | "send" | "frame" | "presence",
     "error": "PayloadTooLarge", "message": "..."}

where ``<member>`` is ``{"id": "<member id>", "name": "alice", "node": "<node id>",
"since": 1730000000.0}``.

Live messages that reach the connection together (a room's delivery batch, or whatever its
inbox held when the connection's pump woke) go out as one ``messages`` frame, in order, so a
busy room costs one WebSocket send per batch rather than per message; a batch of one is a
plain ``message`` frame. A ``messages`` frame stays under :data:`MAX_BATCH_FRAME` bytes (a
longer batch is split over several).

A ``join`` without ``since`` delivers the room's last ``history`` messages first (``mode``
``"history"``); with ``since=<last id the client saw>`` (a reconnect) it delivers exactly the
stored messages after that id (``mode`` ``"since"``), and ``complete`` False means some may be
missing. ``joined`` is always sent before the history it announces. A new ``join`` switches
rooms: one room per connection keeps the page simple, not the library.

Presence (on when the broker is memory or Redis, or with ``DemoSettings.presence``): after
``joined``, the connection watches the room's presence, sends the whole list once
(``presence``), then every join and leave (``presence_event``). The list is read after the
watch began, so an event may repeat what the list already says: the page treats both as a set
keyed by member id. A member's name is its presence ``info``, fixed when the member is made, so
a join under another name makes a new member (and the old one leaves).

Messages are published with ``persist=True``: the router puts them on the broker's storage
queue and recent cache, and a :class:`~roomrouter.storage.StorageWorker` running in this
process (one per node; workers compete, writes are idempotent) moves them into the sink the
router reads history from. On a broker without a storage queue the chat is live-only.

Bad input never costs anything but an error frame to its sender: an oversize message
(:class:`~roomrouter.PayloadTooLarge`), an empty one (``EmptyMessage``), a bad room name
(:class:`~roomrouter.InvalidRoomName`), a frame that is not a known request (``BadRequest``),
a ``send`` before a ``join`` (``NotJoined``). The connection and the member stay as they were.
The server's WebSocket frame limit (``server.py``) is far above ``max_payload`` so that an
oversize message reaches this code and gets its error frame, instead of the transport closing
the connection with 1009; the page also checks the size before sending.

Slow clients: every member has a bounded inbox (``inbox_size``) with the ``"disconnect"``
overflow policy. A client that reads too slowly to keep up (its socket stops draining, the
inbox fills) is closed with code 4000; the page reconnects at once with ``since`` and gets
what it missed from storage. Dropping the oldest messages instead would leave a silent gap in
the middle of the conversation. A single send stalled for ``send_timeout`` closes the
connection the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from urllib.parse import urlsplit

import anyio
import msgspec
from anyio.abc import TaskGroup

# Imported before roomrouter's integration so a missing package is an ImportError, which the
# command turns into 'pip install "roomrouter[demo]"' (the demo extra pulls it in).
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .._envelope import Envelope
from .._errors import (
    ConfigurationError,
    DeliveryGap,
    HistoryUnavailable,
    MemberClosed,
    RoomRouterError,
)
from .._member import Member, Recovery
from .._router import RoomRouter
from .._urls import broker_from_url
from ..brokers.transport import Backoff
from ..integrations.prometheus import RoomRouterCollector
from ..presence import PresenceEntry, presence_from_url
from ..storage import StorageWorker, sink_from_url

__all__ = ["DemoSettings", "create_app", "startup_error"]

log = logging.getLogger("roomrouter.demo")

#: Close code for a client that could not keep up (application range 4000-4999).
CLOSE_OVERFLOW = 4000
#: Close code when the router is not running (starting or shutting down): try again.
CLOSE_TRY_AGAIN = 1013

MAX_NAME_LENGTH = 32
#: The most bytes of messages one ``messages`` frame carries (a batch beyond is split): below
#: the 1 MiB frame limit of common WebSocket clients (python's websockets), whatever the
#: batch and message sizes.
MAX_BATCH_FRAME = 512 * 1024
MAX_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What the demo runs on. The defaults need no service: the in-memory broker and a SQLite
    file ``roomrouter-demo.db`` in the current directory (history survives a restart)."""

    broker: str = "memory://"
    sink: str = "sqlite:///roomrouter-demo.db"
    namespace: str = "demo"
    #: Messages a first join of a room shows.
    history: int = 50
    #: Run a storage worker in this process (turn off when ``roomrouter worker`` runs apart).
    worker: bool = True
    inbox_size: int = 256
    max_payload: int = 16 * 1024
    max_room_length: int = 64
    send_timeout: float = 10.0
    #: The router's ``delivery_batch_delay`` (docs/batching.md): live messages of a room that
    #: arrive within it reach each connection as one ``messages`` frame. 0: no delay (what
    #: arrived meanwhile is still sent as one frame).
    delivery_batch_delay: float = 0.0
    #: Where the who-is-here list is kept: ``None`` (the default) for the broker's own server
    #: when it is memory or Redis and no list otherwise; a URL (``"redis://127.0.0.1/0"``, say
    #: beside an ``amqp://`` broker); ``False`` for none.
    presence: str | bool | None = None


#: Broker schemes whose server can keep presence too (``presence=True``).
_PRESENCE_SCHEMES = ("memory", "redis", "rediss", "unix")


def _presence_option(settings: DemoSettings) -> str | bool:
    if settings.presence is None:
        return urlsplit(settings.broker).scheme.lower() in _PRESENCE_SCHEMES
    return settings.presence


# -- the wire format ----------------------------------------------------------------------------


class _Join(msgspec.Struct, tag_field="type", tag="join", forbid_unknown_fields=True):
    room: str
    name: str
    since: str | None = None


class _Send(msgspec.Struct, tag_field="type", tag="send", forbid_unknown_fields=True):
    text: str


class _Chat(msgspec.Struct):
    """The payload of a chat message: what the router carries, opaque to it."""

    name: str
    text: str


_requests = msgspec.json.Decoder(_Join | _Send)
_chat_payload = msgspec.json.Decoder(_Chat)
_json = msgspec.json.Encoder()


def _error(request: str, error: str, message: str) -> dict[str, object]:
    return {"type": "error", "request": request, "error": error, "message": message}


def _member_frame(entry: PresenceEntry) -> dict[str, object]:
    return {
        "id": entry.member,
        "name": entry.info.get("name", entry.member),
        "node": entry.node,
        "since": entry.since,
    }


class _BadRequest(Exception):
    """A request this server understands the shape of but refuses (not a roomrouter error)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise _BadRequest("BadRequest", f"a name is 1 to {MAX_NAME_LENGTH} printable characters")
    return name


# -- one connection -----------------------------------------------------------------------------


class _Connection:
    """One WebSocket and its member. Tasks in the connection's task group: ``read_loop``
    handles requests, one ``pump`` per member moves its inbox to the socket, one watcher
    follows the room's presence. Every send goes through ``_send_lock``, so a ``joined`` frame
    and the history it announces cannot be interleaved. The member is made at the first join
    (its presence info holds the name); a join under another name replaces it."""

    def __init__(
        self,
        websocket: WebSocket,
        router: RoomRouter,
        settings: DemoSettings,
        task_group: TaskGroup,
        *,
        presence: bool,
    ) -> None:
        self.websocket = websocket
        self.router = router
        self.settings = settings
        self.task_group = task_group
        self.presence = presence
        self.member: Member | None = None
        self.room: str | None = None
        self.name: str | None = None
        self.persist = router.broker.supports_storage
        self.has_history = router.sink is not None or router.broker.supports_storage
        self._send_lock = anyio.Lock()
        self._watch_scope: anyio.CancelScope | None = None

    async def send(self, frame: dict[str, object]) -> None:
        async with self._send_lock:
            await self._send_unlocked(frame)

    async def _send_unlocked(self, frame: dict[str, object]) -> None:
        await self._send_text(_json.encode(frame).decode())

    async def _send_text(self, text: str) -> None:
        # A client that stops reading stalls the send (uvicorn waits for the transport to drain):
        # bounded, so a stuck client cannot hold its connection and member forever.
        with anyio.fail_after(self.settings.send_timeout):
            await self.websocket.send_text(text)

    async def close_member(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.cancel()
        if self.member is not None:
            await self.member.close()

    async def read_loop(self) -> None:
        """Handle requests until the client goes away (or a reply to it stalls)."""
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._handle(message.get("text"))
        except (WebSocketDisconnect, WebSocketDisconnected, TimeoutError, MemberClosed):
            return  # gone, stuck, or closed for overflow: the pump closes the socket

    async def _handle(self, text: str | None) -> None:
        if text is None:
            await self.send(_error("frame", "BadRequest", "send JSON text frames"))
            return
        try:
            request = _requests.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.send(_error("frame", "BadRequest", str(exc)))
            return
        if isinstance(request, _Join):
            await self.join(request)
        else:
            await self.publish(request)

    async def join(self, request: _Join) -> None:
        try:
            name = _check_name(request.name)
            if request.since is not None and not 0 < len(request.since) <= MAX_ID_LENGTH:
                raise _BadRequest("BadRequest", "since must be a message id")
        except _BadRequest as exc:
            await self.send(_error("join", exc.error, str(exc)))
            return
        room, previous, old = request.room, self.room, self.member
        # Held across the join: the history it queues must not overtake the `joined` frame.
        async with self._send_lock:
            fresh: Member | None = None
            mode = "live"
            recovery = Recovery()
            try:
                if old is not None and name == self.name:
                    member = old
                    if previous == room:
                        # Joining the room it is in again: a fresh start (new history).
                        await member.leave(room)
                        self.room = None
                else:
                    member = fresh = self.router.member(info={"name": name})
                # Join the new room before leaving the old one, so a refused join (bad name,
                # broker down) leaves the client where it was.
                if request.since is not None and self.has_history:
                    mode = "since"
                    recovery = await member.join(room, since=request.since)
                elif self.settings.history and self.has_history:
                    mode = "history"
                    recovery = await member.join(room, history=self.settings.history)
                else:
                    await member.join(room)
            except MemberClosed:
                if fresh is not None:
                    await fresh.close()
                raise
            except HistoryUnavailable as exc:
                # Joined and live, but the history could not be read: say so, carry on.
                await self._send_unlocked(_error("join", type(exc).__name__, str(exc)))
                recovery = Recovery(complete=False)
            except RoomRouterError as exc:  # InvalidRoomName, BrokerUnavailable, ...
                if fresh is not None:
                    await fresh.close()
                await self._send_unlocked(_error("join", type(exc).__name__, str(exc)))
                return
            if fresh is not None:
                self.member = fresh
                self.task_group.start_soon(self._pump_task, fresh)
                if old is not None:
                    await old.close()  # leaves its room: the others see the old name go
            elif previous is not None and previous != room:
                await member.leave(previous)
            self.room, self.name = room, name
            await self._send_unlocked(
                {
                    "type": "joined",
                    "room": room,
                    "mode": mode,
                    "recovered": recovery.count,
                    "complete": recovery.complete,
                    "member": member.id,  # so the page can tell itself in the presence list
                }
            )
            self._watch(room)

    async def publish(self, request: _Send) -> None:
        if self.room is None or self.name is None:
            await self.send(_error("send", "NotJoined", "join a room first"))
            return
        if not request.text.strip():
            await self.send(_error("send", "EmptyMessage", "a message needs some text"))
            return
        payload = _json.encode(_Chat(name=self.name, text=request.text))
        try:
            # Not excluding the sender: its own message comes back through its inbox, in order
            # with everyone else's and with its id, which the page needs for `since`.
            await self.router.publish(self.room, payload, persist=self.persist)
        except RoomRouterError as exc:
            await self.send(_error("send", type(exc).__name__, str(exc)))

    # -- presence -------------------------------------------------------------------------------

    def _watch(self, room: str) -> None:
        """Follow ``room``'s presence from now on (and stop following the previous room)."""
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            self._watch_scope = None
        if not self.presence:
            return
        scope = self._watch_scope = anyio.CancelScope()
        self.task_group.start_soon(self._watch_task, room, scope)

    async def _watch_task(self, room: str, scope: anyio.CancelScope) -> None:
        with scope:
            try:
                try:
                    await self._follow_presence(room)
                except RoomRouterError as exc:  # the store is down: the chat goes on without it
                    log.warning("presence of %r: %s", room, exc)
                    await self._send_if_in(room, _error("presence", type(exc).__name__, str(exc)))
            except (WebSocketDisconnect, WebSocketDisconnected, TimeoutError):
                self.task_group.cancel_scope.cancel()  # the client is gone or stuck

    async def _follow_presence(self, room: str) -> None:
        # Watch first, then read the list: nothing falls between the two (an event may repeat
        # the list; the page keys both by member id).
        async with self.router.watch_presence(room) as events:
            entries = await self.router.presence(room)
            members = [_member_frame(e) for e in entries]
            state: dict[str, object] = {"type": "presence", "room": room, "members": members}
            await self._send_if_in(room, state)
            async for event in events:
                frame: dict[str, object] = {
                    "type": "presence_event",
                    "kind": event.kind,
                    "room": room,
                    "member": _member_frame(event.entry),
                }
                await self._send_if_in(room, frame)

    async def _send_if_in(self, room: str, frame: dict[str, object]) -> None:
        async with self._send_lock:
            # Checked under the lock: a join that moved to another room holds it.
            if self.room == room:
                await self._send_unlocked(frame)

    # -- the inbox ------------------------------------------------------------------------------

    async def _pump_task(self, member: Member) -> None:
        if await self.pump(member):
            self.task_group.cancel_scope.cancel()

    async def pump(self, member: Member) -> bool:
        """Send what arrives in ``member``'s inbox until the member or the socket closes; close
        the socket with :data:`CLOSE_OVERFLOW` if the client did not keep up. True if the
        connection is over (False: the member was replaced, or closed with the connection)."""
        try:
            while True:
                try:
                    batch = await member.receive_batch()  # a room's batch: one wake-up
                except MemberClosed:
                    break
                except DeliveryGap:
                    # Messages may be missing (the node lost its broker connection): the
                    # client recovers them as after an overflow, by reconnecting with `since`.
                    await self._close(CLOSE_OVERFLOW, "messages missed: reconnect with since")
                    return True
                if member.close_reason == "overflow":
                    break  # the client recovers what is queued, and more, with `since`
                async with self._send_lock:
                    # Checked under the lock: a join in progress holds it and sets the room
                    # (and the member, whose replaced predecessor may still hold messages).
                    frames = [
                        frame
                        for envelope in batch
                        if member is self.member and envelope.room == self.room
                        if (frame := self._message_frame(envelope)) is not None
                    ]
                    for text in _batch_frames(frames):
                        await self._send_text(text)
        except TimeoutError:
            log.info("member %s: a send stalled for %ss", member.id, self.settings.send_timeout)
            await self._close(CLOSE_OVERFLOW, "too slow: reconnect with since")
            return True
        except (WebSocketDisconnect, WebSocketDisconnected):
            return True
        if member.close_reason == "overflow":
            await self._close(CLOSE_OVERFLOW, "too slow: reconnect with since")
            return True
        if member.close_reason == "router closed":
            await self._close(CLOSE_TRY_AGAIN, "server shutting down")
            return True
        return False

    @staticmethod
    def _message_frame(envelope: Envelope) -> dict[str, object] | None:
        try:
            chat = _chat_payload.decode(envelope.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # Someone else published to the room: not ours to show, not fatal either.
            log.warning("dropped a message of %r that is not demo chat JSON", envelope.room)
            return None
        return {
            "type": "message",
            "id": envelope.id,
            "room": envelope.room,
            "ts": envelope.ts,
            "node": envelope.origin,
            "name": chat.name,
            "text": chat.text,
        }

    async def _close(self, code: int, reason: str) -> None:
        # The socket may be the stuck one: do not wait long for the close frame to go out.
        with anyio.move_on_after(1.0):
            try:
                await self.websocket.close(code, reason)
            except (WebSocketDisconnect, WebSocketDisconnected):
                pass


def _batch_frames(frames: list[dict[str, object]]) -> list[str]:
    """The text frames that carry ``frames`` (message frames, in order): one ``message`` frame
    for a single one, else ``messages`` frames of at most :data:`MAX_BATCH_FRAME` bytes of
    messages each (a message is never split; one alone may exceed it)."""
    if len(frames) == 1:
        return [_json.encode(frames[0]).decode()]
    texts: list[str] = []
    parts: list[bytes] = []
    size = 0
    for frame in frames:
        part = _json.encode(frame)
        if parts and size + len(part) > MAX_BATCH_FRAME:
            texts.append(_messages_frame(parts))
            parts, size = [], 0
        parts.append(part)
        size += len(part) + 1
    if parts:
        texts.append(_messages_frame(parts))
    return texts


def _messages_frame(parts: list[bytes]) -> str:
    if len(parts) == 1:
        return parts[0].decode()  # a message frame of its own
    return (b'{"type":"messages","messages":[' + b",".join(parts) + b"]}").decode()


# -- the app ------------------------------------------------------------------------------------


#: A speech bubble; the page carries the same one as a data: URL.
_FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<path d="M2 2h12v9H7l-3 3v-3H2z" fill="#2563eb"/></svg>'
)


def _first_roomrouter_error(exc: BaseException) -> RoomRouterError | None:
    """``exc`` if it is a roomrouter error, else the first one inside it (an exception group)."""
    if isinstance(exc, RoomRouterError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_roomrouter_error(inner)
            if found is not None:
                return found
    return None


class _Server:
    """The app's state: the router (while the app runs) and the storage worker."""

    def __init__(self, settings: DemoSettings) -> None:
        if settings.sink.partition("?")[0] in ("sqlite://:memory:", "sqlite:///:memory:"):
            raise ConfigurationError(
                "the demo's router and storage worker each open the sink: use a SQLite file "
                "(sqlite:///chat.db) or PostgreSQL, not :memory:"
            )
        if not 0 <= settings.history <= 10_000:
            raise ConfigurationError("history must be between 0 and 10000 messages")
        # Fail on a bad URL or a missing extra now, with roomrouter's message, rather than in
        # the server's startup (constructing opens nothing; the router is built in the lifespan).
        broker_from_url(settings.broker)
        sink_from_url(settings.sink)
        self.presence = _presence_option(settings)
        if isinstance(self.presence, str):
            presence_from_url(self.presence)
        elif self.presence and urlsplit(settings.broker).scheme.lower() not in _PRESENCE_SCHEMES:
            raise ConfigurationError(
                f"the {urlsplit(settings.broker).scheme} broker keeps no presence: give "
                "presence a URL (redis://...)"
            )
        self.settings = settings
        self.router: RoomRouter | None = None
        self.worker: StorageWorker | None = None
        self._worker_done: anyio.Event | None = None  # made in the lifespan, in the event loop
        self.connections = 0
        self.startup_error: RoomRouterError | None = None  # why the lifespan could not start
        # Read once, from the package (works from a wheel as well as from a checkout).
        page = files("roomrouter._demo").joinpath("static/index.html")
        self.page = page.read_text(encoding="utf-8")
        # Its own registry, not prometheus_client's global one: several demo apps can run in
        # one process (the tests do), each with its own router.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RoomRouterCollector(lambda: self.router, worker=lambda: self.worker))

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        s = self.settings
        router = RoomRouter.from_url(
            s.broker,
            namespace=s.namespace,
            sink=s.sink,
            inbox_size=s.inbox_size,
            overflow="disconnect",
            max_payload=s.max_payload,
            max_room_length=s.max_room_length,
            presence=self.presence,
            delivery_batch_delay=s.delivery_batch_delay,
        )
        run_worker = s.worker and router.broker.supports_storage
        if not router.broker.supports_storage:
            log.warning("the %s backend has no storage queue: live chat only", router.broker.name)
        self._worker_done = anyio.Event()
        started = False
        try:
            async with self._serving(router, run_worker):
                started = True
                yield
        except BaseException as exc:
            if not started:
                self.startup_error = _first_roomrouter_error(exc)
            raise

    @asynccontextmanager
    async def _serving(self, router: RoomRouter, run_worker: bool) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            try:
                async with router:
                    if run_worker:
                        tg.start_soon(self._run_worker, router.node_id)
                    self.router = router
                    yield
            finally:
                self.router = None
                # The router is closed: nothing more is published. Let the worker store what
                # is queued first (the memory broker's queue dies with this process); shielded
                # and bounded, so a cancelled shutdown still stores what it can.
                with anyio.CancelScope(shield=True):
                    await self._stop_worker()
                tg.cancel_scope.cancel()

    async def _run_worker(self, node_id: str) -> None:
        """Run a storage worker; one that fails is logged and replaced after a capped backoff
        (a sink cannot be started twice, so each attempt builds a new worker)."""
        s = self.settings
        backoff = Backoff(0.5, 10.0)
        try:
            while True:
                self.worker = StorageWorker.from_urls(
                    s.broker, s.namespace, s.sink, name=f"demo-{node_id}", max_delay=0.05
                )
                try:
                    await self.worker.run()
                    return
                except Exception:
                    log.exception("storage worker failed; restarting")
                await backoff.sleep()
        finally:
            assert self._worker_done is not None
            self._worker_done.set()

    async def _stop_worker(self, drain_timeout: float = 5.0) -> None:
        worker, done = self.worker, self._worker_done
        if worker is None or done is None:
            return
        with anyio.move_on_after(drain_timeout):
            # Set when a fetch finds the queue empty, after the batches in hand were stored.
            await worker.idle.wait()
        worker.stop()  # returns after the batch in hand, if one arrived meanwhile
        with anyio.move_on_after(2.0):
            await done.wait()

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def favicon(self, request: Request) -> Response:
        # The page names its icon inline; this is for a browser that asks anyway (/stats).
        return Response(_FAVICON, media_type="image/svg+xml")

    async def stats(self, request: Request) -> Response:
        router = self.router
        if router is None:
            return JSONResponse({"running": False}, status_code=503)
        return JSONResponse(
            {
                "running": True,
                "node": router.node_id,
                "broker": router.broker.name,
                "connections": self.connections,
                "router": router.stats(),
                "worker": asdict(self.worker.stats) if self.worker is not None else None,
            }
        )

    async def metrics(self, request: Request) -> Response:
        return Response(
            generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    async def websocket(self, websocket: WebSocket) -> None:
        router = self.router
        if router is None:
            await websocket.close(CLOSE_TRY_AGAIN, "server not running")
            return
        await websocket.accept()
        self.connections += 1
        connection: _Connection | None = None
        try:
            async with anyio.create_task_group() as tg:
                connection = _Connection(
                    websocket, router, self.settings, tg, presence=self.presence is not False
                )
                await connection.send(
                    {
                        "type": "hello",
                        "node": router.node_id,
                        "broker": router.broker.name,
                        "history": self.settings.history if connection.has_history else 0,
                        "max_payload": router.max_payload,
                        "presence": connection.presence,
                    }
                )
                # The read loop ends with the client; a pump or the watcher cancels the group
                # when the member overflowed, the router closed, or the client stalled.
                await connection.read_loop()
                tg.cancel_scope.cancel()
        except (WebSocketDisconnect, WebSocketDisconnected, TimeoutError):
            pass  # the hello frame could not be sent: the client is gone already
        finally:
            self.connections -= 1
            if connection is not None:
                with anyio.CancelScope(shield=True):
                    await connection.close_member()


def create_app(settings: DemoSettings | None = None) -> Starlette:
    """The demo chat app: ``GET /`` the page (``/favicon.ico`` its icon), ``/ws`` the
    WebSocket, ``GET /stats`` the node's counters as JSON, ``GET /metrics`` the same for
    Prometheus. The router starts and stops with the app's lifespan, so serve it with lifespan
    events on (uvicorn does by default)."""
    server = _Server(settings or DemoSettings())
    app = Starlette(
        routes=[
            Route("/", server.index),
            Route("/favicon.ico", server.favicon),
            Route("/stats", server.stats),
            Route("/metrics", server.metrics),
            WebSocketRoute("/ws", server.websocket),
        ],
        lifespan=server.lifespan,
    )
    app.state.demo_server = server
    return app


def startup_error(app: object) -> RoomRouterError | None:
    """Why the lifespan of ``app`` (made by :func:`create_app`) could not start, if it could
    not: the first roomrouter error of the failure (a task group wraps it in a group)."""
    server = getattr(getattr(app, "state", None), "demo_server", None)
    return server.startup_error if isinstance(server, _Server) else None
