"""The transport core (roomrouter.brokers.transport): the settle rule, order, deadlines,
backoff and the reconnect template, decided once for every backend and tested here once."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from roomrouter import BrokerUnavailable, PublishOutcomeUnknown
from roomrouter.brokers.transport import Backoff, Outbox, keep_connected

from .helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the core's futures are asyncio's, as every backend's client library is


class Wire:
    """A fake connection: records what was written, fails on demand."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.fail_connect = False
        self.fail_write_after = False
        self.hang_reply = False

    async def connect(self) -> Wire:
        await anyio.lowlevel.checkpoint()
        if self.fail_connect:
            raise ConnectionRefusedError("connection refused")
        return self

    async def write(self, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.written.append(data)
        if self.fail_write_after:
            raise ConnectionResetError("connection reset by peer")

    async def reply(self) -> str:
        if self.hang_reply:
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return "OK"


async def sender(outbox: Outbox[bytes], wire: Wire) -> None:
    while True:
        batch = await outbox.take()
        async with outbox.transmit(batch) as tx:
            conn = await wire.connect()
            payload = b"".join(s.item for s in tx.sent())
            await conn.write(payload)
            for send in tx.sends:
                send.resolve(await conn.reply())


async def test_call_order_is_send_order_under_concurrent_callers() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    wire = Wire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        tg.start_soon(sender, outbox, wire)
        results: list[Any] = []

        async def call(i: int) -> None:
            results.append(await outbox.submit(b"%d," % i))

        for i in range(500):
            tg.start_soon(call, i)

        def all_answered() -> None:
            assert len(results) == 500

        await eventually(all_answered)
        tg.cancel_scope.cancel()
    sent = b"".join(wire.written).split(b",")[:-1]
    assert sent == [b"%d" % i for i in range(500)]
    assert results == ["OK"] * 500
    assert len(wire.written) < 500  # batched: many publishes per write


async def test_a_failure_before_sending_is_not_sent_and_after_it_is_outcome_unknown() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    wire = Wire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        tg.start_soon(sender, outbox, wire)
        wire.fail_connect = True
        with pytest.raises(BrokerUnavailable) as refused:
            await outbox.submit(b"a")
        assert not isinstance(refused.value, PublishOutcomeUnknown)
        assert "not sent" in str(refused.value) and "connection refused" in str(refused.value)
        assert wire.written == []
        wire.fail_connect = False
        wire.fail_write_after = True
        with pytest.raises(PublishOutcomeUnknown, match="may have been published"):
            await outbox.submit(b"b")
        assert wire.written == [b"b"]
        wire.fail_write_after = False
        assert await outbox.submit(b"c") == "OK"  # the sender goes on after failures
        tg.cancel_scope.cancel()


async def test_a_publish_that_waits_past_its_deadline_is_not_sent_and_never_sent_later() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 0.2)
    wire = Wire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        # No sender yet: the publish stays queued until the watchdog fails it.
        started = anyio.current_time()
        with pytest.raises(BrokerUnavailable, match="not sent") as info:
            await outbox.submit(b"late")
        assert not isinstance(info.value, PublishOutcomeUnknown)
        assert 0.15 < anyio.current_time() - started < 1.0
        tg.start_soon(sender, outbox, wire)
        assert await outbox.submit(b"next") == "OK"
        assert wire.written == [b"next"]  # the failed one never reached the wire
        tg.cancel_scope.cancel()


async def test_a_sent_publish_without_an_answer_is_outcome_unknown_at_its_deadline() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 0.2)
    wire = Wire()
    wire.hang_reply = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        tg.start_soon(sender, outbox, wire)
        started = anyio.current_time()
        with pytest.raises(PublishOutcomeUnknown):
            await outbox.submit(b"x")
        assert anyio.current_time() - started < 1.0
        tg.cancel_scope.cancel()


