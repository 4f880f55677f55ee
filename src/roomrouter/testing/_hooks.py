"""What a :class:`~roomrouter.testing.BrokerContract` subclass may set or override, and how
the suite starts nodes (raw brokers, or routers on them) for one test."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, ClassVar

import anyio
import pytest

from .._router import RoomRouter
from ..brokers import Broker, BrokerContext, broker_from_url
from ._support import Node, Recorder, eventually

__all__ = ["BrokerHooks", "StartRouters"]

#: ``await start(count, **router_options)``: that many routers of the test's namespace.
StartRouters = Callable[..., Awaitable[list[RoomRouter]]]

#: Router options of the suite: no linger, fast heartbeats (a dead node is noticed fast).
ROUTER_OPTIONS: dict[str, Any] = {"linger": 0.0, "heartbeat_interval": 0.2, "node_ttl": 1.5}


class BrokerHooks:
    """The knobs of the broker suite. Only :attr:`broker_url` is required."""

    #: The URL the suite builds every broker from (``broker_from_url``: the registry). One
    #: broker per node, each with its own connections. A property works too.
    broker_url: ClassVar[str]
    #: Keyword options handed to the backend's factory with the URL.
    broker_options: ClassVar[dict[str, Any]] = {}
    #: Router options on top of the suite's (e.g. ``discovery_window`` for a broker that
    #: cannot count who heard a broadcast).
    router_options: ClassVar[dict[str, Any]] = {}
    #: Seconds any one frame may take to arrive before the suite calls it lost.
    delivery_timeout: ClassVar[float] = 10.0
    #: Seconds of silence after which "nothing more arrives" is believed.
    settle: ClassVar[float] = 0.3

    @pytest.fixture
    def anyio_backend(self) -> str:
        """The suite's tests run on asyncio (override for trio if the backend runs on it)."""
        return "asyncio"

    @pytest.fixture(autouse=True)
    def _contract_available(self) -> None:
        self.available()

    def available(self) -> None:
        """Skip (``pytest.skip``) or fail here if the backend's server is not reachable."""

    def make_broker(self) -> Broker:
        """A fresh, unstarted broker for one node."""
        return broker_from_url(self.broker_url, **self.broker_options)

    def new_namespace(self) -> str:
        """A namespace no other test uses (every test runs in its own)."""
        return "c" + uuid.uuid4().hex[:12]

    async def cleanup(self, namespace: str) -> None:
        """Remove what a test left on the server in ``namespace`` (durable queues, topics)."""

    async def break_connection(self, broker: Broker) -> None:
        """Cut ``broker``'s connections to the server as a network failure would (the
        reconnect test); the suite skips that test while this raises NotImplementedError."""
        raise NotImplementedError

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        """Assert each node is subscribed *at the broker* to exactly its rooms with members
        (guarantees 1 and 2). By default: :meth:`Broker.broker_subscriptions`, given time for
        unsubscribes in flight; nothing is checked where the broker cannot say."""

        async def check() -> None:
            for router in routers:
                try:
                    held = await router.broker.broker_subscriptions()
                except NotImplementedError:
                    return
                assert held == router.local_rooms, (router, held ^ router.local_rooms)

        await eventually(check, timeout=self.delivery_timeout)

    # -- how the suite starts nodes --------------------------------------------------------------

    @asynccontextmanager
    async def brokers(self, count: int) -> AsyncIterator[list[Node]]:
        """``count`` started brokers of one fresh namespace, each recording what it hears."""
        namespace = self.new_namespace()
        nodes: list[Node] = []
        try:
            async with anyio.create_task_group() as tg:
                try:
                    for _ in range(count):
                        node = Node(secrets.token_hex(6), self.make_broker(), Recorder())
                        context = BrokerContext(
                            node_id=node.node_id,
                            namespace=namespace,
                            on_data=node.received.on_data,
                            on_control=node.received.on_control,
                            on_reconnect=node.received.on_reconnect,
                            task_group=tg,
                            on_direct=node.received.on_direct,
                        )
                        with anyio.fail_after(self.delivery_timeout):
                            await node.broker.start(context)
                        nodes.append(node)
                    yield nodes
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                        for node in nodes:
                            await node.broker.aclose()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self.cleanup(namespace)

    @asynccontextmanager
    async def cluster(self) -> AsyncIterator[StartRouters]:
        """``async with self.cluster() as start: a, b = await start(2)``: routers of one fresh
        namespace, each on a broker of its own, closed when the block ends."""
        namespace = self.new_namespace()
        try:
            async with AsyncExitStack() as stack:

                async def start(count: int = 3, **options: Any) -> list[RoomRouter]:
                    opts = {**ROUTER_OPTIONS, **self.router_options, **options}
                    routers = []
                    for _ in range(count):
                        router = RoomRouter(self.make_broker(), namespace=namespace, **opts)
                        routers.append(await stack.enter_async_context(router))
                    return routers

                yield start
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self.cleanup(namespace)
