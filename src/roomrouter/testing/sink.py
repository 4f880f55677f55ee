"""``SinkContract``: the conformance suite of a persistence sink.

Subclass it under a name pytest collects and set :attr:`~SinkContract.sink_url`::

    from roomrouter.testing import SinkContract

    class TestMySink(SinkContract):
        sink_url = "mysink:///tmp/test.db"

Every test writes to rooms (and ids) of its own, so one storage may serve the whole class;
counts are compared before and after. The guarantees checked are those of
:class:`roomrouter.storage.Sink` (docs/backends.md): an atomic, committed write (1),
idempotence by id, first write wins (2), id order as plain strings and the paging of
``history`` (3), errors as ``SinkError``/``ValueError`` (4), dead letters kept (5, where the
sink keeps them), and the start/aclose life cycle.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, ClassVar

import anyio
import pytest

from .._envelope import Envelope, IdGenerator
from .._errors import SinkError
from ..storage import MAX_HISTORY_LIMIT, DeadLetter, Sink, sink_from_url

__all__ = ["SinkContract"]


def _ids(items: list[Envelope]) -> list[str]:
    return [e.id for e in items]


@pytest.mark.anyio
class SinkContract:
    """The sink conformance suite; see the module docstring."""

    #: The URL every sink of the suite is built from (``sink_from_url``: the registry).
    sink_url: ClassVar[str]
    #: Keyword options handed to the sink's factory with the URL.
    sink_options: ClassVar[dict[str, Any]] = {}
    #: True if two sinks of :attr:`sink_url` share their data (a file or a server, not a
    #: private in-memory database): the tests of commit visibility and restart need it.
    durable: ClassVar[bool] = True

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture(autouse=True)
    def _contract_setup(self) -> None:
        self.available()
        self._tag = uuid.uuid4().hex[:10]

    def available(self) -> None:
        """Skip (``pytest.skip``) or fail here if the sink's server is not reachable."""

    def make_sink(self) -> Sink:
        """A fresh, unstarted sink."""
        return sink_from_url(self.sink_url, **self.sink_options)

    @asynccontextmanager
    async def sink(self) -> AsyncIterator[Sink]:
        async with self.make_sink() as sink:
            yield sink

    def room(self, name: str = "lobby") -> str:
        """``name`` made unique to this test."""
        return f"{name}-{self._tag}"

    def envelopes(self, room: str, n: int, *, payload: bytes = b"x") -> list[Envelope]:
        gen = IdGenerator()
        return [
            Envelope(id=gen.next(), room=room, origin="node-a", ts=1.7e9 + i, payload=payload)
            for i in range(n)
        ]

    def _need_durable(self) -> None:
        if not self.durable:
            pytest.skip("the sink URL is not durable (durable = False)")

    # -- 1 and 2: atomic, committed, idempotent writes -----------------------------------------

    async def test_write_is_idempotent_by_id(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 20)
            assert await sink.write(batch) == 20
            assert await sink.write(batch) == 0
            assert await sink.count(room) == 20
            more = self.envelopes(room, 10)
            assert await sink.write(batch[:10] + more) == 10
            assert await sink.count(room) == 30

    async def test_duplicates_within_one_batch_are_stored_once(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 5)
            assert await sink.write(batch + batch[::-1] + batch[:2]) == 5
            assert _ids(await sink.history(room)) == _ids(batch)

    async def test_first_write_of_an_id_wins(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            [first] = self.envelopes(room, 1, payload=b"first")
            second = Envelope(id=first.id, room=room, origin="node-b", ts=0.0, payload=b"second")
            await sink.write([first])
            assert await sink.write([second]) == 0
            [stored] = await sink.history(room)
            assert (stored.payload, stored.origin) == (b"first", "node-a")

    async def test_empty_write_is_a_no_op(self) -> None:
        async with self.sink() as sink:
            before = await sink.count()
            assert await sink.write([]) == 0
            assert await sink.count() == before

    async def test_write_is_committed_when_it_returns(self) -> None:
        self._need_durable()
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 3)
            await sink.write(batch)
            async with self.sink() as reader:  # an independent sink sees the batch
                assert _ids(await reader.history(room)) == _ids(batch)

    async def test_a_failing_batch_writes_nothing(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            good = self.envelopes(room, 3)
            # A lone surrogate is not UTF-8: a SQL driver refuses it, after the good rows.
            bad = Envelope(
                id=good[-1].id + "z", room=room + "\ud800", origin="n", ts=0.0, payload=b""
            )
            try:
                await sink.write([*good, bad])
            except SinkError:
                assert await sink.count(room) == 0, "a failed write left rows behind"
                assert await sink.write(good) == 3
            else:  # a sink that stores any str must give it back
                assert await sink.count(room) == 3
                assert _ids(await sink.history(bad.room)) == [bad.id]

    async def test_concurrent_writes_store_each_id_once(self) -> None:
        room = self.room()
        async with AsyncExitStack() as stack:
            # Three sinks of one storage, or (not durable) one sink shared by three tasks.
            count = 3 if self.durable else 1
            opened = [await stack.enter_async_context(self.sink()) for _ in range(count)]
            sinks = [opened[i % count] for i in range(3)]
            batch = self.envelopes(room, 300)
            orders = [batch, batch[::-1], batch[1::2] + batch[::2]]
            inserted: list[int] = []

            async def write(sink: Sink, items: list[Envelope]) -> None:
                inserted.append(await sink.write(items))

            async with anyio.create_task_group() as tg:
                for sink, items in zip(sinks, orders, strict=True):
                    tg.start_soon(write, sink, items)
            assert sum(inserted) == len(batch), inserted
            stored = await sinks[0].history(room, after="", limit=MAX_HISTORY_LIMIT)
            assert _ids(stored) == _ids(batch)

    # -- 3: order and paging -------------------------------------------------------------------

    async def test_history_is_in_id_order_whatever_the_write_order(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 60)
            shuffled = batch[:]
            random.Random(7).shuffle(shuffled)
            for start in range(0, 60, 7):
                await sink.write(shuffled[start : start + 7])
            assert _ids(await sink.history(room, limit=100)) == _ids(batch)

    async def test_ids_compare_as_code_points_not_by_locale(self) -> None:
        room, tag = self.room("r"), self._tag
        raw = [tag + s for s in ("B", "a", "a-c", "ab", "é", "z", "\U0001f600")]
        async with self.sink() as sink:
            await sink.write(
                [Envelope(id=i, room=room, origin="n", ts=0.0, payload=b"") for i in raw[::-1]]
            )
            assert _ids(await sink.history(room)) == sorted(raw)
            after = tag + "a"
            assert _ids(await sink.history(room, after=after)) == [
                i for i in sorted(raw) if i > after
            ]
            assert await sink.latest_id(room) == max(raw)

    async def test_walk_a_room_backwards_and_forwards(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 237)
            await sink.write(batch)
            pages: list[list[str]] = []
            before: str | None = None
            while page := _ids(await sink.history(room, before=before, limit=50)):
                assert page == sorted(page)
                pages.append(page)
                before = page[0]
            assert [len(p) for p in pages] == [50, 50, 50, 50, 37]
            assert [i for page in reversed(pages) for i in page] == _ids(batch)
            pages, after = [], ""
            while page := _ids(await sink.history(room, after=after, limit=50)):
                pages.append(page)
                after = page[-1]
            assert [len(p) for p in pages] == [50, 50, 50, 50, 37]
            assert [i for page in pages for i in page] == _ids(batch)

    async def test_history_windows(self) -> None:
        room = self.room()
        async with self.sink() as sink:
            batch = self.envelopes(room, 120)
            await sink.write(batch)
            assert _ids(await sink.history(room, limit=5)) == _ids(batch[-5:])
            assert _ids(await sink.history(room, before=batch[10].id, limit=5)) == _ids(batch[5:10])
            assert _ids(await sink.history(room, before=batch[3].id, limit=5)) == _ids(batch[:3])
            window = await sink.history(room, after=batch[10].id, before=batch[100].id, limit=20)
            assert _ids(window) == _ids(batch[11:31])
            window = await sink.history(room, after=batch[10].id, before=batch[100].id, limit=500)
            assert _ids(window) == _ids(batch[11:100])
            assert await sink.history(room, after=batch[50].id, before=batch[51].id) == []
            assert len(await sink.history(room, limit=MAX_HISTORY_LIMIT)) == 120

    @pytest.mark.parametrize("limit", [0, -1, MAX_HISTORY_LIMIT + 1, True, 2.0, "5", None])
    async def test_history_rejects_a_bad_limit(self, limit: object) -> None:
        async with self.sink() as sink:
            with pytest.raises(ValueError):
                await sink.history(self.room(), limit=limit)  # type: ignore[arg-type]

    async def test_rooms_are_isolated(self) -> None:
        rooms = [self.room(n) for n in ("lobby", "lobby2", "lob%", "Lobby", "é-room", "a b")]
        async with self.sink() as sink:
            before = await sink.count()
            written = {room: self.envelopes(room, 4 + n) for n, room in enumerate(rooms)}
            await sink.write([e for batch in written.values() for e in batch])  # one batch
            for room, batch in written.items():
                assert await sink.count(room) == len(batch)
                assert _ids(await sink.history(room)) == _ids(batch)
                assert _ids(await sink.history(room, after="")) == _ids(batch)
                assert await sink.latest_id(room) == batch[-1].id
            assert await sink.count() == before + sum(len(b) for b in written.values())
            nobody = self.room("nobody")
            assert await sink.count(nobody) == 0
            assert await sink.history(nobody) == []
            assert await sink.latest_id(nobody) is None

    # -- what is stored comes back --------------------------------------------------------------

    @pytest.mark.parametrize(
        "payload",
        [b"", b"\x00", bytes(range(256)), b"\xff\xfe" * 5000, "ünïcødé".encode(), b"'; --"],
        ids=["empty", "nul", "all-bytes", "10k", "utf8", "sql-ish"],
    )
    async def test_payload_bytes_roundtrip(self, payload: bytes) -> None:
        room = self.room()
        async with self.sink() as sink:
            [envelope] = self.envelopes(room, 1, payload=payload)
            await sink.write([envelope])
            [stored] = await sink.history(room)
            assert type(stored.payload) is bytes and stored.payload == payload

    @pytest.mark.parametrize(
        "headers",
        [{}, {"a": "b"}, {"content-type": "text/plain", "x": ""}, {"ключ": "值 \x00 \"'\\"}],
        ids=["none", "one", "two", "unicode-nul-quotes"],
    )
    async def test_every_field_roundtrips(self, headers: dict[str, str]) -> None:
        room = self.room()
        envelope = Envelope(
            id=IdGenerator().next(),
            room=room,
            origin="node-ü",
            ts=1_712_345_678.123456,
            payload=b"p",
            headers=headers,
            persist=True,
        )
        async with self.sink() as sink:
            await sink.write([envelope])
            assert await sink.history(room) == [envelope]
            # persist is not stored: what comes back was persisted.
            [plain] = self.envelopes(room, 1)
            await sink.write([plain])
            assert (await sink.history(room))[-1].persist is True

    # -- 5: dead letters --------------------------------------------------------------------------

    async def test_dead_letters_are_kept_in_order(self) -> None:
        letters = [
            DeadLetter(bytes([i]) + b"\x00\xff" + self._tag.encode(), f"reason {i} ü", "w", 1.5 + i)
            for i in range(3)
        ]
        async with self.sink() as sink:
            try:
                await sink.write_dead_letters(letters)
            except NotImplementedError:
                pytest.skip("this sink keeps no dead letters")
            kept = [
                d for d in await sink.dead_letters(10_000) if d.frame in {x.frame for x in letters}
            ]
            assert [(d.frame, d.reason) for d in kept] == [(d.frame, d.reason) for d in letters]

    # -- life cycle -------------------------------------------------------------------------------

    async def test_restart_keeps_the_data(self) -> None:
        self._need_durable()
        room = self.room()
        batch = self.envelopes(room, 5)
        async with self.sink() as sink:
            await sink.write(batch)
        async with self.sink() as sink:
            assert _ids(await sink.history(room)) == _ids(batch)

    async def test_concurrent_first_starts(self) -> None:
        self._need_durable()
        room = self.room()
        sinks = [self.make_sink() for _ in range(4)]
        try:
            async with anyio.create_task_group() as tg:
                for s in sinks:
                    tg.start_soon(s.start)
            await sinks[0].write(self.envelopes(room, 2))
            assert [await s.count(room) for s in sinks] == [2, 2, 2, 2]
        finally:
            for s in sinks:
                await s.aclose()

    async def test_use_outside_start_and_aclose_raises_sink_error(self) -> None:
        sink = self.make_sink()
        with pytest.raises(SinkError):
            await sink.count()
        await sink.start()
        with pytest.raises(SinkError):
            await sink.start()
        await sink.aclose()
        await sink.aclose()  # idempotent
        with pytest.raises(SinkError):
            await sink.write(self.envelopes(self.room(), 1))
        with pytest.raises(SinkError):
            await sink.start()
