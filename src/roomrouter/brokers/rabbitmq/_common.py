"""What the node (``_broker``, ``_publisher``) and the storage consumer (``_storage``) of the
RabbitMQ backend share: the client errors they map, connection helpers, one wording of a
failed connect, and the storage queue's declaration."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import aiormq
import anyio
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from ..._errors import BrokerUnavailable, ConfigurationError, unreachable
from ..._urls import redact
from ._names import STORE_KEY

__all__ = [
    "ERRORS",
    "STABLE_AFTER",
    "Hosts",
    "bind",
    "connect",
    "declare_storage",
    "first_closed",
    "quiet_close",
    "really_cancelled",
    "unbind",
    "unreachable_at",
]

#: What aiormq raises for a failed connection, channel or operation.
ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError, EOFError, RuntimeError)

#: A connection that served this long (seconds) resets the reconnect backoff; one that RabbitMQ
#: drops sooner after each restore meets a growing delay, not a reconnect storm that redeclares
#: and rebinds everything many times a second.
STABLE_AFTER = 1.0


def really_cancelled() -> bool:
    """aiormq hands out ``CancelledError`` as the *result* of a future when it closes a channel;
    only a cancel request on our own task is a real cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Hosts:
    """The hosts of an AMQP URL: ``amqp://user:pass@h1:5672,h2:5673,h3/vhost?query`` names
    several nodes of one RabbitMQ cluster (a host without a port: 5672, 5671 for ``amqps``),
    with one user, vhost and query for all. :func:`connect` tries them in turn: a role's first
    connection starts at the first host, each reconnect of that role at the host after the one
    it was connected to (round-robin), so a connection whose node died moves to the next."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        default = 5671 if parts.scheme == "amqps" else 5672
        self.urls: list[str] = []
        #: ``host:port`` of every entry, in URL order (no credentials).
        self.addresses: list[str] = []
        for entry in hostlist.split(","):
            single = urlunsplit(parts._replace(netloc=f"{userinfo}{at}{entry.strip()}"))
            try:
                host, port = urlsplit(single).hostname, urlsplit(single).port
            except ValueError as exc:
                raise ConfigurationError(f"bad host {entry!r} in {redact(url)!r}: {exc}") from exc
            if not host:
                raise ConfigurationError(f"empty host in {redact(url)!r}")
            self.urls.append(single)
            self.addresses.append(f"[{host}]:{port or default}" if ":" in host else
                                  f"{host}:{port or default}")  # fmt: skip
        self.user = unquote(parts.username or "guest")
        self._last: dict[str, int] = {}  # connection name -> index of its last host

    @property
    def first_host(self) -> str:
        return urlsplit(self.urls[0]).hostname or "127.0.0.1"

    def __str__(self) -> str:
        return ",".join(self.addresses)

    def connected_to(self, name: str) -> str | None:
        """``host:port`` the connection ``name`` last connected to (None: never)."""
        index = self._last.get(name)
        return None if index is None else self.addresses[index]


def unreachable_at(url: str | Hosts, exc: BaseException) -> BrokerUnavailable:
    """The one wording of a failed connect (roomrouter._errors.unreachable) for ``url``."""
    hosts = url if isinstance(url, Hosts) else Hosts(url)
    return unreachable("RabbitMQ", str(hosts), None, exc, user=hosts.user)


async def connect(url: str | Hosts, name: str, operation_timeout: float) -> AbstractConnection:
    """A new connection to one host of ``url`` that RabbitMQ lists under the client-given
    ``name``, each attempt within ``operation_timeout``; with several hosts, the first that
    answers, from the one after ``name``'s last host on (see :class:`Hosts`)."""
    hosts = url if isinstance(url, Hosts) else Hosts(url)
    count = len(hosts.urls)
    start = hosts._last.get(name, -1) + 1
    failure: BaseException | None = None
    for step in range(count):
        index = (start + step) % count
        try:
            conn = await _connect_one(hosts.urls[index], name, operation_timeout)
        except ERRORS as exc:
            failure = exc
            continue
        hosts._last[name] = index
        return conn
    assert failure is not None
    raise unreachable_at(hosts, failure) from failure


