"""One exception hierarchy for everything roomrouter raises.

::

    RoomRouterError
    ├── ConfigurationError          bad URL, bad option
    │   └── MissingDependency       an optional extra is not installed (says which)
    ├── InvalidRoomName             (also a ValueError)
    ├── PayloadTooLarge             (also a ValueError)
    ├── DuplicateMember             (also a ValueError)
    ├── MemberClosed                the member was closed (by the app or by its overflow policy)
    ├── DeliveryGap                 messages of a room may have been lost (a lost data
    │                               connection): raised once by ``receive()``, the member goes on
    ├── RouterNotRunning            used outside ``async with router``
    ├── BrokerError                 anything the broker client raised, mapped with ``from exc``
    │   ├── BrokerUnavailable       no connection, refused, nack: the operation did not happen
    │   │   └── PublishOutcomeUnknown   a publish was sent but its answer was lost: it may
    │   │                               have happened (and been stored)
    │   └── StorageQueueLost        the storage queue vanished and was recreated (a loss window)
    ├── SinkError                   a persistence sink failed
    │   └── SinkRefused             the sink refuses rows of this batch (bad data, not an outage)
    └── HistoryUnavailable          the requested recovery window is no longer available

No exception of redis, aio-pika, aiokafka or a database driver reaches the caller: every backend
maps them into this tree (``raise BrokerUnavailable(...) from exc``).

Retrying a publish. :class:`BrokerUnavailable` from ``publish`` means the frame never left this
node: retrying is safe. :class:`PublishOutcomeUnknown` (a subclass, so catch it first) means the
frame was handed to the connection and then the answer did not come (timeout, connection lost
after the write): the broker may have delivered and stored it. Retry it with the same id,
``router.publish(room, payload, id=envelope_id, ...)`` with the id from the exception's
``envelope_id``: the sinks write by id, so it is stored once; members may receive it twice
and can drop the second copy by id. A retry under a new id would store it twice.

Wording. Every backend says that a service cannot be reached in one way, through
:func:`unreachable`: ``cannot reach Redis at 127.0.0.1:1: connection refused``, or
``RabbitMQ at 127.0.0.1:5672 refused the login for user 'guest'``; other failures of a client
library are told with :func:`describe`, a short reason, never the library's ``repr``.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from typing import TypeVar

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "ConfigurationError",
    "DeliveryGap",
    "DuplicateMember",
    "HistoryUnavailable",
    "InvalidRoomName",
    "MemberClosed",
    "MissingDependency",
    "PayloadTooLarge",
    "PublishOutcomeUnknown",
    "RoomRouterError",
    "RouterNotRunning",
    "SinkError",
    "SinkRefused",
    "StorageQueueLost",
    "describe",
    "missing_module",
    "unreachable",
]


class RoomRouterError(Exception):
    """Base class of every error raised by roomrouter."""


class ConfigurationError(RoomRouterError):
    """A URL or an option is not valid."""


class MissingDependency(ConfigurationError):
    """The optional dependency of a backend is not installed; the message says what to install."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"the {module!r} package is missing (the {extra!r} extra): "
            f'pip install "roomrouter[{extra}]"'
        )
        self.extra = extra
        self.module = module


def missing_module(exc: ImportError, default: str) -> str:
    """The top-level package an ``ImportError`` says is missing (``aiohttp`` rather than the
    backend's main client library when only that one is absent), else ``default``."""
    name = exc.name
    if not name or name.startswith("roomrouter"):
        return default
    return name.split(".")[0]


class InvalidRoomName(RoomRouterError, ValueError):
    """A room name is empty, too long, not a string, or holds control characters."""


class PayloadTooLarge(RoomRouterError, ValueError):
    """A payload is larger than the router's ``max_payload``."""


class DuplicateMember(RoomRouterError, ValueError):
    """A member with this id already exists on this router."""


class MemberClosed(RoomRouterError):
    """The member is closed; ``reason`` is ``"closed"``, ``"overflow"`` or ``"router closed"``."""

    def __init__(self, member_id: str, reason: str) -> None:
        super().__init__(f"member {member_id!r} is closed: {reason}")
        self.member_id = member_id
        self.reason = reason


