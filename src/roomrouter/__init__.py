"""roomrouter: route real-time room messages between horizontally scaled nodes.

Dynamic subscription (a node hears only the rooms it hosts), exact local bypass (the broker is
used only when another node hosts the room), and a pluggable broker: memory, Redis, RabbitMQ,
Kafka.
"""

from ._envelope import Envelope
from ._errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    DeliveryGap,
    DuplicateMember,
    HistoryUnavailable,
    InvalidRoomName,
    MemberClosed,
    MissingDependency,
    PayloadTooLarge,
    PublishOutcomeUnknown,
    RoomRouterError,
    RouterNotRunning,
    SinkError,
    SinkRefused,
    StorageQueueLost,
)
from ._member import Member, OverflowPolicy, Recovery
from ._router import RoomRouter
from .brokers._base import Broker, BrokerContext

__all__ = [
    "Broker",
    "BrokerContext",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigurationError",
    "DeliveryGap",
    "DuplicateMember",
    "Envelope",
    "HistoryUnavailable",
    "InvalidRoomName",
    "Member",
    "MemberClosed",
    "MissingDependency",
    "OverflowPolicy",
    "PayloadTooLarge",
    "PublishOutcomeUnknown",
    "Recovery",
    "RoomRouter",
    "RoomRouterError",
    "RouterNotRunning",
    "SinkError",
    "SinkRefused",
    "StorageQueueLost",
]

__version__ = "0.1.0.dev0"