async def _connect_one(url: str, name: str, operation_timeout: float) -> AbstractConnection:
    conn = aiormq.Connection(url + ("&" if "?" in url else "?") + urlencode({"name": name}))
    try:
        with anyio.fail_after(operation_timeout):
            await conn.connect()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await quiet_close(conn, operation_timeout)
        raise
    return conn


async def quiet_close(conn: AbstractConnection, grace: float) -> None:
    """Close ``conn``, ignoring its errors, giving up after ``grace`` seconds."""
    with anyio.move_on_after(grace):
        try:
            await conn.close()
        except (*ERRORS, asyncio.CancelledError):
            if really_cancelled():
                raise


async def first_closed(
    *sources: AbstractConnection | AbstractChannel | asyncio.Future[None],
) -> None:
    """Wait until any connection/channel closes (or a future is set)."""
    observers = [s if isinstance(s, asyncio.Future) else s.closing for s in sources]
    try:
        await asyncio.wait(observers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for source, observer in zip(sources, observers, strict=True):
            if observer is not source and not observer.done():
                observer.cancel()  # only stops this observer


async def bind(channel: AbstractChannel, queue: str, exchange: str, keys: list[str]) -> None:
    """Bind ``keys`` in one round trip: no-wait binds, then one confirmed bind as a fence.

    A channel executes methods in order, so the last BindOk means every bind before it took
    effect; a failing bind closes the channel, and the fence raises.
    """
    if not keys:
        return
    for key in keys[:-1]:
        await channel.queue_bind(queue, exchange, routing_key=key, nowait=True)
    await channel.queue_bind(queue, exchange, routing_key=keys[-1])


#: Most channels one :func:`unbind` spreads its keys over, and the fewest keys per channel.
UNBIND_LANES = 16
_KEYS_PER_LANE = 32


async def unbind(
    conn: AbstractConnection, channel: AbstractChannel, queue: str, exchange: str, keys: list[str]
) -> None:
    """Unbind ``keys``; return once every one took effect.

    ``queue.unbind`` has no no-wait form in AMQP 0-9-1, and aiormq sends a channel's methods
    one at a time, each after the previous one's answer: a few keys go one by one on
    ``channel``, more are spread over up to :data:`UNBIND_LANES` channels of ``conn`` (opened
    for this and closed after), each unbinding its share in turn, so the round trips overlap.
    The caller awaits the whole, so a later bind of the same key (on ``channel``) comes after
    its unbind. Raises the first error (the connection's state is then unknown)."""
    lanes = min(UNBIND_LANES, len(keys) // _KEYS_PER_LANE)
    if lanes <= 1:
        for key in keys:
            await channel.queue_unbind(queue, exchange, routing_key=key)
        return
    extra: list[AbstractChannel] = []
    try:
        opened = await asyncio.gather(
            *(conn.channel(publisher_confirms=False) for _ in range(lanes - 1)),
            return_exceptions=True,
        )
        extra = [c for c in opened if not isinstance(c, BaseException)]
        failed = [c for c in opened if isinstance(c, BaseException)]
        if failed:
            raise failed[0]
        channels = [channel, *extra]

        async def lane(ch: AbstractChannel, share: list[str]) -> None:
            for key in share:
                await ch.queue_unbind(queue, exchange, routing_key=key)

        done = await asyncio.gather(
            *(lane(ch, keys[i :: len(channels)]) for i, ch in enumerate(channels)),
            return_exceptions=True,
        )
        errors = [r for r in done if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    finally:
        if extra:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await asyncio.gather(*(c.close() for c in extra), return_exceptions=True)


async def declare_storage(channel: AbstractChannel, exchange: str, queue: str) -> None:
    """Declare the data exchange and the namespace's storage queue bound to it by the storage
    key (idempotent; nodes and storage workers both do it, whoever comes first)."""
    await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.queue_bind(queue, exchange, routing_key=STORE_KEY.decode())