async def test_in_flight_publishes_are_settled_by_answers_or_by_a_lost_connection() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    answered: list[Any] = []

    async def confirming_sender() -> None:  # RabbitMQ-like: confirmations arrive later
        while True:
            batch = await outbox.take()
            async with outbox.transmit(batch) as tx:
                for send in tx.sent():
                    answered.append(send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        tg.start_soon(confirming_sender)
        first = outbox.submit(b"1")
        second = outbox.submit(b"2")

        def both_sent() -> None:
            assert len(answered) == 2

        await eventually(both_sent)
        assert outbox.in_flight == 2
        answered[0].resolve("acked")
        assert await first == "acked"
        outbox.fail_in_flight("the channel was closed")
        with pytest.raises(PublishOutcomeUnknown, match="channel was closed"):
            await second
        tg.cancel_scope.cancel()


async def test_a_cancelled_caller_is_skipped_and_others_keep_their_order() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    wire = Wire()
    futures = [outbox.submit(b"%d," % i) for i in range(5)]
    futures[2].cancel()
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.watch)
        tg.start_soon(sender, outbox, wire)
        for i, future in enumerate(futures):
            if i != 2:
                assert await future == "OK"
        tg.cancel_scope.cancel()
    assert b"".join(wire.written) == b"0,1,3,4,"


async def test_closing_settles_everything_and_refuses_new_publishes() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    queued = outbox.submit(b"q")
    outbox.close("broker closed")
    with pytest.raises(BrokerUnavailable, match="broker closed; it was not sent"):
        await queued
    with pytest.raises(BrokerUnavailable, match="not sent"):
        await outbox.submit(b"after")


async def test_a_taken_batch_cancelled_mid_transmit_is_settled_by_the_rule() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    before, after = outbox.submit(b"a"), None
    batch = await outbox.take()
    with anyio.CancelScope() as scope:
        async with outbox.transmit(batch):
            scope.cancel()
            await anyio.sleep(1)
    with pytest.raises(BrokerUnavailable) as info:
        await before
    assert not isinstance(info.value, PublishOutcomeUnknown)
    after = outbox.submit(b"b")
    batch = await outbox.take()
    with anyio.CancelScope() as scope:
        async with outbox.transmit(batch) as tx:
            tx.sent()
            scope.cancel()
            await anyio.sleep(1)
    with pytest.raises(PublishOutcomeUnknown):
        await after


async def test_requeued_publishes_keep_their_place() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    futures = [outbox.submit(b"%d" % i) for i in range(3)]
    batch = await outbox.take(limit=2)
    futures.append(outbox.submit(b"3"))
    outbox.requeue(batch)
    assert [s.item for s in await outbox.take()] == [b"0", b"1", b"2", b"3"]
    for future in futures:
        future.cancel()


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 1.0, jitter=0.2)
    delays = [backoff.next() for _ in range(8)]
    assert 0.08 <= delays[0] <= 0.1
    assert all(0.8 <= d <= 1.0 for d in delays[4:])
    backoff.reset()
    assert backoff.next() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


async def test_keep_connected_restores_after_each_loss_and_tells_the_router() -> None:
    events: list[str] = []
    attempts = 0

    async def connect() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            raise ConnectionRefusedError("connection refused")
        return attempts

    async def restore(conn: int) -> None:
        events.append(f"restore {conn}")

    async def serve(conn: int) -> None:
        await anyio.sleep(0.01)
        if conn >= 3:
            await anyio.sleep_forever()
        raise ConnectionResetError("reset")

    with anyio.move_on_after(2):
        await_task = keep_connected(
            connect,
            serve,
            restore=restore,
            on_restored=lambda: events.append("on_reconnect"),
            backoff=Backoff(0.01, 0.02),
            what="test",
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: await_task)

            def reconnected() -> None:
                assert "restore 3" in events

            await eventually(reconnected)
            tg.cancel_scope.cancel()
    # The first connection is no reconnect; the failed attempt restores nothing.
    assert events == ["restore 1", "restore 3", "on_reconnect"]


async def test_outbox_futures_are_asyncio_futures() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    future = outbox.submit(b"")
    assert isinstance(future, asyncio.Future)
    outbox.close()
    with pytest.raises(BrokerUnavailable):
        await future


