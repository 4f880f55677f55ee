"""Routers opened and closed in any order, from any task, inside framework lifespans."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from roomrouter import BrokerUnavailable, RoomRouter, RouterNotRunning

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually, receive_n

pytestmark = pytest.mark.anyio


def _router(backend: Backend, **options: Any) -> RoomRouter:
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options, **options}
    return RoomRouter(backend.broker(), namespace=backend.namespace, **opts)


async def _talk(sender: RoomRouter, receiver: RoomRouter, room: str) -> None:
    member = receiver.member()
    await member.join(room)
    sent = await sender.publish(room, b"hi")
    [got] = await receive_n(member, 1, timeout=5)
    assert got.id == sent.id
    await member.close()


async def test_routers_close_in_the_order_they_opened(backend: Backend) -> None:
    r1, r2 = _router(backend), _router(backend)
    await r1.__aenter__()
    await r2.__aenter__()
    await eventually(lambda: _assert(r1.node_id in r2.live_nodes()), timeout=5)
    await _talk(r1, r2, "fifo")
    await r1.__aexit__(None, None, None)  # first in, first out: not the reverse
    await anyio.lowlevel.checkpoint()  # the calling task is not left cancelled
    await eventually(lambda: _assert(r1.node_id not in r2.live_nodes()), timeout=5)
    member = r2.member()
    await member.join("after")  # r2 still works
    await r2.__aexit__(None, None, None)
    with pytest.raises(RouterNotRunning):
        r2.member()


async def test_router_closed_from_another_task(backend: Backend) -> None:
    router = _router(backend)
    await router.start()
    member = router.member("m")
    await member.join("room")
    closed = anyio.Event()

    async def closer() -> None:
        await router.aclose()
        closed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(closer)
        with anyio.fail_after(10):
            await closed.wait()
    assert member.closed
    with pytest.raises(RouterNotRunning):
        await router.publish("room", b"x")
    await router.aclose()  # idempotent


async def test_router_opened_in_one_task_and_used_and_closed_in_others(backend: Backend) -> None:
    router = _router(backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.start)
    # The task that started it has ended; the router runs on.
    other = _router(backend)
    async with other:
        await eventually(lambda: _assert(router.node_id in other.live_nodes()), timeout=5)
        await _talk(other, router, "room")
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.aclose)
        await eventually(lambda: _assert(router.node_id not in other.live_nodes()), timeout=5)


async def test_start_and_aclose_hooks(backend: Backend) -> None:
    router = _router(backend)
    with pytest.raises(RouterNotRunning):
        router.member()
    await router.start()
    with pytest.raises(RuntimeError, match="already started"):
        await router.start()
    await _talk(router, router, "self")
    await router.aclose()
    with pytest.raises(RouterNotRunning):
        router.member()


async def test_close_fails_joins_in_flight_instead_of_hanging(backend: Backend) -> None:
    from .faulty import ControlFault

    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    slow = RoomRouter(  # its Acks come late
        ControlFault(backend.broker(), delay=3.0), namespace=backend.namespace, **opts
    )
    fast = _router(backend, barrier_timeout=10)
    await slow.start()
    await fast.start()
    try:
        await eventually(lambda: _assert(slow.node_id in fast.live_nodes()), timeout=10)
        member = fast.member()
        errors: list[BaseException] = []

        async def join() -> None:
            try:
                await member.join("room")
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(join)
            await eventually(lambda: _assert("room" in fast.subscribed_rooms), interval=0.005)
            with anyio.fail_after(5):
                await fast.aclose()
        assert len(errors) == 1 and isinstance(errors[0], RouterNotRunning | BrokerUnavailable)
    finally:
        await fast.aclose()
        await slow.aclose()


async def test_failed_start_leaves_nothing_running() -> None:
    router = RoomRouter.from_url("redis://127.0.0.1:1/0?operation_timeout=0.5", namespace="x")
    with pytest.raises(BrokerUnavailable):
        await router.start()
    with pytest.raises(RouterNotRunning):
        router.member()
    await router.aclose()  # harmless


async def test_starlette_lifespan(backend: Backend) -> None:
    """The router lives in a Starlette lifespan; the ASGI lifespan protocol drives it as a
    server (uvicorn) would, with startup and shutdown in the server's lifespan task."""
    from starlette.applications import Starlette

    router = _router(backend)
    seen: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        seen.append(router.stats()["live_nodes"] >= 0)
        yield
        await router.aclose()

    app = Starlette(lifespan=lifespan)
    to_app_send, to_app_recv = anyio.create_memory_object_stream[dict[str, Any]](10)
    from_app_send, from_app_recv = anyio.create_memory_object_stream[dict[str, Any]](10)

    async def server_lifespan() -> None:
        async def receive() -> dict[str, Any]:
            return await to_app_recv.receive()

        async def send(message: dict[str, Any]) -> None:
            await from_app_send.send(message)

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    async with anyio.create_task_group() as tg, to_app_send, from_app_recv:
        tg.start_soon(server_lifespan)
        await to_app_send.send({"type": "lifespan.startup"})
        with anyio.fail_after(20):
            assert (await from_app_recv.receive())["type"] == "lifespan.startup.complete"
        # The request side (another task) uses the router the lifespan started.
        await _talk(router, router, "lifespan")
        await to_app_send.send({"type": "lifespan.shutdown"})
        with anyio.fail_after(20):
            assert (await from_app_recv.receive())["type"] == "lifespan.shutdown.complete"
    assert seen == [True]
    with pytest.raises(RouterNotRunning):
        router.member()
    to_app_recv.close()
    from_app_send.close()


def _assert(condition: object) -> None:
    assert condition


async def test_a_broker_task_that_fails_is_restarted_and_the_router_runs_on() -> None:
    """A backend's background task that raises, or that ends with a CancelledError nobody
    asked for (aiormq and aiokafka raise those when a connection closes under a pending call),
    is logged, counted and restarted: the router neither stops nor cancels its caller."""
    import asyncio

    from roomrouter.brokers.memory import MemoryBroker

    runs: list[str] = []

    class Flaky(MemoryBroker):
        async def start(self, context: Any) -> None:
            await super().start(context)
            context.task_group.start_soon(self._flaky, name="flaky")

        async def _flaky(self) -> None:
            runs.append("run")
            if len(runs) == 1:
                raise RuntimeError("a bug in a backend task")
            if len(runs) == 2:
                raise asyncio.CancelledError  # not a cancellation of this task
            await anyio.sleep_forever()

    backend = BACKENDS["memory"](unique_namespace())
    router = RoomRouter(Flaky(f"test-{backend.namespace}"), namespace=backend.namespace,
                        **TEST_ROUTER_OPTIONS)  # fmt: skip
    async with router:
        await eventually(lambda: _assert(len(runs) == 3), timeout=5)
        assert router.stats()["task_restarts"] == 2
        await _talk(router, router, "still-running")
    assert router.stats()["task_restarts"] == 2  # closing cancelled it for real: no restart
