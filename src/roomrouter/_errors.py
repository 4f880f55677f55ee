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
"""

from __future__ import annotations

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
