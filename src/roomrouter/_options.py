"""Checks of what the application hands a router: its options, headers, member info and
payloads, and where its presence is kept. Bad input gets a clear :class:`ConfigurationError`
(or :class:`TypeError`, :class:`PayloadTooLarge`) at the call, never later in a sink or on
another node (docs/architecture.md, guarantee 9)."""

from __future__ import annotations

from collections.abc import Mapping

from ._errors import ConfigurationError, PayloadTooLarge
from .brokers._base import Broker
from .presence._base import Presence
from .storage._base import Sink

__all__ = [
    "check_headers",
    "check_info",
    "check_options",
    "payload_bytes",
    "presence_store",
    "presence_url_of",
]


def check_options(
    broker: Broker,
    *,
    namespace: str,
    node_id: str | None,
    linger: float,
    inbox_size: int,
    overflow: str,
    max_payload: int,
    max_inbox_bytes: int | None,
    heartbeat_interval: float,
    node_ttl: float,
    sink: Sink | str | None,
    direct_max: int,
    suspect_interval: float | None,
    control_secret: str | bytes | None,
) -> tuple[int, bytes | None, Sink | None]:
    """Raise :class:`ConfigurationError` for a bad ``RoomRouter`` option; return what the
    router keeps of the three it resolves: ``max_inbox_bytes`` (its default), the control
    secret as bytes, the sink (opened from a URL)."""
    if not isinstance(broker, Broker):
        raise ConfigurationError(f"broker must be a roomrouter Broker, not {broker!r}")
    if not namespace or not isinstance(namespace, str) or not namespace.isprintable():
        raise ConfigurationError(f"namespace must be a non-empty printable str: {namespace!r}")
    if overflow not in ("drop_oldest", "disconnect"):
        raise ConfigurationError(f"overflow must be 'drop_oldest' or 'disconnect': {overflow!r}")
    if not isinstance(direct_max, int) or direct_max < 0:
        raise ConfigurationError(f"direct_max must be an int >= 0: {direct_max!r}")
    if inbox_size < 1 or max_payload < 0 or linger < 0:
        raise ConfigurationError("inbox_size must be >= 1; max_payload and linger >= 0")
    if max_inbox_bytes is None:
        max_inbox_bytes = max(8 << 20, 2 * max_payload)
    elif not isinstance(max_inbox_bytes, int) or max_inbox_bytes < max(max_payload, 1):
        raise ConfigurationError(
            f"max_inbox_bytes must be an int >= max_payload ({max_payload}): {max_inbox_bytes!r}"
        )
    if not 0 < heartbeat_interval < node_ttl:
        raise ConfigurationError("need 0 < heartbeat_interval < node_ttl")
    if suspect_interval is not None and not heartbeat_interval < suspect_interval <= node_ttl:
        raise ConfigurationError("need heartbeat_interval < suspect_interval <= node_ttl")
    secret = control_secret.encode() if isinstance(control_secret, str) else control_secret
    if secret is not None and (not isinstance(secret, bytes) or not secret):
        raise ConfigurationError("control_secret must be a non-empty str or bytes")
    if isinstance(sink, str):
        from .storage import sink_from_url

        sink = sink_from_url(sink)
    if sink is not None and not isinstance(sink, Sink):
        raise ConfigurationError(f"sink must be a roomrouter Sink or a URL, not {sink!r}")
    if node_id is not None and (
        not node_id or len(node_id) > 128 or not node_id.isprintable() or " " in node_id
    ):
        raise ConfigurationError(f"node_id must be printable, without spaces: {node_id!r}")
    return max_inbox_bytes, secret, sink


def payload_bytes(payload: object, max_payload: int) -> bytes:
    """``payload`` as bytes, checked: bytes-like only, at most ``max_payload`` bytes."""
    if not isinstance(payload, bytes):
        # Bytes-like only, sized before the copy: bytes(5) would be five NUL bytes,
        # bytes([104, 105]) b"hi", and bytes(10**12) a MemoryError before any size check.
        if isinstance(payload, memoryview):
            size = payload.nbytes
        elif isinstance(payload, bytearray):
            size = len(payload)
        else:
            raise TypeError(
                f"payload must be bytes, bytearray or memoryview, not {type(payload).__name__}"
            )
        if size > max_payload:
            raise PayloadTooLarge(
                f"payload is {size} bytes; this router's max_payload is {max_payload}"
            )
        payload = bytes(payload)
    if len(payload) > max_payload:
        raise PayloadTooLarge(
            f"payload is {len(payload)} bytes; this router's max_payload is {max_payload}"
        )
    return payload


def check_headers(headers: Mapping[str, str]) -> None:
    # Headers are stored by sinks as text: refuse what a database would refuse later, at the
    # publish, where the caller can still act on it.
    for key, value in headers.items():
        for text in (key, value):
            if not isinstance(text, str) or "\x00" in text or not _encodable(text):
                raise ConfigurationError(f"header {key!r}: keys and values must be text")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_info(info: Mapping[str, str] | None) -> dict[str, str]:
    if not info:
        return {}
    check_headers(info)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in info.items())
    if size > 4096:
        raise ConfigurationError(f"member info is {size} bytes; at most 4096")
    return dict(info)


def presence_store(broker: Broker, presence: Presence | str | bool | None) -> Presence | None:
    if presence is None or presence is False:
        return None
    from .presence import presence_from_url
    from .presence.memory import MemoryPresence

    if isinstance(presence, Presence):
        return presence
    if isinstance(presence, str):
        return presence_from_url(presence)
    if presence is True:
        from .brokers.memory import MemoryBroker

        if isinstance(broker, MemoryBroker):
            return MemoryPresence(broker.hub.name)
        raise ConfigurationError(
            f"presence=True needs RoomRouter.from_url (or a memory broker); for the "
            f"{broker.name} backend pass presence='redis://...'"
        )
    raise ConfigurationError(f"presence must be a Presence, a URL or a bool, not {presence!r}")


def presence_url_of(url: str) -> str:
    """The presence store on the broker's own server: the broker URL without its options."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("memory", "redis", "rediss", "unix"):
        raise ConfigurationError(
            f"presence=True: the {parts.scheme} backend keeps no presence; pass "
            "presence='redis://...'"
        )
    from ._urls import _cluster_option

    query = "cluster=1" if _cluster_option(url) else ""  # a Redis Cluster stays one
    return urlunsplit(parts._replace(query=query, fragment=""))
