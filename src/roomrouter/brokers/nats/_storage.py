"""The NATS broker's JetStream side: the storage queue's competing consumers and recent-cache
reads. See the package docstring and docs/nats.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import count
from typing import Any

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg

from roomrouter import BrokerUnavailable, StorageQueueLost
from roomrouter.brokers import RecentFrames, RecentScan, StorageConsumer, StoredFrame

from ._common import (
    ERRORS,
    ApiError,
    Names,
    Options,
    api,
    connect,
    describe,
    ensure_stream,
    quiet_close,
    round_trip,
    stream_configs,
    subscribe_in_order,
)

__all__ = ["NatsStorageConsumer", "read_recent"]

#: err_codes of "stream not found" and "consumer not found".
_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014


def _is_data(msg: Msg) -> bool:
    """A stored message delivered by JetStream (its reply is the ack subject), as opposed to
    the server's status messages (404 no messages, 408 expired, 409 ...)."""
    return bool(msg.reply) and msg.reply.startswith("$JS.ACK.")


async def read_recent(
    nc: Client, names: Names, options: Options, room: str, since: str | None, limit: int | None
) -> RecentFrames:
    """The room's recent subject, oldest first, through an ephemeral push consumer (in memory,
    no acks, deleted by the server a second after this read unsubscribes), then scanned
    backwards by :class:`RecentScan`. A read is idempotent: any failure is a plain
    :class:`BrokerUnavailable`.

    ``truncated``: if the scan ran out of frames above ``since``, the cache counts as evicted
    when the room holds ``recent_size`` frames or when the stream ever removed a frame (age
    or size limits); a NATS 2.9 stream does not count removals per subject, so this is
    conservative (docs/nats.md)."""
    stream = names.stream("RECENT")
    frames: list[bytes] = []
    done = anyio.Event()
    expected: list[int] = []

    def on_msg(msg: Msg) -> None:
        if not _is_data(msg):
            return
        frames.append(msg.data)
        try:
            left = msg.metadata.num_pending
        except (ValueError, IndexError, AttributeError):  # not a JetStream ack subject
            left = None
        if left == 0 or (expected and len(frames) >= expected[0]):
            done.set()

    inbox = nc.new_inbox()
    try:
        with anyio.fail_after(options.operation_timeout):
            sub = await subscribe_in_order(nc, inbox, on_msg)
    except ERRORS as exc:
        raise BrokerUnavailable(f"NATS recent read failed: {describe(exc)}") from exc
    try:
        config = {
            "deliver_subject": inbox,
            "deliver_policy": "all",
            "ack_policy": "none",
            "filter_subject": names.recent(room),
            "replay_policy": "instant",
            "mem_storage": True,
            "inactive_threshold": 1_000_000_000,
        }
        info = await api(
            nc, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config},
            options.operation_timeout,
        )  # fmt: skip
        try:
            held = int(info["num_pending"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerUnavailable(f"JetStream consumer info without num_pending: {exc}") from exc
        expected.append(held)
        if held == 0 or len(frames) >= held:
            done.set()
        try:
            with anyio.fail_after(options.operation_timeout):
                await done.wait()
        except TimeoutError as exc:
            raise BrokerUnavailable("NATS recent read timed out") from exc
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await sub.unsubscribe()
            except ERRORS:
                pass
    scan = RecentScan(since, limit)
    for frame in reversed(frames):
        if not scan.add(frame):
            break
    evicted = False
    if not scan.reached and not scan.full and (scan.frames or scan.skipped):
        evicted = len(frames) >= options.recent_size or await _removed_any(nc, stream, options)
    return scan.result(evicted)


async def _removed_any(nc: Client, stream: str, options: Options) -> bool:
    """Whether the stream ever removed a message (by age or by the per-subject limit)."""
    try:
        info = await api(nc, f"STREAM.INFO.{stream}", {}, options.operation_timeout)
        state = info["state"]
        return int(state.get("first_seq", 1)) > 1 or int(state.get("num_deleted", 0)) > 0
    except (ApiError, KeyError, TypeError, ValueError):
        return True  # deleted meanwhile, or an answer without a state: assume the worst


class _Pull:
    __slots__ = ("batch", "done", "msgs", "status")

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.msgs: list[Msg] = []
        self.done = anyio.Event()
        self.status: str | None = None


class _Missing(Exception):
    """The consumer (or its stream) does not exist."""


class NatsStorageConsumer(StorageConsumer):
    """A competing consumer of the namespace's storage stream: every worker pulls from one
    durable consumer, ``roomrouter-workers`` (explicit acks; a frame not acknowledged within
    ``redelivery_after`` seconds goes to another worker; an acknowledged one leaves the
    work-queue stream).

    A stream or consumer that vanished (deleted, a server restarted without its store) is
    recreated. The stream's creation time tells a loss (a new stream: what the old one held is
    gone) from a consumer lost alone (its frames are still in the stream). One report per
    loss across all workers: the first to publish ``lost-<old creation time>`` (with that
    ``Nats-Msg-Id``) to the ``meta`` stream raises :class:`~roomrouter.StorageQueueLost`; the
    others get a duplicate acknowledgement and go on silently."""

    DURABLE = "roomrouter-workers"

    def __init__(self, servers: list[str], names: Names, options: Options, name: str) -> None:
        self._servers = servers
        self._names = names
        self._options = options
        self._name = name
        self._stream = names.stream("STORE")
        self._nc: Client | None = None
        self._pulls: dict[str, _Pull] = {}
        self._current: _Pull | None = None  # fetches of one consumer never overlap
        self._ids = count()
        self._inbox = ""
        self._created: str | None = None

    async def start(self) -> None:
        nc = await connect(
            self._servers, name=f"roomrouter-worker-{self._name}",
            operation_timeout=self._options.operation_timeout,
            max_backoff=self._options.max_backoff,
        )  # fmt: skip
        self._nc = nc
        self._inbox = nc.new_inbox() + "."
        try:
            with anyio.fail_after(self._options.operation_timeout):
                await subscribe_in_order(nc, self._inbox + "*", self._on_msg)
            self._created = await self._setup()
        except BaseException as exc:
            self._nc = None
            with anyio.CancelScope(shield=True):
                await quiet_close(nc)
            if isinstance(exc, ERRORS):
                raise BrokerUnavailable(f"cannot reach NATS: {describe(exc)}") from exc
            raise

    async def aclose(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await quiet_close(nc)
        for pull in self._pulls.values():
            pull.done.set()

    def _live(self) -> Client:
        if self._nc is None:
            raise BrokerUnavailable("storage consumer is not started")
        if not self._nc.is_connected:
            raise BrokerUnavailable("NATS connection is down")
        return self._nc

    async def _setup(self) -> str | None:
        """Create the streams and the durable consumer if missing; the storage stream's
        creation time."""
        nc = self._live()
        timeout = self._options.operation_timeout
        created = None
        for config in stream_configs(self._names, self._options):
            info = await ensure_stream(nc, config, timeout)
            if config["name"] == self._stream:
                created = info.get("created") if isinstance(info, dict) else None
        config = {
            "durable_name": self.DURABLE,
            "name": self.DURABLE,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": int(self._options.redelivery_after * 1e9),
            "max_deliver": -1,
            "max_ack_pending": -1,
        }
        body = {"stream_name": self._stream, "config": config}
        try:
            await api(nc, f"CONSUMER.CREATE.{self._stream}.{self.DURABLE}", body, timeout)
        except ApiError:  # made by another worker with other settings: use it as it is
            await api(nc, f"CONSUMER.INFO.{self._stream}.{self.DURABLE}", {}, timeout)
        return str(created) if created is not None else None

    def _on_msg(self, msg: Msg) -> None:
        # A stored message keeps its own subject (the stream's): it belongs to the one pull
        # in flight. A status message comes on the pull's own reply subject.
        data = _is_data(msg)
        pull = self._current if data else self._pulls.get(msg.subject[len(self._inbox) :])
        if pull is None or pull.done.is_set():
            return  # a pull given up (its frames come again after the ack wait) or forged
        if data:
            pull.msgs.append(msg)
            if len(pull.msgs) >= pull.batch:
                pull.done.set()
        else:
            headers = msg.headers or {}
            pull.status = f"{headers.get('Status', '?')} {headers.get('Description', '')}"
            pull.done.set()

    async def _pull(self, batch: int, expires: float | None) -> list[Msg]:
        """One pull request: up to ``batch`` messages; ``expires=None``: only those ready."""
        nc = self._live()
        key = str(next(self._ids))
        pull = self._pulls[key] = self._current = _Pull(batch)
        body: dict[str, Any] = {"batch": batch}
        if expires is None:
            body["no_wait"] = True
        else:
            body["expires"] = max(int(expires * 1e9), 1_000_000)
        # A pull on a consumer that does not exist gets no answer at all: a no-wait pull,
        # answered at once by a live consumer, gives up sooner and asks whether it is there.
        limit = self._options.operation_timeout
        limit = limit + expires if expires is not None else min(limit, 1.0)
        try:
            with anyio.fail_after(limit):
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self.DURABLE}",
                    json.dumps(body).encode(), reply=self._inbox + key,
                )  # fmt: skip
                await pull.done.wait()
        except TimeoutError as exc:
            await self._check_consumer()
            raise BrokerUnavailable("NATS storage fetch got no answer in time") from exc
        except ERRORS as exc:
            raise BrokerUnavailable(f"NATS storage fetch failed: {describe(exc)}") from exc
        finally:
            del self._pulls[key]
            self._current = None
        status = pull.status or ""
        if status.startswith("503") or (status.startswith("409") and "Deleted" in status):
            raise _Missing(status)
        if self._nc is None:
            raise BrokerUnavailable("storage consumer closed")
        return pull.msgs

    async def _check_consumer(self) -> None:
        """Raise :class:`_Missing` if the consumer or its stream is gone."""
        try:
            await api(
                self._live(), f"CONSUMER.INFO.{self._stream}.{self.DURABLE}", {},
                self._options.operation_timeout,
            )  # fmt: skip
        except ApiError as exc:
            if exc.err_code in (_STREAM_NOT_FOUND, _CONSUMER_NOT_FOUND) or exc.code == 404:
                raise _Missing(str(exc)) from exc
            raise

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        try:
            got = await self._pull(max_frames, None)
            if not got:
                got = await self._pull(1, wait)
                if got and max_frames > 1:
                    got += await self._pull(max_frames - 1, None)
        except _Missing as exc:
            await self._repair(str(exc))
            return []
        return [StoredFrame(msg.data, msg.reply) for msg in got]

    async def _repair(self, answer: str) -> None:
        """The consumer is gone: recreate what is missing; report a lost stream once."""
        old = self._created
        nc = self._live()
        self._created = await self._setup()
        if self._created == old:
            return  # the stream is the same: its frames are still there
        try:
            with anyio.fail_after(self._options.operation_timeout):
                reply = await nc.request(
                    self._names.lost, f"storage stream created {old} lost".encode(),
                    timeout=self._options.operation_timeout + 1,
                    headers={"Nats-Msg-Id": f"lost-{old}"},
                )  # fmt: skip
            first = not json.loads(reply.data).get("duplicate", False)
        except (*ERRORS, ValueError, AttributeError):
            first = True  # cannot tell: better reported twice than never
        if first:
            raise StorageQueueLost(
                f"storage stream {self._stream!r} vanished ({answer.strip()}): frames it held "
                "that no worker had stored yet are lost (deleted, or the NATS server lost "
                "its store?); recreated it, storing what is published from now on"
            )

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        if not frames:
            return
        nc = self._live()
        try:
            with anyio.fail_after(self._options.operation_timeout):
                for item in frames:
                    await nc.publish(str(item.token), b"+ACK")
            await round_trip(nc, self._options.operation_timeout)
        except (*ERRORS, TimeoutError) as exc:
            raise BrokerUnavailable(f"NATS storage ack failed: {describe(exc)}") from exc

    async def pending(self) -> int:
        info = await api(
            self._live(), f"STREAM.INFO.{self._stream}", {}, self._options.operation_timeout
        )
        try:
            return int(info["state"]["messages"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerUnavailable(f"JetStream stream info without a state: {exc}") from exc
