"""Presence: who is in which room, cluster-wide, with the node each member is on.

``RedisPresence`` is imported on first use, so ``import roomrouter.presence`` never imports
redis; without the ``roomrouter[redis]`` extra that raises
:class:`~roomrouter.MissingDependency`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .._errors import ConfigurationError, MissingDependency
from ._base import Presence, PresenceEntry, PresenceEvent, PresenceWrite
from .memory import MemoryPresence

if TYPE_CHECKING:
    from .redis import RedisPresence

__all__ = [
    "MemoryPresence",
    "Presence",
    "PresenceEntry",
    "PresenceEvent",
    "PresenceWrite",
    "RedisPresence",
    "presence_from_url",
]


def presence_from_url(url: str) -> Presence:
    """``memory://[name]`` or ``redis://`` / ``rediss://`` / ``unix://``."""
    if not isinstance(url, str):
        raise ConfigurationError(f"presence URL must be a str, not {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        parts = urlsplit(url)
        return MemoryPresence((parts.netloc + parts.path).strip("/"))
    if scheme in ("redis", "rediss", "unix"):
        return _redis().from_url(url)
    raise ConfigurationError(
        f"unknown presence URL scheme {scheme!r}: use memory://, redis:// or rediss://"
    )


def _redis() -> type[RedisPresence]:
    try:
        from .redis import RedisPresence
    except ImportError as exc:
        raise MissingDependency("redis", "redis") from exc
    return RedisPresence


def __getattr__(name: str) -> Any:
    if name == "RedisPresence":
        return _redis()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
