"""Socket.IO connection state recovery (socket.io 4.6+'s protocol) on roomrouter.

python-socketio has none; socket.io's own server keeps sessions and missed packets in one
process (or in its streams adapter). Here every part lives where any node can read it, so a
client recovers on whichever node the load balancer picks, also after its node died:

* **offsets are envelope ids.** With recovery on, :class:`RoomRouterManager` gives every emit
  without an ack an id (UUIDv7, so in time order), publishes each room's envelope with that id
  and ``persist=True`` -- the only publish that writes a room's recent cache -- and appends the
  offset to the arguments every client receives.
* **sessions are stored** (:class:`SessionStore`: Redis, or memory for one process) under the
  private session id (``pid``) the CONNECT answer carries, with a TTL: rewritten every
  ``max_disconnection_duration / 3`` while connected (so they outlive a node that dies by one
  window), and with the TTL of the window when the transport is lost.
* **a reconnect** whose CONNECT auth holds ``{pid, offset}`` takes the session (once: GETDEL),
  registers the client under its old sid in its old rooms, holds back what is emitted to it,
  reads what it missed after the offset from the rooms' recent caches (the router's recovery,
  docs/architecture.md, "Persistence, history and recovery") and sends it, then what was held
  back, in offset order, then live. A pid that is unknown, expired, or whose rooms' caches no
  longer hold everything after the offset gives a new session, silently (socket.io's rule).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, Final

import msgspec

from .._errors import ConfigurationError, MissingDependency
from ._sio_history import StoredEmit, read_history
from ._sio_replay import Restore
from ._sio_wire import RoomKey
from ._socketio import RoomRouterManager

try:
    import socketio
    from socketio import packet as sio_packet
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency("socketio", "socketio") from exc

__all__ = ["AsyncServer", "MemorySessionStore", "RedisSessionStore", "SessionStore"]

logger = logging.getLogger("roomrouter.socketio")

#: engine.io's reasons after which socket.io keeps a session (a transport lost, not a
#: disconnect the client or the server asked for).
RECOVERABLE: Final = frozenset({"transport close", "transport error", "ping timeout"})


class _Session(msgspec.Struct, array_like=True):
    sid: str
    rooms: list[RoomKey]
    #: The client's position when it connected: a reconnect that received no event yet
    #: (no offset in its auth) recovers from here (socket.io#5538).
    since: str
    data: Any = None


#: roomrouter.brokers.redis's escapes for a namespace in a key (not imported: needs redis).
_ESCAPES: Final = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_Session)


class SessionStore:
    """Where sessions wait for their client: ``put`` with a TTL, ``take`` at most once."""

    async def put(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        raise NotImplementedError

    async def take(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class MemorySessionStore(SessionStore):
    """Sessions in this process (nodes of one process share a store of the same name)."""

    _stores: ClassVar[dict[str, dict[str, tuple[float, bytes]]]] = {}

    def __init__(self, name: str = "") -> None:
        self._data = self._stores.setdefault(name, {})

    async def put(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        deadline = time.monotonic() + ttl
        for key, value in items:
            self._data[key] = (deadline, value)

    async def take(self, key: str) -> bytes | None:
        entry = self._data.pop(key, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)


class RedisSessionStore(SessionStore):
    """Sessions in Redis: ``SET PX`` (pipelined), ``GETDEL`` (Redis 6.2+), on at most 8
    connections."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - the redis extra
            raise MissingDependency("redis", "redis") from exc
        # A few connections, waited for: a reconnect storm (a thousand GETDELs at once) queues
        # on them instead of failing with "Too many connections".
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=8, timeout=10)
        self._pool = pool
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._closed = False

    async def put(self, items: list[tuple[str, bytes]], ttl: float) -> None:
        if self._closed:
            # After the server's shutdown (a transport its web server closed later): the
            # session written while connected stands. A closed client would reconnect.
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, px=max(1, int(ttl * 1000)))
            await pipe.execute()

    async def take(self, key: str) -> bytes | None:
        if self._closed:
            return None
        value = await self._redis.getdel(key)
        if value is None:
            return None
        return value if isinstance(value, bytes) else value.encode()

    async def delete(self, key: str) -> None:
        if not self._closed:
            await self._redis.delete(key)

    async def aclose(self) -> None:
        self._closed = True
        await self._redis.aclose()
        await self._pool.disconnect()


