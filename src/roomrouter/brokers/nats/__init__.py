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
A publish is queued in call order before its first await and returns once a round trip sent
after it came back (a message to an inbox nobody subscribes, answered "no responders" by the
server under its own token; one round trip serves every publish queued meanwhile).

Settle rule. :class:`~roomrouter.BrokerUnavailable` ("not sent"): the connection was down when
the call was made, or the server refused the frame before any part of it took effect.
:class:`~roomrouter.PublishOutcomeUnknown`: something was handed to the connection and its
confirmation did not come (timeout, connection lost), or a persisted publish took effect in
part (see below).

Persistence. :meth:`NatsBroker.publish_persistent` makes two JetStream publishes, sent
together and acknowledged separately: to the namespace's storage stream (work-queue
retention: a frame leaves it when a storage worker acknowledges it) and to the recent-cache
stream (one subject per room, ``max_msgs_per_subject = recent_size``, each frame kept
``recent_ttl`` seconds); then, if ``live``, the core publish. **Not atomic** (NATS 2.9 has no
multi-stream transaction): each JetStream write is atomic by itself and both carry
``Nats-Msg-Id`` = the envelope id, so a retry with the same id within the streams' duplicate
window (two minutes) completes whichever write failed without doubling the other. The live
publish goes out only after both writes were acknowledged, in call order with every other
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

import asyncio
import hashlib
import json
import logging
from collections import deque
from collections.abc import Collection
from functools import partial
from itertools import count
from typing import Any

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from roomrouter import BrokerUnavailable, PublishOutcomeUnknown
from roomrouter.brokers import (
    Broker,
    BrokerContext,
    RecentFrames,
    StorageConsumer,
    frame_id,
)
from roomrouter.urls import redact

from ._common import (
    ERRORS,
    ApiError,
    Names,
    Options,
    api,
    connect,
    describe,
    ensure_stream,
    parse_url,
    quiet_close,
    round_trip,
    status_of,
    stream_configs,
    subscribe_in_order,
)
from ._storage import NatsStorageConsumer, read_recent

__all__ = ["NatsBroker", "Names"]


log = logging.getLogger("roomrouter.nats")


class _Round:
    """One confirmation round trip shared by the publishes queued before it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BrokerUnavailable | None = None


class _Slot:
    """A live publish waiting for its turn: publishes leave in call order, and a persisted
    one only once its JetStream writes were acknowledged."""

    __slots__ = ("frame", "sent", "state", "subjects")

    WAITING, READY, DROPPED = 0, 1, 2

    def __init__(self, subjects: list[str], frame: bytes, state: int) -> None:
        self.subjects = subjects
        self.frame = frame
        self.state = state
        self.sent = anyio.Event()


class _Ack:
    """A JetStream publish waiting for its acknowledgement on this node's ack inbox."""

    __slots__ = ("answer", "done", "subject")

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.done = anyio.Event()
        #: "ok", "missing" (no stream: nothing written), an ApiError (refused: nothing
        #: written) or "garbage" (an answer that is none: outcome unknown).
        self.answer: object = None


