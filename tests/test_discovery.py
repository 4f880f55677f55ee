"""A starting node counts the answers of *nodes*: on Redis, PUBLISH counts every subscriber of
the control channel, and one that is no node (a monitor, ``redis-cli SUBSCRIBE``) never
answers. Starting must not wait for it when the nodes that exist have answered, and when it
does wait (nobody answered), it says so and counts it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from roomrouter import RoomRouter
from roomrouter.brokers.redis import RedisBroker

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace

pytestmark = pytest.mark.anyio


@pytest.fixture
async def redis_backend() -> AsyncIterator[Backend]:
    backend = BACKENDS["redis"](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


def _router(backend: Backend, **options: object) -> RoomRouter:
    opts = {**TEST_ROUTER_OPTIONS, "node_ttl": 4.0, **options}
    return RoomRouter(backend.broker(), namespace=backend.namespace, **opts)


async def _control_channel(backend: Backend) -> bytes:
    async with _router(backend) as probe:
        broker = probe.broker
        assert isinstance(broker, RedisBroker)
        return broker._control


async def test_a_monitor_on_the_control_channel_does_not_slow_starts(
    redis_backend: Backend,
) -> None:
    from redis.asyncio import Redis

    channel = await _control_channel(redis_backend)
    monitor = Redis(host="127.0.0.1", port=6379).pubsub()
    await monitor.subscribe(channel)
    try:
        async with _router(redis_backend) as first:
            started = anyio.current_time()
            async with _router(redis_backend) as second:
                took = anyio.current_time() - started
                assert took < 2.0, f"start waited {took:.1f}s for a subscriber that is no node"
                assert second.stats()["discovery_timeouts"] == 0
                assert first.node_id in second.live_nodes()
                member = first.member()
                await member.join("room")
                assert second.remote_hosts("room") == {first.node_id}
    finally:
        await monitor.aclose()


async def test_a_start_nobody_answers_is_logged_and_counted(
    redis_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    from redis.asyncio import Redis

    channel = await _control_channel(redis_backend)
    monitor = Redis(host="127.0.0.1", port=6379).pubsub()
    await monitor.subscribe(channel)
    try:
        with caplog.at_level(logging.WARNING, logger="roomrouter.cluster"):
            async with _router(redis_backend, node_ttl=1.0) as alone:
                assert alone.stats()["discovery_timeouts"] == 1
        assert "did not answer" in caplog.text and "monitor" in caplog.text
    finally:
        await monitor.aclose()
