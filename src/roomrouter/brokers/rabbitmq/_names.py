"""Exchange, queue and routing-key names (see "Names" and "Routing keys" in the package
docstring): pure functions, shared by the node and the storage consumers."""

from __future__ import annotations

import base64
import hashlib

__all__ = [
    "HASH_MARK",
    "SENTINEL",
    "STORE_KEY",
    "addressed_key",
    "amqp_name",
    "room_words",
    "recent_key",
    "room_of_key",
    "routing_key",
]

_MAX_PLAIN_KEY = 200
_MAX_KEY = 255  # AMQP's limit on a routing key (a short string), in bytes
HASH_MARK = "~"
# Persistence keys on the data exchange. Room keys are one word of base64url or ``~`` + 64 hex
# digits, so neither of these can ever equal one.
STORE_KEY = b"~store"
SENTINEL = "roomrouter-recent-sentinel"


def recent_key(room_key: str) -> bytes:
    """The binding key of a room's recent queue (two words: never a room key)."""
    return b"~recent." + room_key.encode()


def routing_key(name: str) -> str:
    """The single-word routing key of a room (or node) name; see the package docstring."""
    raw = name.encode()
    key = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    if len(key) <= _MAX_PLAIN_KEY:
        return key
    return HASH_MARK + hashlib.sha256(raw).hexdigest()


def _hashed(name: str) -> str:
    return HASH_MARK + hashlib.sha256(name.encode()).hexdigest()


def addressed_key(room: str, node: str) -> str:
    """The two-word key that reaches ``node``'s queue for ``room`` only (direct publishing, see
    "Direct publishing" in the package docstring): the room's word, then the node's. When the
    two plain words exceed AMQP's 255 bytes, both are their hashed forms (131 bytes)."""
    room_key, node_key = routing_key(room), routing_key(node)
    if len(room_key) + len(node_key) < _MAX_KEY:
        return f"{room_key}.{node_key}"
    return f"{_hashed(room)}.{_hashed(node)}"


def room_words(room: str) -> tuple[str, ...]:
    """The first words an addressed key of ``room`` can have (plain and hashed, or just the
    hashed one when that is the room's routing key)."""
    plain, hashed = routing_key(room), _hashed(room)
    return (plain,) if plain == hashed else (plain, hashed)


def room_of_key(key: str) -> str | None:
    """Decode a plain routing key back to its room; ``None`` for hashed or foreign keys."""
    if key.startswith(HASH_MARK):
        return None
    try:
        return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
    except ValueError:
        return None


_NAME_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _name_part(part: str) -> str:
    if _NAME_SAFE.issuperset(part):
        return part
    return "".join(
        ch if ch in _NAME_SAFE else "".join(f"+{b:02x}" for b in ch.encode()) for ch in part
    )


def amqp_name(namespace: str, *parts: str, exchange: bool = False) -> str:
    """The exchange (``exchange=True``) or queue name of ``namespace`` made of ``parts``; see
    "Names" in the package docstring. The nodes and the storage consumers use only this."""
    name = ".".join(["rr", _name_part(namespace), *(_name_part(p) for p in parts)])
    # pamqp refuses exchange names over 127 characters and queue names over 256.
    if len(name) <= (127 if exchange else 255):
        return name
    return "rr.#" + hashlib.sha256(name.encode()).hexdigest()