class NatsBroker(Broker):
    """See the module docstring. ``servers``: nats-py server URLs."""

    name = "nats"
    counts_receivers = False
    supports_storage = True
    #: One connection per node on one server: frames one node sends reach each subscriber in
    #: send order whichever subject they went to (guarantee 3).
    supports_direct = True
    #: Confirmation round trips in flight at once (see :meth:`_confirm_loop`).
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
        self._outbox: deque[_Slot] = deque()
        self._round = _Round()
        self._wake = anyio.Event()
        self._acks: dict[str, _Ack] = {}
        self._ack_ids = count()
        self._ack_prefix = ""
        self._void = ""
        self._reconnected = anyio.Event()
        self._confirming: set[asyncio.Task[None]] = set()

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
            reconnected=self._on_reconnected, health_interval=self.health_interval,
        )  # fmt: skip
        self._nc = nc
        self._ack_prefix = nc.new_inbox() + "."
        self._void = nc.new_inbox()  # nobody subscribes: the server answers "no responders"
        try:
            with anyio.fail_after(self.operation_timeout):
                on_control = self._on_control
                await subscribe_in_order(nc, names.control, on_control)
                await subscribe_in_order(nc, names.direct(context.node_id), on_control)
                await subscribe_in_order(nc, names.node(context.node_id), self._on_direct)
                await subscribe_in_order(nc, self._ack_prefix + "*", self._on_ack)
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
        context.task_group.start_soon(self._confirm_loop, name=f"nats confirm {context.node_id}")
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
        error = BrokerUnavailable("broker closed")
        for slot in self._outbox:
            slot.state = _Slot.DROPPED
            slot.sent.set()
        self._outbox.clear()
        self._round.error = error
        self._round.done.set()
        for ack in self._acks.values():
            ack.done.set()

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
            delay = 0.05
            with anyio.move_on_after(self.operation_timeout * 2):
                while not self._closed:
                    try:
                        await self._ensure_streams()
                        await self._register()
                        break
                    except BrokerUnavailable as exc:  # JetStream recovers after a restart
                        log.info("node %s: NATS presence not restored yet (%s)",
                                 self._ctx.node_id, exc)  # fmt: skip
                        await anyio.sleep(delay)
                        delay = min(delay * 2, self.options.max_backoff)
            log.info("node %s: NATS reconnected, %d room(s) restored",
                     self._ctx.node_id, len(self._subs))  # fmt: skip
            self._ctx.on_reconnect()

    def _on_reconnected(self) -> None:
        self._reconnected.set()

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

    def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if ack is None:
            return  # late (its publisher gave up) or forged
        status = status_of(msg)
        if status == "503":
            ack.answer = "missing"
        else:
            try:
                answer = json.loads(msg.data)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                error = answer["error"]
                ack.answer = ApiError(
                    "the publish", int(error.get("code", 0) or 0),
                    int(error.get("err_code", 0) or 0), str(error.get("description", "")),
                )  # fmt: skip
            elif isinstance(answer, dict) and "seq" in answer and "stream" in answer:
                ack.answer = "ok"
            else:
                ack.answer = "garbage"
        ack.done.set()

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
        # Up to the first nc.publish nothing awaits: the call takes its place in send order.
        nc = self._live()
        self._check(nc, frame)
        subjects = self._targets(room, to)
        if self._outbox:  # a persisted publish called earlier waits for its acks: keep order
            slot = _Slot(subjects, frame, _Slot.READY)
            self._outbox.append(slot)
            await self._send_in_turn(slot)
        else:
            try:
                for subject in subjects:
                    await nc.publish(subject, frame)
            except ERRORS as exc:
                raise BrokerUnavailable(f"NATS publish failed: {describe(exc)}") from exc
        await self._confirmed()

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        nc = self._live()
        self._check(nc, frame)
        subject = self._names.control if to is None else self._names.direct(to)
        try:
            await nc.publish(subject, frame)
        except ERRORS as exc:
            raise BrokerUnavailable(f"NATS publish failed: {describe(exc)}") from exc
        if to is None and self._ctx is not None:
            # A broadcast reaches every node including this one; no_echo keeps the server
            # from sending it back, so this node's copy is handed over here, in call order.
            try:
                self._ctx.on_control(frame)
            except Exception:
                log.exception("node %s: control handler raised", self._ctx.node_id)
        await self._confirmed()
        return None

    async def _send_in_turn(self, slot: _Slot) -> None:
        await self._pump()
        try:
            with anyio.fail_after(self.operation_timeout):
                await slot.sent.wait()
        except TimeoutError:
            slot.state = _Slot.DROPPED  # never sent: the pump skips it
            raise BrokerUnavailable("NATS publish waited too long for its turn") from None
        if slot.state == _Slot.DROPPED:
            raise BrokerUnavailable("NATS publish not sent: the connection failed")

    async def _pump(self) -> None:
        """Send the live publishes whose turn it is, in call order."""
        outbox = self._outbox
        while outbox and outbox[0].state != _Slot.WAITING:
            slot = outbox.popleft()
            if slot.state == _Slot.READY and not slot.sent.is_set():
                nc = self._nc
                try:
                    if nc is None:
                        raise BrokerUnavailable("broker closed")
                    for subject in slot.subjects:
                        await nc.publish(subject, slot.frame)
                except (*ERRORS, BrokerUnavailable):
                    slot.state = _Slot.DROPPED
            slot.sent.set()

    async def _confirmed(self) -> None:
        """Wait for a round trip sent after everything queued so far to come back. No timeout
        of its own (a cancel scope per publish cost a third of the publisher's CPU): the
        confirming task ends every round within the operation timeout."""
        round_ = self._round
        self._wake.set()
        await round_.done.wait()
        if round_.error is not None:
            raise round_.error

    async def _confirm_loop(self) -> None:
        """Start a confirmation round for whatever was queued since the last one;
        up to ``CONFIRMS_IN_FLIGHT`` rounds at once, so a round trip's latency does not cap
        the publish rate (their PONGs come back in order)."""
        slots = anyio.Semaphore(self.CONFIRMS_IN_FLIGHT)
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake = anyio.Event()
                await slots.acquire()
                round_, self._round = self._round, _Round()
                task = loop.create_task(self._confirm(round_, slots))
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)
        finally:  # cancelled or failed: nobody may wait for a round forever
            round_ = self._round
            if not round_.done.is_set():
                round_.error = PublishOutcomeUnknown("NATS broker closing")
                round_.done.set()
            self._round = _Round()

    async def _confirm(self, round_: _Round, slots: anyio.Semaphore) -> None:
        """One round: a message to an inbox nobody subscribes, its reply to this node's ack
        inbox; the server answers "no responders" at once, after it handled everything this
        connection sent before (see :func:`~._common.round_trip`; here the answer is taken
        from nats-py's reader like a JetStream acknowledgement, no task hop)."""
        try:
            nc = self._live()
            ack = self._expect()
            try:
                with anyio.fail_after(self.operation_timeout):
                    await nc.publish(self._void, b"", reply=ack.subject)
                    await ack.done.wait()
            finally:
                self._acks.pop(ack.subject[len(self._ack_prefix) :], None)
            if ack.answer is None:  # woken by aclose
                raise BrokerUnavailable("broker closed")
        except (*ERRORS, BrokerUnavailable) as exc:
            round_.error = PublishOutcomeUnknown(
                "NATS did not confirm the publish (connection lost or timed out after it "
                f"was queued): {describe(exc)}"
            )
        except BaseException:
            round_.error = PublishOutcomeUnknown("NATS broker closing")
            raise
        finally:
            round_.done.set()
            slots.release()

    def _expect(self) -> _Ack:
        """A new answer to wait for on this node's ack inbox."""
        ack = _Ack(self._ack_prefix + str(next(self._ack_ids)))
        self._acks[ack.subject[len(self._ack_prefix) :]] = ack
        return ack

    # -- persistence ----------------------------------------------------------------------------

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        nc = self._live()
        self._check(nc, frame)
        slot = _Slot(self._targets(room, to), frame, _Slot.WAITING) if live else None
        if slot is not None:
            self._outbox.append(slot)  # its place in call order, before the first await
        ident = frame_id(frame)
        headers = {"Nats-Msg-Id": ident} if ident else None
        writes = [self._names.store, self._names.recent(room)]
        try:
            answers = await self._write(nc, writes, frame, headers)
            missing = [s for s, a in zip(writes, answers, strict=True) if a == "missing"]
            if missing:  # a stream was deleted: nothing was written there
                await self._ensure_streams()
                again = await self._write(nc, missing, frame, headers)
                answers = [again.pop(0) if a == "missing" else a for a in answers]
        except BaseException:
            if slot is not None:
                slot.state = _Slot.DROPPED
                await self._pump()
            raise
        if any(a != "ok" for a in answers):
            if slot is not None:
                slot.state = _Slot.DROPPED
                await self._pump()
            refused = [a for a in answers if a == "missing" or isinstance(a, ApiError)]
            if len(refused) == len(answers):
                raise BrokerUnavailable(f"JetStream refused the frame: {refused[0]}")
            raise PublishOutcomeUnknown(
                f"JetStream stored the frame in part ({answers}): retry it with its id"
            )
        if slot is None:
            return
        slot.state = _Slot.READY
        try:
            await self._send_in_turn(slot)
        except BrokerUnavailable as exc:  # stored, not sent live: not "not sent"
            raise PublishOutcomeUnknown(f"stored, live publish failed: {exc}") from exc
        await self._confirmed()

    async def _write(
        self, nc: Client, subjects: list[str], frame: bytes, headers: dict[str, str] | None
    ) -> list[object]:
        """JetStream publishes of ``frame`` to ``subjects``, sent together; their answers."""
        acks = [self._expect() for _ in subjects]
        sent = False
        try:
            with anyio.fail_after(self.operation_timeout):
                for subject, ack in zip(subjects, acks, strict=True):
                    sent = True
                    await nc.publish(subject, frame, reply=ack.subject, headers=headers)
                for ack in acks:
                    await ack.done.wait()
        except (*ERRORS, TimeoutError) as exc:
            if not sent:
                raise BrokerUnavailable(f"NATS publish failed: {describe(exc)}") from exc
            raise PublishOutcomeUnknown(
                f"JetStream did not acknowledge in time: {describe(exc)}"
            ) from exc
        finally:
            for ack in acks:
                self._acks.pop(ack.subject[len(self._ack_prefix) :], None)
        if any(a.answer is None for a in acks):  # woken by aclose
            raise PublishOutcomeUnknown("broker closed before JetStream acknowledged")
        return [a.answer for a in acks]

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