async def test_a_batch_handed_over_in_steps_is_sent_step_by_step() -> None:
    """Kafka hands one producer batch per partition, each an ``await``: what a step handed
    over is "outcome unknown" when the deadline strikes, what it did not is "not sent"."""
    outbox: Outbox[bytes] = Outbox("Test", 0.3)
    first, second = outbox.submit(b"p0"), outbox.submit(b"p1")
    batch = await outbox.take()
    async with outbox.transmit(batch) as tx:
        assert tx.sent([batch[0]]) == [batch[0]]  # the first step returned: handed over
        await anyio.sleep_forever()  # the second step never returns
    with pytest.raises(PublishOutcomeUnknown):
        await first
    with pytest.raises(BrokerUnavailable) as info:
        await second
    assert not isinstance(info.value, PublishOutcomeUnknown)


async def test_take_nowait_returns_what_is_queued_without_waiting() -> None:
    outbox: Outbox[bytes] = Outbox("Test", 5)
    assert outbox.take_nowait() == []
    futures = [outbox.submit(b"%d" % i) for i in range(4)]
    futures[0].cancel()
    assert [s.item for s in outbox.take_nowait(limit=2)] == [b"1", b"2"]
    assert [s.item for s in outbox.take_nowait()] == [b"3"]
    assert len(outbox) == 0
    outbox.close()


async def test_keep_connected_with_stable_after_backs_off_from_connections_dropped_at_once() -> (
    None
):
    """A broker that accepts every connection and drops it at once: without ``stable_after``
    every successful connect resets the backoff (a reconnect storm); with it the delay grows."""

    async def attempts(stable_after: float | None) -> int:
        count = 0

        async def connect() -> int:
            nonlocal count
            count += 1
            return count

        async def serve(conn: int) -> None:
            raise ConnectionResetError("reset")

        with anyio.move_on_after(0.5):
            await keep_connected(
                connect, serve, backoff=Backoff(0.02, 10, jitter=0), stable_after=stable_after
            )
        return count

    storm, calm = await attempts(None), await attempts(1.0)
    assert storm >= 10  # 0.02 s apart
    assert calm <= 6  # 0.02, 0.04, 0.08, 0.16, 0.32: the delays add up past 0.5 s


async def test_a_publish_answered_without_effect_moves_to_another_outbox() -> None:
    """A Redis Cluster MOVED/ASK: the broker answered a sent publish without running it. The
    backend releases it from its batch and requeues it on another lane's outbox: the caller
    gets the other lane's answer, the first batch's failure never touches it, and a released
    publish that another lane cannot send is "not sent" (it had no effect)."""
    first: Outbox[bytes] = Outbox("A", 5)
    second: Outbox[bytes] = Outbox("B", 5)
    wire = Wire()
    moved, stays = first.submit(b"moved"), first.submit(b"stays")
    batch = await first.take()
    async with first.transmit(batch) as tx:
        sends = tx.sent()
        for send in sends:  # the backend reads the answers in order, releasing as it goes
            if send.item == b"moved":
                tx.release(send)
                second.requeue([send])
        assert [s.item for s in sends] == [b"moved", b"stays"]
        raise ConnectionResetError("connection reset by peer")  # after the write
    with pytest.raises(PublishOutcomeUnknown):
        await stays
    assert not moved.done()
    async with anyio.create_task_group() as tg:
        tg.start_soon(second.watch)
        tg.start_soon(sender, second, wire)
        assert await moved == "OK"
        tg.cancel_scope.cancel()
    assert wire.written == [b"moved"]
    again = first.submit(b"again")
    batch = await first.take()
    async with first.transmit(batch) as tx:
        [send] = tx.sent()
        tx.release(send)
        second.requeue([send])  # closed meanwhile (its watch was cancelled)
    with pytest.raises(BrokerUnavailable) as info:
        await again
    assert not isinstance(info.value, PublishOutcomeUnknown)