class DeliveryGap(RoomRouterError):
    """Messages of ``room`` may be missing at this point of the member's stream.

    The node's data connection to the broker was lost and restored, and what was published
    to ``room`` meanwhile could not all be recovered: live-only (not persisted) messages, a
    backend without a recent-messages cache, or a cache that no longer reaches back to what
    the node last delivered. Raised once, by the ``receive()`` (``receive_batch()``,
    ``receive_nowait()``, ``async for``) that reaches the gap; the member stays in its rooms
    and the next call goes on with what came after. An app that can resynchronise its client
    does it here (e.g. ``history(room, after=<last id it saw>)`` for persisted messages, or
    tell the client to reload). See "Delivery semantics" in docs/architecture.md.
    """

    def __init__(self, member_id: str, room: str) -> None:
        super().__init__(f"member {member_id!r}: messages of room {room!r} may have been lost")
        self.member_id = member_id
        self.room = room


class RouterNotRunning(RoomRouterError):
    """The router is used before ``async with router`` entered or after it exited."""


class BrokerError(RoomRouterError):
    """The broker failed an operation."""


class BrokerUnavailable(BrokerError):
    """The broker could not be reached in time, or refused the operation; it did not happen
    (unless this is a :class:`PublishOutcomeUnknown`)."""


class PublishOutcomeUnknown(BrokerUnavailable):
    """A frame was written to the broker connection, then its acknowledgement did not arrive
    (timeout, or the connection was lost after the write): it may or may not have been
    published and stored. ``envelope_id`` is the id to retry with (set by the router; None
    for a bare broker call): see "Retrying a publish" in this module's docstring.

    A subclass of :class:`BrokerUnavailable`, so code that treats every broker failure alike
    keeps working; code that retries must catch this one first."""

    def __init__(self, message: str, envelope_id: str | None = None) -> None:
        super().__init__(message)
        self.envelope_id = envelope_id


class SinkError(RoomRouterError):
    """A persistence sink failed to read or write."""


class StorageQueueLost(BrokerError):
    """The storage queue (or its consumer group) was gone and has been recreated.

    Frames the broker held in it when it vanished are lost; :meth:`StorageConsumer.fetch`
    raises this once per loss it repaired, so the worker can count and report the window.
    The next fetch goes on normally.
    """


class SinkRefused(SinkError):
    """The sink refuses the data of at least one row of the batch (an invalid character, a
    value out of range): writing the same batch again cannot succeed, unlike a plain
    :class:`SinkError` (sink unavailable), which is worth retrying."""


class HistoryUnavailable(RoomRouterError):
    """The messages after the requested id can no longer be recovered completely."""


# -- one wording ------------------------------------------------------------------------------

_E = TypeVar("_E", bound=RoomRouterError)

#: Words for the errno values a connect fails with.
_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ENOENT: "no such socket file",
    errno.EACCES: "permission denied",
    errno.EPIPE: "connection closed",
}

#: What a client library's message says, and the same in words, for libraries that fold the
#: cause into a string (``Error 111 connecting to ...``, ``(2003, "Can't connect ...")``).
_TEXT_REASONS = (
    (
        re.compile(
            r"(?i)errno -[235]\b|name or service not known|nodename nor servname|"
            r"temporary failure in name resolution|getaddrinfo failed"
        ),
        "name not resolved",
    ),
    (
        re.compile(r"(?i)\b(?:error|errno) 111\b|connection refused|connect call failed"),
        "connection refused",
    ),
    (re.compile(r"(?i)\b(?:error|errno) 110\b|\btimed out\b|\btimeout connecting\b"), "timed out"),
    (re.compile(r"(?i)\b(?:error|errno) 113\b|no route to host"), "host unreachable"),
    (re.compile(r"(?i)connection reset|\b(?:error|errno) 104\b"), "connection reset"),
    # aiokafka says only this (it logs each address's own failure).
    (re.compile(r"(?i)unable to bootstrap"), "no broker answered"),
)

