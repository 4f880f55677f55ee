"""NATS broker (``nats://``): core NATS for the live planes, JetStream for persistence.

Written against roomrouter's public modules only (``roomrouter``, ``roomrouter.brokers``), as a
third-party backend would be. Guarantees are those numbered in ``roomrouter.brokers`` (the
``Broker`` contract) and docs/architecture.md.

Subjects. Everything of a namespace starts with ``rr.<ns>.``; each name (namespace, room,
node) is one subject token, percent-encoded except ``A-Z a-z 0-9 - _ ~`` (see
:func:`~roomrouter.brokers.nats._common.token`): ``.``, ``*``, ``>`` and spaces in a room name
are literal and two rooms never share a subject. ``r.<room>`` is a room's data subject,
``n.<node>`` a node's own data subject (direct publishing), ``c`` the control broadcast,
``d.<node>`` a node's own control subject, ``store`` the storage queue, ``recent.<room>`` a
room's recent cache, ``meta.*`` the nodes' presence and the loss reports.

Live planes. NATS routes by interest, so dynamic subscription is native: a room is one SUB on
the node's one connection, confirmed by a round trip behind it (the server handles a
connection's commands in order, so its answer means the SUBs are registered: guarantee 1 on one
server; on a NATS cluster the interest reaches the other servers asynchronously, within
their route latency). Every subscription's messages are delivered from nats-py's reader in
the order the server sent them (:func:`~._common.subscribe_in_order`), so guarantee 3 holds
across room, node and control subjects. The connection is ``no_echo``: the server never
hands a node its own publishes, so a room hosted on two nodes carries no echo at all
(its own control broadcasts are handed to it by :meth:`NatsBroker.publish_control` itself).
Publishing is the transport core's (:class:`roomrouter.brokers.transport.Outbox`, in
:mod:`._publish`): every publish is queued in call order before its first await; one sender
hands each batch to nats-py's write buffer and sends one round trip behind it (a message to an
inbox nobody subscribes, answered "no responders" by the server under its own token), whose
answer settles the batch's live publishes.

Settle rule (the core's). :class:`~roomrouter.BrokerUnavailable` ("not sent"): nothing of the
publish was handed to nats-py (the connection was down, or it died first), or JetStream
refused both writes. :class:`~roomrouter.PublishOutcomeUnknown`: its bytes were in nats-py's
buffer (which nats-py re-sends after a reconnect) and no answer came (timeout, connection
lost), or a persisted publish took effect in part (see below).

Persistence. :meth:`NatsBroker.publish_persistent` makes two JetStream publishes, pipelined
with those of every other publish of the batch and acknowledged together: to the namespace's
storage stream (work-queue retention: a frame leaves it when a storage worker acknowledges it)
and to the recent-cache stream (one subject per room, ``max_msgs_per_subject = recent_size``,
each frame kept ``recent_ttl`` seconds); then, if ``live``, the core publish. **Not atomic**
(NATS 2.9 has no multi-stream transaction): each JetStream write is atomic by itself and both
carry ``Nats-Msg-Id`` = the envelope id, so a retry with the same id within the streams'
duplicate window (two minutes) completes whichever write failed without doubling the other. The
live publish goes out only after both writes were acknowledged, in call order with every other
publish of the node. A write answered "no stream" (the stream was deleted) makes the broker
recreate the streams and send that write once more. See docs/nats.md.

Cluster view. NATS cannot count who heard a broadcast; :meth:`NatsBroker.count_nodes` counts
the nodes instead: every node, once its control subjects are confirmed, holds a presence
consumer on the namespace's ``meta`` stream (pushing to its own control subject, nothing is
ever published there), and the stream's consumer count is the number of nodes. A node that
vanishes without closing keeps counting until the server drops its consumer (its interest
gone for ``presence_linger`` seconds); the router then waits for answers that do not come
until its ``node_ttl``, as on RabbitMQ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from functools import partial
from typing import Any

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from roomrouter import BrokerUnavailable
from roomrouter.brokers import (
    Broker,
    BrokerContext,
    RecentFrames,
    StorageConsumer,
    frame_id,
)
from roomrouter.brokers.transport import Backoff
from roomrouter.urls import redact

from ._common import (
    ERRORS,
    Names,
    Options,
    api,
    connect,
    describe,
    ensure_stream,
    parse_url,
    quiet_close,
    round_trip,
    stream_configs,
    subscribe_in_order,
)
from ._publish import Pub, Publisher
from ._storage import NatsStorageConsumer, read_recent

__all__ = ["NatsBroker", "Names"]


log = logging.getLogger("roomrouter.nats")


class NatsBroker(Broker):
    """See the module docstring. ``servers``: nats-py server URLs."""

    name = "nats"
    counts_receivers = False
    supports_storage = True
    #: One connection per node on one server: frames one node sends reach each subscriber in
    #: send order whichever subject they went to (guarantee 3).
    supports_direct = True
    #: Confirmation round trips in flight at once (see :mod:`._publish`).
    CONFIRMS_IN_FLIGHT = 8

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        operation_timeout: float = 5.0,
        max_backoff: float = 5.0,
        recent_size: int = 1000,
        recent_ttl: int = 86_400,
        redelivery_after: float = 30.0,
        replicas: int = 1,
        presence_linger: float = 2.0,
        health_interval: float = 5.0,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.options = Options(
            operation_timeout, max_backoff, recent_size, recent_ttl, redelivery_after, replicas
        )
        self.operation_timeout = operation_timeout
        self.recent_size = recent_size
        self.redelivery_after = redelivery_after
        self.presence_linger = presence_linger
        self.health_interval = health_interval
        self._ctx: BrokerContext | None = None
        self._nc: Client | None = None
        self._names = Names("")
        self._subs: dict[str, Subscription] = {}
        self._closed = False
        self._publisher = Publisher(
            "NATS", operation_timeout, rounds=self.CONFIRMS_IN_FLIGHT, repair=self._ensure_streams
        )
        self._ack_prefix = ""
        self._reconnected = anyio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NatsBroker:
        """``nats://[user:pass@]host[:port][,host[:port]...][?operation_timeout=5&...]``;
        options: ``operation_timeout``, ``max_backoff``, ``recent_size``, ``recent_ttl``,
        ``redelivery_after``, ``replicas``."""
        servers, found = parse_url(url)
        return cls(servers, **{**options, **found})

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, context: BrokerContext) -> None:
        self._ctx = context
        self._names = names = Names.of(context.namespace)
        nc = await connect(
            self.servers, name=f"roomrouter-{context.node_id}",
            operation_timeout=self.operation_timeout, max_backoff=self.options.max_backoff,
            no_echo=True,
            reconnected=self._on_reconnected, disconnected=self._on_disconnected,
            health_interval=self.health_interval,
        )  # fmt: skip
        self._nc = nc
        self._ack_prefix = nc.new_inbox() + "."
        # The void inbox: nobody subscribes, the server answers "no responders".
        self._publisher.attach(nc, self._ack_prefix, nc.new_inbox())
        try:
            with anyio.fail_after(self.operation_timeout):
                on_control = self._on_control
                await subscribe_in_order(nc, names.control, on_control)
                await subscribe_in_order(nc, names.direct(context.node_id), on_control)
                await subscribe_in_order(nc, names.node(context.node_id), self._on_direct)
                await subscribe_in_order(nc, self._ack_prefix + "*", self._publisher.on_ack)
                await round_trip(nc, self.operation_timeout)
            await self._ensure_streams()
            await self._register()
        except BaseException as exc:
            self._nc = None
            with anyio.CancelScope(shield=True):
                await quiet_close(nc)
            if isinstance(exc, ERRORS):
                raise BrokerUnavailable(f"cannot subscribe on NATS: {describe(exc)}") from exc
            raise
        context.task_group.start_soon(self._publisher.run, name=f"nats publish {context.node_id}")
        context.task_group.start_soon(self._reconnect_loop, name=f"nats restore {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        nc, self._nc = self._nc, None
        if nc is not None:
            with anyio.move_on_after(min(1.0, self.operation_timeout), shield=True):
                try:  # the presence consumer goes at once, not after the linger
                    await api(nc, f"CONSUMER.DELETE.{self._meta}.{self._presence}", {}, 1.0)
                except BrokerUnavailable:
                    pass
            await quiet_close(nc)
        self._subs.clear()
        self._publisher.close()

    @property
    def _meta(self) -> str:
        return self._names.stream("META")

    @property
    def _presence(self) -> str:
        assert self._ctx is not None
        return "node-" + hashlib.sha1(self._ctx.node_id.encode()).hexdigest()

    async def _ensure_streams(self) -> None:
        nc = self._live()
        for config in stream_configs(self._names, self.options):
            await ensure_stream(nc, config, self.operation_timeout)

    async def _register(self) -> None:
        """This node's presence consumer (see :meth:`count_nodes`): created after the control
        subjects were confirmed, so every node counted hears a later broadcast."""
        assert self._ctx is not None
        config = {
            "name": self._presence,
            "deliver_subject": self._names.direct(self._ctx.node_id),
            "deliver_policy": "new",
            "ack_policy": "none",
            "filter_subject": self._names.nodes,
            "inactive_threshold": int(self.presence_linger * 1e9),
            "mem_storage": True,
        }
        body = {"stream_name": self._meta, "config": config}
        await api(self._live(), f"CONSUMER.CREATE.{self._meta}.{self._presence}", body,
                  self.operation_timeout)  # fmt: skip

    async def _reconnect_loop(self) -> None:
        """After nats-py reconnected (it replayed every SUB and had them confirmed before it
        said so): the streams and this node's presence, then tell the router."""
        assert self._ctx is not None
        while not self._closed:
            await self._reconnected.wait()
            self._reconnected = anyio.Event()
            backoff = Backoff(0.05, self.options.max_backoff)
            with anyio.move_on_after(self.operation_timeout * 2):
                while not self._closed:
                    try:
                        await self._ensure_streams()
                        await self._register()
                        break
                    except BrokerUnavailable as exc:  # JetStream recovers after a restart
                        log.info("node %s: NATS presence not restored yet (%s)",
                                 self._ctx.node_id, exc)  # fmt: skip
                        await backoff.sleep()
            log.info("node %s: NATS reconnected, %d room(s) restored",
                     self._ctx.node_id, len(self._subs))  # fmt: skip
            self._ctx.on_reconnect()

    def _on_reconnected(self) -> None:
        self._reconnected.set()

    def _on_disconnected(self) -> None:
        if not self._closed:
            self._publisher.lost("the connection was lost")

    def _live(self) -> Client:
        nc = self._nc
        if nc is None or self._closed:
            raise BrokerUnavailable("NATS broker is not started" if not self._closed else
                                    "broker closed")  # fmt: skip
        if not nc.is_connected:
            raise BrokerUnavailable("NATS connection is down")
        return nc

    # -- receiving (nats-py's reader, in server order) ------------------------------------------

    def _on_control(self, msg: Msg) -> None:
        if self._ctx is not None and not msg.headers:
            self._ctx.on_control(msg.data)

    def _on_direct(self, msg: Msg) -> None:
        if self._ctx is not None:
            self._ctx.on_direct(msg.data)

    def _on_room(self, room: str, msg: Msg) -> None:
        if self._ctx is not None:
            self._ctx.on_data(room, msg.data)

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        nc = self._live()
        made: list[tuple[str, Subscription]] = []
        try:
            with anyio.fail_after(self.operation_timeout):
                for room in rooms:
                    if room in self._subs or any(r == room for r, _ in made):
                        continue
                    on_room = partial(self._on_room, room)
                    made.append(
                        (room, await subscribe_in_order(nc, self._names.room(room), on_room))
                    )
            await round_trip(nc, self.operation_timeout)  # the server holds them now
        except BaseException as exc:
            with anyio.CancelScope(shield=True):  # all or nothing
                for _, sub in made:
                    try:
                        await sub.unsubscribe()
                    except ERRORS:
                        pass
            if isinstance(exc, ERRORS):
                raise BrokerUnavailable(f"NATS subscribe failed: {describe(exc)}") from exc
            raise
        self._subs.update(made)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        subs = [sub for room in rooms if (sub := self._subs.pop(room, None)) is not None]
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        # nats-py forgets a subscription at once (nothing more is delivered from it) and sends
        # its UNSUB; while reconnecting it is simply not restored.
        for sub in subs:
            try:
                await sub.unsubscribe()
            except ERRORS:
                pass

    async def broker_subscriptions(self) -> frozenset[str]:
        """The rooms this node's connection holds, as the server lists them (account-scoped
        CONNZ of ``$SYS``; one server: the first to answer)."""
        nc = self._live()
        query = {"cid": nc.client_id, "subscriptions_detail": True, "limit": 1}
        try:
            reply = await nc.request(
                "$SYS.REQ.ACCOUNT.PING.CONNZ", json.dumps(query).encode(),
                timeout=self.operation_timeout,
            )  # fmt: skip
            conns = json.loads(reply.data)["data"]["connections"]
        except (*ERRORS, ValueError, KeyError, TypeError) as exc:
            raise BrokerUnavailable(f"NATS CONNZ failed: {describe(exc)}") from exc
        rooms = set()
        for conn in conns:
            for sub in conn.get("subscriptions_list_detail") or ():
                room = self._names.room_of(str(sub.get("subject", "")))
                if room is not None:
                    rooms.add(room)
        return frozenset(rooms)

    async def count_nodes(self) -> int | None:
        """The other nodes' presence consumers on the ``meta`` stream (see the module
        docstring): one JetStream API round trip."""
        info = await api(self._live(), f"STREAM.INFO.{self._meta}", {}, self.operation_timeout)
        try:
            return max(int(info["state"]["consumer_count"]) - 1, 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerUnavailable(
                f"JetStream stream info without a consumer count: {exc}"
            ) from exc

    # -- publishing -----------------------------------------------------------------------------

    def _targets(self, room: str, to: Collection[str] | None) -> list[str]:
        if to is None:
            return [self._names.room(room)]
        return [self._names.node(node) for node in to]

    def _check(self, nc: Client, frame: bytes) -> None:
        if len(frame) > nc.max_payload:
            raise BrokerUnavailable(
                f"frame of {len(frame)} bytes over the NATS server's max_payload "
                f"({nc.max_payload}): not sent"
            )

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        # Queued in call order before the first await (see ._publish).
        self._check(self._live(), frame)
        await self._publisher.submit(Pub(self._targets(room, to), frame))

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        self._check(self._live(), frame)
        subject = self._names.control if to is None else self._names.direct(to)
        sent = self._publisher.submit(Pub([subject], frame))
        if to is None and self._ctx is not None:
            # A broadcast reaches every node including this one; no_echo keeps the server
            # from sending it back, so this node's copy is handed over here, in call order.
            try:
                self._ctx.on_control(frame)
            except Exception:
                log.exception("node %s: control handler raised", self._ctx.node_id)
        await sent
        return None

    # -- persistence ----------------------------------------------------------------------------

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """Two JetStream writes (storage queue, recent cache), then, if ``live``, the live
        publish once both were acknowledged (see ._publish)."""
        self._check(self._live(), frame)
        ident = frame_id(frame)
        pub = Pub(
            self._targets(room, to) if live else [],
            frame,
            [self._names.store, self._names.recent(room)],
            {"Nats-Msg-Id": ident} if ident else None,
        )
        await self._publisher.submit(pub)

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """The room's recent subject read by an ephemeral consumer (see
        :func:`~._storage.read_recent`)."""
        return await read_recent(self._live(), self._names, self.options, room, since, limit)

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return NatsStorageConsumer(self.servers, Names.of(namespace), self.options, consumer)

    def __repr__(self) -> str:
        return f"NatsBroker({', '.join(map(redact, self.servers))!r})"
