"""What every module of the Redis package shares: the names of a namespace's channels and
keys, the URL options, RESP packing, and connecting.

Names. Every channel and key of a namespace starts with ``rr:{<ns>}:``, where ``<ns>`` is the
namespace with ``%``, ``:``, ``{`` and ``}`` percent-encoded (``%25``, ``%3A``, ``%7B``,
``%7D``); see :func:`key_prefix`. So the namespace part never holds the separator and always
ends at the first ``:``, and no two namespaces share a name whatever rooms and nodes they have.
The braces are a Redis Cluster *hash tag*: every key of a namespace hashes to one slot, as the
MULTI of a persisted publish (storage stream, recent stream, publish) requires there. On a
Redis Cluster, room channels and recent caches take the *room* as their hash tag instead
(:func:`cluster_room_channel`, :func:`cluster_recent_key`), so rooms spread over the shards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import RedisError

from ..._errors import BrokerUnavailable, ConfigurationError, describe
from ..._urls import pop_options, redact

__all__ = [
    "NETWORK_ERRORS",
    "URL_OPTIONS",
    "address",
    "ask",
    "cluster_recent_key",
    "cluster_room_channel",
    "glob_escape",
    "key_prefix",
    "open_connection",
    "pack",
    "pack_publish",
    "parse_redis_url",
    "quiet_disconnect",
    "split_seeds",
    "store_key",
    "unescape",
    "url_flag",
]

NETWORK_ERRORS = (RedisError, OSError, TimeoutError, EOFError)

# -- names ------------------------------------------------------------------------------------

_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})
_UNESCAPE = re.compile(rb"%(25|3A|7B|7D)")


def _escaped(name: str) -> bytes:
    return name.translate(_ESCAPES).encode()


def key_prefix(namespace: str) -> bytes:
    """``rr:{<namespace, percent-encoded>}:``, the start of every name of ``namespace``."""
    return b"rr:{" + _escaped(namespace) + b"}:"


def store_key(namespace: str) -> bytes:
    """The storage stream of ``namespace``."""
    return key_prefix(namespace) + b"store"


def cluster_room_channel(namespace: str, room: str) -> bytes:
    """``rr:<ns>:r:{<room>}`` (Redis Cluster): the room is the hash tag, so rooms spread over
    the shards."""
    return b"rr:" + _escaped(namespace) + b":r:{" + _escaped(room) + b"}"


def cluster_recent_key(namespace: str, room: str) -> bytes:
    """``rr:<ns>:recent:{<room>}`` (Redis Cluster): in the slot of the room's channel."""
    return b"rr:" + _escaped(namespace) + b":recent:{" + _escaped(room) + b"}"


def unescape(value: bytes) -> str:
    """The name a percent-encoded part of a channel stands for."""
    return _UNESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value).decode(errors="replace")


def glob_escape(value: bytes) -> bytes:
    """``value`` as a literal in a ``PUBSUB CHANNELS``/``SCAN MATCH`` pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", value)


# -- URLs -------------------------------------------------------------------------------------


def url_flag(value: str) -> bool:
    """A boolean URL option: ``1``, ``true``, ``yes`` or ``on`` (any case) is true."""
    return value.lower() in {"1", "true", "yes", "on"}


#: The broker options a Redis URL's query may set (the cluster broker takes the same).
URL_OPTIONS: tuple[tuple[str, Callable[[str], Any]], ...] = (
    ("operation_timeout", float),
    ("max_backoff", float),
    ("health_interval", float),
    ("recent_size", int),
    ("recent_ttl", int),
    ("redelivery_after", float),
)


def parse_redis_url(
    url: str, options: Iterable[tuple[str, Callable[[str], Any]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a Redis URL into redis-py's connection keyword arguments (``parse_url`` of what
    is left) and the ``options`` its query sets, converted; a bad value is a
    :class:`~roomrouter.ConfigurationError` naming the URL without its password."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    found = pop_options(url, query, options)
    rest = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        kwargs: dict[str, Any] = dict(parse_url(rest))
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {redact(url)!r}: {exc}") from exc
    return kwargs, found


def split_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis://[auth@]h1:p1,h2:p2[,...]/...``: the URL with its first node only (for the
    usual parser), and the other seed nodes as ``(host, port)`` (port 6379 if left out)."""
    parts = urlsplit(url)
    auth, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return url, []
    first, *others = hosts.split(",")
    seeds: list[tuple[str, int]] = []
    for other in others:
        host, colon, port = other.rpartition(":")
        if not colon or host.endswith(":"):  # no port (an IPv6 address needs brackets)
            host, port = other, "6379"
        try:
            seeds.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigurationError(f"bad seed node {other!r} in {redact(url)!r}") from None
        if not seeds[-1][0]:
            raise ConfigurationError(f"empty seed node in {redact(url)!r}")
    return urlunsplit(parts._replace(netloc=auth + at + first)), seeds


def address(kwargs: dict[str, Any]) -> tuple[str, int | None]:
    """Where redis-py connection keyword arguments point, for messages: ``(host, port)``, or
    ``(path, None)`` for a Unix socket."""
    if "path" in kwargs:
        return str(kwargs["path"]), None
    return str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))


# -- the wire ---------------------------------------------------------------------------------


def pack(*args: bytes) -> bytes:
    """RESP encoding of one command of byte-string arguments."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def pack_publish(command: bytes, channel: bytes, frame: bytes) -> bytes:
    """RESP encoding of ``command channel frame``: done here because redis-py's generic packer
    was a third of the publisher's CPU time."""
    return b"*3\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(command), command, len(channel), channel, len(frame), frame,
    )  # fmt: skip


async def quiet_disconnect(conn: Connection) -> None:
    try:
        await conn.disconnect()
    except NETWORK_ERRORS:
        pass


async def open_connection(conn: Connection, seconds: float) -> Connection:
    """Connect ``conn`` within ``seconds``; on failure or cancellation it is closed (a socket
    may be open already) and the error propagates."""
    try:
        with anyio.fail_after(seconds):
            await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        with anyio.CancelScope(shield=True):
            await quiet_disconnect(conn)
        raise
    return conn


async def ask(conn: Connection, seconds: float, *commands: tuple[bytes, ...]) -> list[Any]:
    """The replies to ``commands``, in turn, on ``conn`` (an introspection connection: made
    for this, connected here and closed after), all within ``seconds``. A failure is a
    ``BrokerUnavailable`` naming the first command."""
    replies: list[Any] = []
    try:
        with anyio.fail_after(seconds):
            await conn.connect()  # type: ignore[no-untyped-call]
            for command in commands:
                await conn.send_command(*command)
                replies.append(await conn.read_response())
    except NETWORK_ERRORS as exc:
        what = b" ".join(commands[0][:2]).decode(errors="replace")
        raise BrokerUnavailable(f"Redis {what} failed: {describe(exc)}") from exc
    finally:
        await quiet_disconnect(conn)
    return replies