#: A refused login, by exception class name or by what the server said.
_AUTH_CLASS = re.compile(r"(?i)authenticat|authoriz|password")
_AUTH_TEXT = re.compile(
    r"(?i)access_refused|wrongpass|noauth|invalid username-password|"
    r"password authentication failed|access denied for user|\(1045\b|sasl authentication"
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the exceptions held in groups or in ``args``."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        item = todo.pop(0)
        if any(item is s for s in seen):
            continue
        seen.append(item)
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        todo.extend(a for a in item.args if isinstance(a, BaseException))
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                todo.append(linked)
    return seen


def _refused_login(exc: BaseException) -> bool:
    return any(
        _AUTH_CLASS.search(type(e).__name__) or _AUTH_TEXT.search(_text(e)) for e in _chain(exc)
    )


def _text(exc: BaseException) -> str:
    """The message of ``exc`` as a person reads it: its first string argument (libraries that
    keep the server's words in ``args`` otherwise show a tuple), else ``str(exc)``."""
    items: list[object] = list(exc.args)
    first = None
    while items and first is None:
        item = items.pop(0)
        if isinstance(item, str) and item.strip():
            first = item
        elif isinstance(item, (tuple, list)):
            items[:0] = item
    text = first if first is not None else str(exc)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _reason(exc: BaseException) -> str | None:
    """The reason in words if ``exc`` (or what it wraps) is a known network failure."""
    chain = _chain(exc)
    for item in chain:
        if isinstance(item, socket.gaierror):
            return "name not resolved"
        if isinstance(item, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, TimeoutError) or type(item).__name__.endswith("TimeoutError"):
            return "timed out"  # also redis's and aiokafka's own TimeoutError classes
        if isinstance(item, OSError) and item.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[item.errno]
    for item in chain:
        # Some libraries keep the errno in args[0] of an exception that is no OSError.
        code = item.args[0] if item.args else None
        if isinstance(code, int) and abs(code) in (2, 3, 5) and code < 0:
            return "name not resolved"
        if isinstance(code, int) and code in _ERRNO_REASONS:
            return _ERRNO_REASONS[code]
        text = _text(item)
        for pattern, words in _TEXT_REASONS:
            if pattern.search(text):
                return words
    for item in chain:
        if isinstance(item, (EOFError, ConnectionError)):
            return "connection closed"
    return None


def describe(exc: BaseException) -> str:
    """A short reason for ``exc``, a client library's exception, for a message: the network
    failure in words when it is one (``connection refused``, ``timed out``, ``name not
    resolved``, ...), else its class name and message; never its ``repr``."""
    if isinstance(exc, RoomRouterError):
        return str(exc)
    if _refused_login(exc):
        return "login refused"
    reason = _reason(exc)
    if reason is not None:
        return reason
    text = _text(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def unreachable(
    service: str,
    host: str | None,
    port: int | str | None,
    exc: BaseException,
    *,
    user: str | None = None,
    purpose: str | None = None,
    error: type[_E] = BrokerUnavailable,  # type: ignore[assignment]
) -> _E:
    """The error for a failed connect to ``service`` (``"Redis"``, ``"RabbitMQ"``, ...) at
    ``host:port`` (``port`` None: ``host`` is the whole address, a socket path or a list), in
    the one wording of every backend: ``cannot reach Redis at 127.0.0.1:1: connection
    refused``, or ``RabbitMQ at 127.0.0.1:5672 refused the login for user 'guest'``; a
    service that answered and refused something else: ``PostgreSQL at 127.0.0.1:5432:
    <reason>``. Raise it ``from exc``. ``error`` is the class (:class:`SinkError` for a
    database); ``purpose`` follows the address (``cannot reach Redis at 127.0.0.1:1 for
    presence: connection refused``)."""
    # Never credentials, were they left in an address ("user:pw@host:9092,...").
    where = ",".join(part.rpartition("@")[2] for part in (host or "?").split(","))
    if port is not None:
        where = f"[{where}]:{port}" if ":" in where else f"{where}:{port}"
    if purpose:
        where += f" for {purpose}"
    if _refused_login(exc):
        who = f" for user {user!r}" if user else ""
        return error(f"{service} at {where} refused the login{who}")
    reason = _reason(exc)
    if reason is None:  # it answered, and refused something else (a missing database, ...)
        return error(f"{service} at {where}: {describe(exc)}")
    return error(f"cannot reach {service} at {where}: {reason}")
