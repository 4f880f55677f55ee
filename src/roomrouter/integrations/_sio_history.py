"""The history of a Socket.IO room: its persisted emits, read back as the clients got them.

With connection state recovery on (:class:`~roomrouter.integrations.socketio.AsyncServer`),
every emit without a callback is published with ``persist=True`` under an id that is the
offset its clients receive as the last argument; a storage worker (``roomrouter worker``)
moves it into the router's sink. :func:`read_history` reads a room's page back through
``RoomRouter.history`` (the sink and the recent cache merged, docs/architecture.md,
"Persistence, history and recovery") and decodes it, so a page can show the history first,
then go live, and drop whatever it already has by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .._errors import ConfigurationError
from ..storage import MAX_HISTORY_LIMIT
from ._sio_wire import Emit, RoomKey, decode
from ._socketio import RoomRouterManager

__all__ = ["StoredEmit", "read_history"]

#: Pages read to fill one answer when emits to several rooms (whose envelope ids in a room
#: may be below their offset) were filtered out: far more than a real mix needs.
_MAX_PAGES: Final = 16


@dataclass(frozen=True, slots=True)
class StoredEmit:
    """One emit to a Socket.IO room, as stored: ``id`` is the offset its clients received as
    the last argument of the event (so a page de-duplicates history and live events by it),
    ``event`` and ``args`` what was emitted, ``ts`` the emitting node's clock (Unix seconds).
    ``skip_sid`` of the emit is not applied: history is what the room was sent."""

    id: str
    event: str
    args: list[Any]
    ts: float


async def read_history(
    manager: RoomRouterManager,
    namespace: str,
    room: RoomKey,
    *,
    before: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[StoredEmit]:
    """The emits to ``room`` in id order: the last ``limit`` with an id below ``before`` (or
    the newest), or the first ``limit`` above ``after``. Raises
    :class:`~roomrouter.ConfigurationError` on bad arguments."""
    if before is not None and after is not None:
        raise ConfigurationError("give history before= or after=, not both")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ConfigurationError(f"limit must be between 1 and {MAX_HISTORY_LIMIT}")
    await manager.start()
    name = manager.room_name(namespace or "/", room)
    found: dict[str, StoredEmit] = {}
    cursor_before, cursor_after = before, after
    for _ in range(_MAX_PAGES):
        page = await manager.router.history(
            name, before=cursor_before, after=cursor_after, limit=limit
        )
        for envelope in page:
            message = decode(envelope.payload)
            if not isinstance(message, Emit) or message.offset is None or message.ack:
                continue
            offset = message.offset
            # An emit to several rooms has one envelope id per room, the offset being the
            # last: its envelope here may sit below ``before`` while its offset does not.
            if (before is None or offset < before) and (after is None or offset > after):
                found[offset] = StoredEmit(offset, message.event, message.args, envelope.ts)
        if len(page) < limit or len(found) >= limit:
            break
        if after is None:
            cursor_before = page[0].id
        else:
            cursor_after = page[-1].id
    ordered = [found[offset] for offset in sorted(found)]
    return ordered[:limit] if after is not None else ordered[-limit:]
