"""What the NATS broker and its storage consumer share: subject and stream names, the URL,
the JetStream API calls, the error mapping and the in-order delivery adapter.

Written against roomrouter's public modules only (``roomrouter``, ``roomrouter.brokers``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from roomrouter import BrokerUnavailable, ConfigurationError
from roomrouter.urls import describe as describe_error
from roomrouter.urls import redact

__all__ = [
    "ERRORS",
    "ApiError",
    "Names",
    "Options",
    "api",
    "connect",
    "describe",
    "ensure_stream",
    "parse_url",
    "round_trip",
    "status_of",
    "subscribe_in_order",
    "token",
]

log = logging.getLogger("roomrouter.nats")

#: What nats-py raises for a failed network operation (its own tree, sockets, timeouts).
ERRORS: Final = (nats.errors.Error, OSError, TimeoutError, asyncio.TimeoutError)


def describe(exc: BaseException) -> str:
    """A short reason for a client library's exception, for a message (never its repr):
    :func:`roomrouter.urls.describe`, with nats-py's closed connection in words."""
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return "connection closed"
    return describe_error(exc)


# -- names ---------------------------------------------------------------------------------------


def token(name: str) -> str:
    """``name`` as one subject token: percent-encoded except ``A-Z a-z 0-9 - _ ~``, so ``.``
    (the separator), ``*`` and ``>`` (wildcards), spaces and ``%`` itself never appear raw and
    two names never share a token. The empty name is ``%`` alone (never an escape's start)."""
    return quote(name, safe="").replace(".", "%2E") or "%"


@lru_cache(maxsize=8192)
def _subject(prefix: str, kind: str, name: str) -> str:
    return f"{prefix}{kind}{token(name)}"


def untoken(value: str) -> str:
    return "" if value == "%" else unquote(value)


@dataclass(frozen=True, slots=True)
class Names:
    """Every subject and stream of one namespace (``rr.<ns>.`` then a kind letter)."""

    prefix: str

    @classmethod
    def of(cls, namespace: str) -> Names:
        return cls(f"rr.{token(namespace)}.")

    def room(self, room: str) -> str:
        return _subject(self.prefix, "r.", room)

    def node(self, node: str) -> str:
        """A node's own data subject (direct publishing)."""
        return _subject(self.prefix, "n.", node)

    @property
    def control(self) -> str:
        return f"{self.prefix}c"

    def direct(self, node: str) -> str:
        """A node's own control subject."""
        return f"{self.prefix}d.{token(node)}"

    @property
    def store(self) -> str:
        return f"{self.prefix}store"

    def recent(self, room: str) -> str:
        return f"{self.prefix}recent.{token(room)}"

    @property
    def nodes(self) -> str:
        """Filter of the nodes' presence consumers (nothing is ever published there)."""
        return f"{self.prefix}meta.nodes"

    @property
    def lost(self) -> str:
        """Where storage-queue losses are reported once (de-duplicated by message id)."""
        return f"{self.prefix}meta.lost"

    def stream(self, kind: str) -> str:
        """Stream name: no ``.``, ``*``, ``>``, spaces nor path separators."""
        ns = self.prefix[3:-1]  # the namespace token: percent-encoded, no '.' nor '/'
        return f"RR_{ns}_{kind}"

    def room_of(self, subject: str) -> str | None:
        head = self.prefix + "r."
        return untoken(subject[len(head) :]) if subject.startswith(head) else None


# -- URL -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The broker options a ``nats://`` URL's query may set (see :func:`parse_url`)."""

    operation_timeout: float = 5.0
    max_backoff: float = 5.0
    recent_size: int = 1000
    recent_ttl: int = 86_400
    redelivery_after: float = 30.0
    replicas: int = 1


_CONVERT: Final[dict[str, Callable[[str], Any]]] = {
    "operation_timeout": float,
    "max_backoff": float,
    "recent_size": int,
    "recent_ttl": int,
    "redelivery_after": float,
    "replicas": int,
}