class AsyncServer(socketio.AsyncServer):  # type: ignore[misc]
    """``socketio.AsyncServer`` with socket.io's connection state recovery, across nodes.

    ``AsyncServer(client_manager=RoomRouterManager(...), connection_state_recovery={
    "max_disconnection_duration": 120, "skip_middlewares": True})``; other keyword arguments
    are python-socketio's. Options of ``connection_state_recovery``:

    * ``max_disconnection_duration`` (seconds, default 120): how long a session waits for its
      client after the transport was lost. The rooms' recent caches must hold what is emitted
      in that time (the broker's ``recent_size`` and ``recent_ttl``).
    * ``skip_middlewares`` (default True): a recovered connection does not run the ``connect``
      handler -- python-socketio's authentication step, which socket.io's middlewares are;
      its rooms and session data are restored instead. With False the handler runs and
      :meth:`recovered` tells it that the connection was recovered; a refusal ends it.
    * ``store``: a ``redis://`` URL for the sessions; default the manager's URL if it is a
      Redis one, else sessions stay in this process (one node, or nodes of one process).

    Without the option it is python-socketio's server unchanged. Needs a
    :class:`RoomRouterManager` whose broker has a recent cache (every one but a router
    without storage).
    """

    def __init__(
        self,
        client_manager: Any = None,
        *,
        connection_state_recovery: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(client_manager=client_manager, **kwargs)
        self._csr = connection_state_recovery is not None
        self._recovered: set[tuple[str, str]] = set()
        self._pids: dict[tuple[str, str], tuple[str, str]] = {}  # (sid, ns) -> (pid, since)
        # (eio sid, ns) -> (new (pid, since), recovered (pid, since), restore) while connecting
        self._pending: dict[
            tuple[Any, str], tuple[tuple[str, str], tuple[str, str] | None, Restore | None]
        ] = {}
        self._restored: dict[tuple[str, str], tuple[Restore, _Session | None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        if connection_state_recovery is None:
            return
        options = dict(connection_state_recovery)
        self.max_disconnection_duration = float(options.pop("max_disconnection_duration", 120))
        self.skip_middlewares = bool(options.pop("skip_middlewares", True))
        store = options.pop("store", None)
        if options:
            raise ConfigurationError(f"unknown connection_state_recovery options: {options}")
        if self.max_disconnection_duration <= 0:
            raise ConfigurationError("max_disconnection_duration must be positive")
        manager = self.manager
        if not isinstance(manager, RoomRouterManager):
            raise ConfigurationError("connection state recovery needs a RoomRouterManager")
        if not manager.router.broker.supports_storage:
            raise ConfigurationError(
                f"connection state recovery needs a recent cache; the "
                f"{manager.router.broker.name} backend has none"
            )
        url = getattr(manager, "_url", None)
        if store is None and isinstance(url, str) and url.startswith(("redis://", "rediss://")):
            store = url
        self.sessions: SessionStore = (
            RedisSessionStore(store) if isinstance(store, str) else MemorySessionStore()
        )
        manager.recovery = True
        manager.on_rooms_changed = self._save

    # -- what the application sees --------------------------------------------------------------

    def recovered(self, sid: str, namespace: str | None = None) -> bool:
        """Whether the connection of ``sid`` is a recovered session (socket.io's
        ``socket.recovered``): same sid, rooms and session data, missed emits delivered."""
        return (sid, namespace or "/") in self._recovered

    async def history(
        self,
        room: RoomKey,
        *,
        namespace: str | None = None,
        before: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[StoredEmit]:
        """What was emitted to ``room`` (of ``namespace``, default ``/``), in id order: the
        last ``limit`` emits with an id below ``before`` (or the newest), or the first
        ``limit`` above ``after``. An emit's id is the offset its clients received as its
        last argument, so a page that loads the history and then goes live drops what it
        already has by id. Needs connection state recovery on (that is what persists the
        emits) and, beyond the rooms' recent caches, a sink on the router
        (``RoomRouterManager(url, sink="mysql://...")``) that a storage worker fills
        (``roomrouter worker``); emits with a callback are not stored. Emits to one client
        (``to=sid``) are persisted too (socket.io's recovery replays them as well), so with a
        sink they stay in it, under the sid's room, like any room's emits."""
        if not self._csr:
            raise ConfigurationError(
                "history needs connection_state_recovery: only then are emits persisted"
            )
        return await read_history(
            self.manager, namespace or "/", room, before=before, after=after, limit=limit
        )

    # -- the protocol ---------------------------------------------------------------------------

    def _key(self, namespace: str, pid: str) -> str:
        # Under the roomrouter namespace's Redis prefix (``rr:{<namespace>}:``, escaped as the
        # Redis broker does), so that whatever clears a namespace clears its sessions too.
        escaped = self.manager.router.namespace.translate(_ESCAPES)
        return f"rr:{{{escaped}}}:sio-session:{namespace}:{pid}"

    async def _handle_connect(self, eio_sid: Any, namespace: Any, data: Any) -> None:
        if not self._csr:
            await super()._handle_connect(eio_sid, namespace, data)
            return
        namespace = namespace or "/"
        session, pid, since = None, None, None
        if isinstance(data, dict) and isinstance(data.get("pid"), str):
            pid = data["pid"]
            try:
                raw = await self.sessions.take(self._key(namespace, pid))
                session = _decoder.decode(raw) if raw is not None else None
            except Exception:
                logger.exception("connection state recovery: cannot read session %s", pid)
            offset = data.get("offset")
            if session is not None:
                since = offset if isinstance(offset, str) and offset else session.since
        restore = None
        if session is not None and pid is not None and since is not None:
            restore = Restore(session.sid, session.rooms, since)
            self.manager.restoring[eio_sid, namespace] = restore
        # A new session (an unknown or expired pid too, silently) starts now; a recovered
        # one keeps its pid and goes on from its offset (chosen in _send_packet).
        self._pending[eio_sid, namespace] = (
            (self._new_pid(), self.manager.offset_now()),
            (pid, since) if restore is not None and pid is not None and since else None,
            restore,
        )
        try:
            if restore is not None and self.skip_middlewares:
                await self._connect_recovered(eio_sid, namespace, restore, session)
                if restore.recovered:
                    return
            elif restore is not None:
                self._restored[restore.sid, namespace] = (restore, session)
            await super()._handle_connect(eio_sid, namespace, data)
        finally:
            self._pending.pop((eio_sid, namespace), None)
            self.manager.restoring.pop((eio_sid, namespace), None)
            if restore is not None:
                self._restored.pop((restore.sid, namespace), None)

    async def _trigger_event(self, event: str, namespace: str, *args: Any) -> Any:
        if event == "connect" and self._csr and args:
            # Without skip_middlewares the handler runs for a recovered connection: with its
            # session data back, and recovered() true.
            restored = self._restored.get((args[0], namespace))
            if restored is not None and restored[0].recovered:
                self._recovered.add((args[0], namespace))
                if restored[1] is not None and restored[1].data is not None:
                    await self.save_session(args[0], restored[1].data, namespace=namespace)
        return await super()._trigger_event(event, namespace, *args)

    async def _connect_recovered(
        self, eio_sid: Any, namespace: str, restore: Restore, session: _Session | None
    ) -> None:
        """The recovered connection without the connect handler (``skip_middlewares``)."""
        sid = await self.manager.pre_connect(eio_sid, namespace)
        if sid is None or not restore.recovered:
            if sid is not None:  # a new session after all: python-socketio's path, again
                await self.manager.disconnect(sid, namespace, ignore_queue=True)
            return
        self._recovered.add((sid, namespace))
        if session is not None and session.data is not None:
            await self.save_session(sid, session.data, namespace=namespace)
        await self._send_packet(
            eio_sid, self.packet_class(sio_packet.CONNECT, {"sid": sid}, namespace=namespace)
        )
        await self.manager.connect(sid, namespace)

    def _new_pid(self) -> str:
        return str(self.eio.generate_id())

    async def _send_packet(self, eio_sid: Any, pkt: Any) -> None:
        if (
            self._csr
            and pkt.packet_type == sio_packet.CONNECT
            and isinstance(pkt.data, dict)
            and "sid" in pkt.data
        ):
            namespace = pkt.namespace or "/"
            pending = self._pending.get((eio_sid, namespace))
            if pending is not None:
                sid = pkt.data["sid"]
                new, old, restore = pending
                chosen = (
                    old if old is not None and restore is not None and restore.recovered else new
                )
                pkt.data = {**pkt.data, "pid": chosen[0]}
                self._pids[sid, namespace] = chosen
                await self._save(sid, namespace)
                self._start_refresher()
        await super()._send_packet(eio_sid, pkt)

    # -- keeping the sessions ---------------------------------------------------------------------

    async def _snapshot(self, sid: str, namespace: str) -> tuple[str, bytes] | None:
        entry = self._pids.get((sid, namespace))
        if entry is None:
            return None
        pid, since = entry
        rooms = [
            room
            for room in self.manager.get_rooms(sid, namespace)
            if room is not None and room != sid
        ]
        data = None
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            try:
                data = (await self.eio.get_session(eio_sid)).get(namespace) or None
            except KeyError:
                data = None
        session = _Session(sid, rooms, since, data)
        try:
            value = _encoder.encode(session)
        except (TypeError, msgspec.EncodeError):
            logger.warning("connection state recovery: the session data of %s is not msgpack", sid)
            value = _encoder.encode(_Session(sid, rooms, since))
        return self._key(namespace, pid), value

    async def _save(self, sid: str, namespace: str, ttl: float | None = None) -> None:
        item = await self._snapshot(sid, namespace)
        if item is None:
            return
        try:
            await self.sessions.put([item], ttl or self._live_ttl)
        except Exception:
            logger.exception("connection state recovery: cannot save the session of %s", sid)

    @property
    def _live_ttl(self) -> float:
        # Rewritten every third of the window: a session of a node that died lives about one
        # window longer, as if its transport had been lost then.
        return self.max_disconnection_duration * 4 / 3 + 1

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        while self._pids:
            await asyncio.sleep(self.max_disconnection_duration / 3)
            items = [
                item
                for sid, namespace in list(self._pids)
                if (item := await self._snapshot(sid, namespace)) is not None
            ]
            try:
                if items:
                    await self.sessions.put(items, self._live_ttl)
            except Exception:
                logger.exception("connection state recovery: cannot refresh sessions")

    async def save_session(self, sid: str, session: Any, namespace: str | None = None) -> None:
        await super().save_session(sid, session, namespace=namespace)
        if self._csr and self.manager.is_connected(sid, namespace or "/"):
            await self._save(sid, namespace or "/")

    async def _handle_disconnect(self, eio_sid: Any, namespace: Any, reason: Any = None) -> None:
        if self._csr:
            namespace = namespace or "/"
            sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
            if reason in RECOVERABLE:
                # Saved while its rooms and data are still there, for one window.
                await self._save(sid, namespace, self.max_disconnection_duration)
                self._pids.pop((sid, namespace), None)
            else:
                await self._forget(sid, namespace)
            self._recovered.discard((sid, namespace))
        await super()._handle_disconnect(eio_sid, namespace, reason)

    async def _forget(self, sid: str, namespace: str) -> None:
        entry = self._pids.pop((sid, namespace), None)
        if entry is not None:
            try:
                await self.sessions.delete(self._key(namespace, entry[0]))
            except Exception:
                logger.exception("connection state recovery: cannot delete a session")

    async def disconnect(
        self, sid: str, namespace: str | None = None, ignore_queue: bool = False
    ) -> None:
        """python-socketio's ``disconnect``; the client's session is not kept (socket.io's
        rule: a disconnect the server asked for is final)."""
        if self._csr and self.manager.is_connected(sid, namespace or "/"):
            await self._forget(sid, namespace or "/")
            self._recovered.discard((sid, namespace or "/"))
        await super().disconnect(sid, namespace=namespace, ignore_queue=ignore_queue)

    async def shutdown(self) -> None:
        """python-socketio's ``shutdown`` (which closes no client: the web server's exit does,
        a transport close, so its clients' sessions are kept for another node)."""
        if self._refresher is not None:
            self._refresher.cancel()
        await super().shutdown()
        if self._csr:
            await self.sessions.aclose()
