"""The NATS node's publish path on the transport core
(:class:`~roomrouter.brokers.transport.Outbox`).

Every publish of a node (room and direct data, control, persisted) is one :class:`Pub` in one
outbox, queued before its caller's first ``await`` (call order is send order, guarantee 3).
One sender task takes everything queued meanwhile as a batch and hands it to nats-py's write
buffer:

1. in call order, the JetStream writes of every persisted publish (``HPUB`` with
   ``Nats-Msg-Id`` and a reply subject on the node's ack inbox: many in flight, answered
   together), and the live publishes up to the first persisted one that is also live;
2. if the batch holds a persisted live publish: the wait for its acknowledgements (all of the
   batch's at once), since its live part goes out only once it is stored, and every live
   publish called after it waits behind it;
3. the remaining live parts, in call order, then **one** confirmation round trip behind the
   batch: a message to an inbox nobody subscribes with its reply on the ack inbox, answered
   "no responders" by the server after it handled everything the connection sent before. Its
   answer settles every live publish of the batch; the sender does not wait for it (up to
   ``rounds`` rounds in flight).

The settle rule is the core's (docs/architecture.md, guarantees 3 and 4): a publish is *sent*
once its bytes were handed to nats-py's write buffer (nats-py may still write them after a
reconnect). Before that, a failure or its deadline makes it "not sent" and it is never written
afterwards; from then on a lost connection (:meth:`Publisher.lost`) or its deadline makes it
"outcome unknown". A JetStream answer is never ambiguous: both writes refused is "not sent"
(nothing stored, nothing live), one refused and one stored is "outcome unknown" (a retry with
the same id completes it: ``Nats-Msg-Id`` de-duplication). A write answered "no stream" (the
stream was deleted) makes the node recreate the streams and send that write once more.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from itertools import count
from typing import Any

import anyio
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.aio.msg import Msg

from roomrouter import BrokerUnavailable, PublishOutcomeUnknown
from roomrouter.brokers.transport import Outbox, Send

from ._common import ERRORS, ApiError, status_of

__all__ = ["Pub", "Publisher"]

_OK = "ok"
_MISSING = "missing"  # "no stream": nothing written


class Pub:
    """What one publish sends: ``live`` subjects (core publishes; empty for a persisted
    publish that is not live) and, if ``writes``, the JetStream subjects it is stored to first
    with ``headers``."""

    __slots__ = ("answers", "frame", "headers", "left", "live", "ready", "repaired", "writes")

    def __init__(
        self,
        live: list[str],
        frame: bytes,
        writes: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.live = live
        self.frame = frame
        self.writes = writes or []
        self.headers = headers
        #: One answer per write: None (waiting), "ok", "missing", an ApiError or "garbage".
        self.answers: list[object] = [None] * len(self.writes)
        self.left = len(self.writes)
        self.ready = False  # stored: its live part may go
        self.repaired = False  # its missing writes were sent once more


class _Lost(BrokerUnavailable):
    """The connection was lost while a batch waited for its acknowledgements."""


class Publisher:
    """A node's publish path (see the module docstring); one per broker, sending on the
    connection given to :meth:`attach`."""

    def __init__(
        self,
        service: str,
        timeout: float,
        *,
        rounds: int,
        repair: Callable[[], Awaitable[object]],
    ) -> None:
        self.outbox: Outbox[Pub] = Outbox(service, timeout, errors=ERRORS)
        self.rounds = rounds
        self._repair_streams = repair
        self._nc: Client | None = None
        self._prefix = ""
        self._void = ""
        self._ids = count()
        #: ack inbox key -> (send, write index) of a JetStream write, or the live sends a
        #: confirmation round settles.
        self._expect: dict[str, tuple[Send[Pub], int] | list[Send[Pub]]] = {}
        self._in_rounds = 0
        self._epoch = 0  # counts lost connections
        #: The batch's persisted live publishes not decided yet (their acknowledgements).
        self._gated: set[Send[Pub]] = set()
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None

    def attach(self, nc: Client, ack_prefix: str, void: str) -> None:
        """Send on ``nc``; answers come to ``ack_prefix + key`` (see :meth:`on_ack`);
        ``void`` is an inbox nobody subscribes."""
        self._nc, self._prefix, self._void = nc, ack_prefix, void

    def submit(self, pub: Pub) -> Any:
        """Queue ``pub`` (no ``await``); the future its caller waits on."""
        return self.outbox.submit(pub)

    def lost(self, reason: str) -> None:
        """The connection is gone: what was handed to it will not be answered through it
        ("outcome unknown"); a batch waiting for acknowledgements stops."""
        self._epoch += 1
        self._expect.clear()
        self._in_rounds = 0
        self.outbox.fail_in_flight(reason)
        self._wake.set()

    def close(self, reason: str = "broker closed") -> None:
        self._nc = None
        self.outbox.close(reason)
        self._expect.clear()
        self._wake.set()

    async def run(self) -> None:
        """The sender and the outbox's deadline watch, until cancelled (which settles every
        publish left)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self.outbox.watch)
            try:
                while True:
                    if self._in_rounds >= self.rounds:
                        await self._room()
                        continue
                    await self._transmit(await self.outbox.take())
            except BrokerUnavailable:  # the outbox is closed
                pass
            finally:
                tg.cancel_scope.cancel()

    async def _room(self) -> None:
        """Wait until a confirmation round came back (or rounds given up by their deadline
        are forgotten)."""
        self._wake = anyio.Event()
        with anyio.move_on_after(self.outbox.timeout / 4):
            await self._wake.wait()
        if self._in_rounds >= self.rounds:
            self._forget_settled()

    def _forget_settled(self) -> None:
        """Drop expectations whose publishes were all settled meanwhile (deadline, cancel)."""
        for key, what in list(self._expect.items()):
            if isinstance(what, tuple):
                if what[0].done:
                    del self._expect[key]
            elif all(send.done for send in what):
                del self._expect[key]
                self._in_rounds -= 1

    def _key(self) -> tuple[str, str]:
        key = str(next(self._ids))
        return key, self._prefix + key

    # -- the sender -----------------------------------------------------------------------------

    async def _transmit(self, batch: list[Send[Pub]]) -> None:
        async with self.outbox.transmit(batch) as tx:
            nc = self._nc
            if nc is None or not nc.is_connected:
                raise BrokerUnavailable("the connection is down")
            epoch = self._epoch
            confirm: list[Send[Pub]]
            if not any(send.item.writes for send in tx.sends):  # live publishes only
                confirm = tx.sent()
                for send in confirm:
                    pub = send.item
                    for subject in pub.live:
                        await nc.publish(subject, pub.frame)
                await self._round(nc, confirm)
                return
            confirm = []
            later: list[Send[Pub]] = []  # behind a persisted live publish
            gated = self._gated = set()
            for send in tx.sends:
                pub = send.item
                if pub.writes:
                    if not tx.sent((send,)):
                        continue
                    await self._store(nc, send)
                    if pub.live:
                        gated.add(send)
                        later.append(send)
                elif later:
                    later.append(send)
                elif tx.sent((send,)):
                    for subject in pub.live:
                        await nc.publish(subject, pub.frame)
                    confirm.append(send)
            if later:
                while gated and self._epoch == epoch:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                if self._epoch != epoch:
                    raise _Lost("the connection was lost before JetStream acknowledged")
                for send in later:
                    pub = send.item
                    if send.done or (pub.writes and not pub.ready):
                        continue  # settled (refused, cancelled, ...): its live part stays
                    if not pub.writes and not tx.sent((send,)):
                        continue
                    for subject in pub.live:
                        await nc.publish(subject, pub.frame)
                    confirm.append(send)
            await self._round(nc, confirm)
        if len(self._expect) > 4096:
            self._forget_settled()

    async def _round(self, nc: Client, confirm: list[Send[Pub]]) -> None:
        """The confirmation round trip behind ``confirm`` (see the module docstring)."""
        if confirm:
            key, subject = self._key()
            self._expect[key] = confirm
            self._in_rounds += 1
            await nc.publish(self._void, b"", reply=subject)

    async def _store(self, nc: Client, send: Send[Pub], only: list[int] | None = None) -> None:
        """Hand ``send``'s JetStream writes (``only`` these) to nats-py."""
        pub = send.item
        for i in range(len(pub.writes)) if only is None else only:
            key, reply = self._key()
            self._expect[key] = (send, i)
            await nc.publish(pub.writes[i], pub.frame, reply=reply, headers=pub.headers)

    # -- answers (nats-py's reader) -------------------------------------------------------------

    def on_ack(self, msg: Msg) -> None:
        """An answer on the ack inbox: a confirmation round's or a JetStream write's."""
        what = self._expect.pop(msg.subject[len(self._prefix) :], None)
        if what is None:
            return  # late (given up, or from a lost connection) or forged
        if isinstance(what, list):  # a round: the server handled everything before it
            self._in_rounds -= 1
            for send in what:
                send.resolve()
            self._wake.set()
            return
        send, index = what
        pub = send.item
        if pub.answers[index] is None:
            pub.left -= 1
        pub.answers[index] = _answer(msg)
        if pub.left == 0:
            self._decide(send)

    def _decide(self, send: Send[Pub]) -> None:
        """Every write of ``send`` answered: settle it, or let its live part go."""
        pub = send.item
        answers = pub.answers
        if _MISSING in answers and not pub.repaired and self._tg is not None and not send.done:
            pub.repaired = True
            missing = [i for i, a in enumerate(answers) if a == _MISSING]
            for i in missing:
                answers[i] = None
            pub.left = len(missing)
            self._tg.start_soon(self._repair, send, missing, self._epoch)
            return
        if all(a == _OK for a in answers):
            if pub.live:
                pub.ready = True
            else:
                send.resolve()
        else:
            refused = [a for a in answers if a == _MISSING or isinstance(a, ApiError)]
            if len(refused) == len(answers):  # an answer: nothing was stored
                send.refuse(BrokerUnavailable(f"JetStream refused the frame: {refused[0]}"))
            else:
                send.refuse(
                    PublishOutcomeUnknown(
                        f"JetStream stored the frame in part ({answers}): retry it with its id"
                    )
                )
        if send in self._gated:
            self._gated.discard(send)
            if not self._gated:
                self._wake.set()

    async def _repair(self, send: Send[Pub], missing: list[int], epoch: int) -> None:
        """A stream was deleted: recreate the streams, then send those writes once more."""
        pub = send.item
        try:
            await self._repair_streams()
            nc = self._nc
            if nc is None or self._epoch != epoch or send.done:
                raise BrokerUnavailable("the connection was lost")
            await self._store(nc, send, missing)
        except (*ERRORS, BrokerUnavailable):
            for i in missing:  # still missing: nothing written there
                pub.answers[i] = _MISSING
            pub.left = 0
            self._decide(send)


def _answer(msg: Msg) -> object:
    """A JetStream publish acknowledgement: "ok", "missing" (no stream: nothing written), an
    :class:`ApiError` (refused: nothing written) or "garbage" (an answer that is none)."""
    data = msg.data
    if data.startswith(b'{"stream":') and b'"error"' not in data and b'"seq":' in data:
        return _OK  # the server's PubAck, {"stream":..,"seq":..[,"duplicate":true]}: no decode
    if status_of(msg) == "503":
        return _MISSING
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return "garbage"
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        return ApiError(
            "the publish", int(error.get("code", 0) or 0),
            int(error.get("err_code", 0) or 0), str(error.get("description", "")),
        )  # fmt: skip
    if isinstance(answer, dict) and "seq" in answer and "stream" in answer:
        return _OK
    return "garbage"