def parse_url(url: str) -> tuple[list[str], dict[str, Any]]:
    """``nats://[user:pass@]host[:port][,host[:port]...][?option=value...]`` (``tls://`` for
    TLS): nats-py's server URLs and the :class:`Options` the query sets."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise ConfigurationError(f"not a nats:// URL: {redact(url)!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    servers = [
        f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{host}"
        for host in (hosts or "127.0.0.1:4222").split(",")
        if host
    ]
    found: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        convert = _CONVERT.get(key)
        if convert is None:
            raise ConfigurationError(f"unknown option {key!r} in {redact(url)!r}")
        try:
            found[key] = convert(value)
        except ValueError as exc:
            raise ConfigurationError(f"bad {key} in {redact(url)!r}") from exc
        if found[key] <= 0 and key != "recent_ttl":
            raise ConfigurationError(f"{key} must be positive in {redact(url)!r}")
    return servers, found


# -- connection ------------------------------------------------------------------------------------


async def connect(
    servers: list[str],
    *,
    name: str,
    operation_timeout: float,
    max_backoff: float,
    no_echo: bool = False,
    health_interval: float = 5.0,
    reconnected: Callable[[], Any] | None = None,
    disconnected: Callable[[], Any] | None = None,
) -> Client:
    """A nats-py connection that reconnects forever with capped exponential backoff (from
    50 ms, doubling, up to ``max_backoff``). Raises :class:`BrokerUnavailable` if the first
    connection cannot be made within ``operation_timeout``. A connection that answers no
    PING for two ``health_interval`` s (a half-open TCP connection) is dropped and remade."""
    timeout = operation_timeout
    attempts = 0

    def next_server(pool: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        nonlocal attempts
        attempts += 1
        return pool[attempts % len(pool)], min(0.05 * 2 ** min(attempts - 1, 16), max_backoff)

    async def on_reconnect() -> None:
        nonlocal attempts
        attempts = 0
        if reconnected is not None:
            reconnected()

    async def on_disconnect() -> None:
        if disconnected is not None:
            disconnected()

    async def on_error(exc: Exception) -> None:
        log.debug("%s: nats-py reports %r", name, exc)

    client = Client()
    try:
        with anyio.fail_after(timeout):
            await client.connect(
                servers,
                name=name,
                connect_timeout=max(1, int(timeout)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_to_server_handler=next_server,
                reconnected_cb=on_reconnect,
                disconnected_cb=on_disconnect,
                error_cb=on_error,
                no_echo=no_echo,
                ping_interval=max(1, round(health_interval)),
                max_outstanding_pings=2,
                # Publishes are queued in call order before the first await; a large buffer
                # keeps nats-py from ever flushing inline (which could let a later call in).
                pending_size=64 * 1024 * 1024,
            )
    except (*ERRORS, ValueError) as exc:
        with anyio.CancelScope(shield=True):
            await quiet_close(client)
        raise BrokerUnavailable(
            f"cannot connect to NATS at {', '.join(map(redact, servers))}: {describe(exc)}"
        ) from exc
    except BaseException:
        with anyio.CancelScope(shield=True):
            await quiet_close(client)
        raise
    version = client.connected_server_version
    if (version.major, version.minor) < (2, 9):
        await quiet_close(client)
        raise BrokerUnavailable(
            f"the NATS server at {', '.join(map(redact, servers))} is {version}: "
            "roomrouter needs NATS 2.9 or later, with JetStream (-js)"
        )
    return client


async def quiet_close(client: Client) -> None:
    try:
        with anyio.move_on_after(2):
            await client.close()
    except ERRORS:
        pass


class _InOrder:
    """Stands in for a nats-py subscription's pending queue: nats-py's reader hands it each
    message (``put_nowait``) and it delivers at once, in the reader, so the messages of all
    the connection's subscriptions reach roomrouter in the order the server sent them
    (guarantee 3 across the room, node and control subjects). nats-py would otherwise give
    each subscription a queue and a task of its own, and frames of two subscriptions could
    overtake each other. The one nats-py internal roomrouter touches (checked on use)."""

    __slots__ = ("_deliver",)

    def __init__(self, deliver: Callable[[Msg], None]) -> None:
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        try:
            self._deliver(msg)
        except Exception:  # a handler bug must not kill nats-py's reader
            log.exception("NATS message handler raised")

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


async def subscribe_in_order(
    client: Client, subject: str, deliver: Callable[[Msg], None]
) -> Subscription:
    """SUB ``subject``, each message handed to ``deliver`` from nats-py's reader (see
    :class:`_InOrder`). Not confirmed: flush afterwards."""
    sub = await client.subscribe(subject, pending_bytes_limit=0)
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue):
        await sub.unsubscribe()
        raise ConfigurationError(
            f"nats-py {nats.__version__ if hasattr(nats, '__version__') else '?'} keeps no "
            "per-subscription queue: this roomrouter supports nats-py 2.9 to 2.x"
        )
    sub._pending_queue = _InOrder(deliver)  # type: ignore[assignment]
    while not queue.empty():  # arrived while subscribe() awaited: older, so first
        _InOrder(deliver).put_nowait(queue.get_nowait())
    return sub


async def round_trip(client: Client, limit: float) -> None:
    """A round trip behind everything sent so far: a request to a fresh inbox nobody
    subscribes, which the server answers at once with "no responders" after it handled what
    came before on this connection. Not ``Client.flush``: nats-py matches PONGs to PINGs by
    order, so one lost PONG (a half-dead connection) would shift every later confirmation,
    and its reader fails on a flush cancelled by a timeout; a request is matched by its own
    token. Raises ``TimeoutError`` (or a nats-py error) if no answer comes within ``limit``."""
    try:
        with anyio.fail_after(limit):
            await client.request(client.new_inbox(), b"", timeout=limit + 1)
    except nats.errors.NoRespondersError:
        pass


def status_of(msg: Msg) -> str | None:
    """The inline status of a server message (``503`` no responders, ``404``, ``408``,
    ``409``), or None for a message with data."""
    headers = msg.headers
    if headers and not msg.data:
        return headers.get("Status")
    return None


# -- JetStream API ---------------------------------------------------------------------------------


class ApiError(BrokerUnavailable):
    """JetStream refused an API request (``code``: HTTP-like, ``err_code``: NATS's)."""

    def __init__(self, what: str, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream refused {what}: {description} ({code}/{err_code})")
        self.code = code
        self.err_code = err_code


async def api(client: Client, subject: str, body: dict[str, Any], limit: float) -> Any:
    """One JetStream API request (``$JS.API.<subject>``); the decoded answer. A refusal is an
    :class:`ApiError`, anything else failing a :class:`BrokerUnavailable`."""
    try:
        with anyio.fail_after(limit):
            reply = await client.request(
                "$JS.API." + subject, json.dumps(body).encode(), timeout=limit + 1
            )
    except nats.errors.NoRespondersError as exc:
        raise BrokerUnavailable(f"JetStream is not available for {subject}") from exc
    except ERRORS as exc:
        raise BrokerUnavailable(f"JetStream request {subject} failed: {describe(exc)}") from exc
    try:
        answer = json.loads(reply.data)
    except ValueError as exc:
        raise BrokerUnavailable(f"JetStream answered {subject} with garbage") from exc
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        raise ApiError(
            subject, int(error.get("code", 0)), int(error.get("err_code", 0)),
            str(error.get("description", "")),
        )  # fmt: skip
    return answer


#: err_code of "stream name already in use with a different configuration".
STREAM_NAME_IN_USE: Final = 10058


async def ensure_stream(client: Client, config: dict[str, Any], limit: float) -> Any:
    """Create the stream if missing (an existing one is kept as it is); its info."""
    name = config["name"]
    try:
        return await api(client, f"STREAM.CREATE.{name}", config, limit)
    except ApiError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await api(client, f"STREAM.INFO.{name}", {}, limit)


def stream_configs(names: Names, options: Options) -> Iterable[dict[str, Any]]:
    """The namespace's streams: the storage queue (work-queue retention: a frame leaves it
    when a worker acknowledges it), the recent caches (one subject per room, at most
    ``recent_size`` frames each, each frame kept ``recent_ttl`` seconds) and ``meta`` (the
    nodes' presence consumers and the loss reports, in memory)."""
    base = {"retention": "limits", "discard": "old", "num_replicas": options.replicas}
    yield {
        **base,
        "name": names.stream("STORE"),
        "subjects": [names.store],
        "retention": "workqueue",
        "storage": "file",
        "duplicate_window": 120 * 10**9,
    }
    yield {
        **base,
        "name": names.stream("RECENT"),
        "subjects": [names.prefix + "recent.>"],
        "storage": "file",
        "max_msgs_per_subject": options.recent_size,
        "max_age": options.recent_ttl * 10**9,
        "duplicate_window": min(120, options.recent_ttl or 120) * 10**9,
    }
    yield {
        **base,
        "name": names.stream("META"),
        "subjects": [names.prefix + "meta.>"],
        "storage": "memory",
        "max_msgs": 1000,
        "duplicate_window": 3600 * 10**9,
    }
