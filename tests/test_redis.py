"""Redis-specific behaviour: reconnect after CLIENT KILL and after a server restart, errors when
Redis is gone, URL options."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from roomrouter import BrokerUnavailable, ConfigurationError, PublishOutcomeUnknown, RoomRouter
from roomrouter.brokers.redis import RedisBroker, key_prefix, store_key

from .backends import require_tcp
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually, receive_n

pytestmark = pytest.mark.anyio


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    require_tcp("127.0.0.1", 6379, "Redis")
    client = Redis(host="127.0.0.1", port=6379)
    try:
        yield client
    finally:
        await client.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free port, so it can be stopped and restarted."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                import time

                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def _router(port: int = 6379, namespace: str | None = None, **options: object) -> RoomRouter:
    opts = {**TEST_ROUTER_OPTIONS, **options}
    broker = RedisBroker(host="127.0.0.1", port=port, max_backoff=0.5, operation_timeout=2)
    return RoomRouter(broker, namespace=namespace or unique_namespace(), **opts)  # type: ignore[arg-type]


async def _kill_clients(redis: Redis, name: str) -> int:
    killed = 0
    for client in await redis.client_list():
        if client.get("name") == name:
            await redis.execute_command("CLIENT", "KILL", "ID", client["id"])
            killed += 1
    return killed


async def test_client_kill_is_survived_and_rooms_are_resubscribed(redis: Redis) -> None:
    ns = unique_namespace()
    async with _router(namespace=ns) as a, _router(namespace=ns) as b:
        member = a.member("m")
        for room in ("r1", "r2", "r3"):
            await member.join(room)
        assert isinstance(a.broker, RedisBroker)
        killed = await _kill_clients(redis, a.broker.client_name("sub"))
        killed += await _kill_clients(redis, a.broker.client_name("pub"))
        assert killed == 2
        await eventually(lambda: _assert(a.stats()["reconnects"] >= 1), timeout=5)
        assert await a.broker.server_subscription_count() == 3
        # Delivery resumes both ways: b -> a through the restored subscriptions, and a's
        # publisher connection comes back on its own.
        await eventually(lambda: _assert(b.remote_hosts("r2") == {a.node_id}))
        await b.publish("r2", b"after the kill")
        [got] = await receive_n(member, 1)
        assert got.payload == b"after the kill"
        other = b.member("o")
        await other.join("r9")
        await a.publish("r9", b"from a")
        [got] = await receive_n(other, 1)
        assert got.payload == b"from a"
        assert a.stats()["task_restarts"] == 0


async def test_server_restart_is_survived(private_redis: PrivateRedis) -> None:
    ns = unique_namespace()
    async with _router(private_redis.port, ns) as a, _router(private_redis.port, ns) as b:
        ma = a.member("ma")
        await ma.join("room")
        private_redis.stop()
        # While Redis is down: publishes to a remote host fail fast with our own error, and
        # joins that need the broker fail and roll back.
        with anyio.fail_after(5):
            with pytest.raises(BrokerUnavailable):
                await b.publish("room", b"lost")
            with pytest.raises(BrokerUnavailable):
                await b.member("mb").join("needs-broker")
        assert "needs-broker" not in b.subscribed_rooms
        private_redis.start()
        await eventually(lambda: _assert(a.stats()["reconnects"] >= 1), timeout=10)
        await eventually(lambda: _assert(b.remote_hosts("room") == {a.node_id}), timeout=5)
        with anyio.fail_after(5):
            while True:  # b's publisher reconnects on the next publish
                try:
                    await b.publish("room", b"back")
                    break
                except BrokerUnavailable:
                    await anyio.sleep(0.1)
        [got] = await receive_n(ma, 1)
        assert got.payload == b"back"


async def test_start_fails_cleanly_when_redis_is_unreachable() -> None:
    broker = RedisBroker(host="127.0.0.1", port=_free_port(), operation_timeout=1)
    with anyio.fail_after(5), pytest.raises(BrokerUnavailable):
        async with RoomRouter(broker, namespace="x"):
            pass


async def test_url_options() -> None:
    broker = RedisBroker.from_url("redis://127.0.0.1:6379/3?sharded=1&operation_timeout=2.5")
    assert broker.sharded and broker.operation_timeout == 2.5
    assert not RedisBroker.from_url("redis://localhost").sharded
    with pytest.raises(ConfigurationError):
        RedisBroker.from_url("redis://h/0?operation_timeout=soon")
    router = RoomRouter.from_url("redis://127.0.0.1:6379/0", namespace="n")
    assert router.broker.name == "redis"


async def test_a_transaction_that_ran_with_an_error_is_outcome_unknown(redis: Redis) -> None:
    """A persisted publish is one MULTI (storage stream, recent cache, publish): when Redis runs
    it and one command fails (the room's cache key holds a string), the others are not undone
    (the frame is in the storage stream), so the publish may not say "not sent"."""
    async with _router() as router:
        await redis.set(key_prefix(router.namespace) + b"recent:R", b"not a stream")
        with pytest.raises(PublishOutcomeUnknown, match="WRONGTYPE"):
            await router.publish("R", b"x", persist=True)
        assert await redis.xlen(store_key(router.namespace)) == 1
        await router.publish("S", b"y", persist=True)  # the connection is fine
        await redis.delete(key_prefix(router.namespace) + b"recent:R")


def test_brokers_are_made_outside_an_event_loop() -> None:
    """The CLI and `RoomRouter.from_url` make brokers before any loop runs (an anyio object
    made in the constructor once broke that)."""
    from roomrouter.brokers.redis_cluster import RedisClusterBroker

    assert RedisBroker.from_url("redis://127.0.0.1:6379/0").name == "redis"
    assert RedisClusterBroker.from_url("redis://127.0.0.1:7000/0?cluster=1").name == "redis-cluster"


def _assert(condition: bool) -> None:
    assert condition


async def test_names_of_a_namespace_share_one_cluster_slot(redis: Redis) -> None:
    # Redis Cluster needs every key of one MULTI in one slot: the namespace is the hash tag,
    # and braces or colons in it must neither end the tag early nor reach another namespace.
    ns = unique_namespace() + ":{x}}:"
    tag = key_prefix(ns)[len(b"rr:{") : -len(b"}:")]
    assert b"{" not in tag and b"}" not in tag and b":" not in tag
    async with _router(namespace=ns) as a, _router(namespace=ns) as b:
        await b.member("m").join("room:{y}")
        await eventually(lambda: _assert(a.remote_hosts("room:{y}") == {b.node_id}))
        await a.publish("room:{y}", b"kept", persist=True)
        keys = [k async for k in redis.scan_iter(match=_glob(key_prefix(ns)) + b"*")]
        channels = await redis.pubsub_channels(_glob(key_prefix(ns)) + b"*")
        assert sorted(keys) == sorted([store_key(ns), key_prefix(ns) + b"recent:room:{y}"])
        assert key_prefix(ns) + b"r:room:{y}" in channels and len(channels) >= 3
        assert {key_slot(name) for name in keys + channels} == {key_slot(tag)}
        await redis.delete(*keys)


def _glob(value: bytes) -> bytes:
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", value)
