"""Multi-host AMQP URLs (``amqp://u:p@h1:5672,h2:5673/``) without a cluster: parsing, the
error of a list nobody answers at, and a dead first host skipped for a live one (the system
RabbitMQ on 5672). The cluster tests are in tests/test_rabbitmq_cluster.py."""

from __future__ import annotations

import pytest

from roomrouter import BrokerUnavailable, ConfigurationError, RoomRouter
from roomrouter.brokers.rabbitmq import RabbitMQBroker

from .backends import RabbitMQBackend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import receive_n
from .ports import free_port

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "hosts", ["127.0.0.1:5672,,127.0.0.1:5673", "127.0.0.1:5672,127.0.0.1:x", "127.0.0.1:5672,"]
)
def test_a_bad_host_list_is_a_configuration_error_without_the_password(hosts: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RabbitMQBroker.from_url(f"amqp://guest:s3cret@{hosts}/")
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


async def test_no_host_answering_names_every_host_and_not_the_password() -> None:
    first, second = free_port(), free_port()
    url = f"amqp://guest:s3cret@127.0.0.1:{first},127.0.0.1:{second}/"
    broker = RabbitMQBroker.from_url(url, operation_timeout=2)
    assert "s3cret" not in repr(broker)
    with pytest.raises(BrokerUnavailable) as caught:
        async with RoomRouter(broker, namespace=unique_namespace(), **TEST_ROUTER_OPTIONS):
            pass
    message = str(caught.value)
    assert f"127.0.0.1:{first},127.0.0.1:{second}" in message, message
    assert "connection refused" in message and "s3cret" not in message


async def test_a_dead_first_host_is_skipped_for_the_next() -> None:
    RabbitMQBackend("probe").available()
    dead = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{dead},127.0.0.1:5672/"
    namespace = unique_namespace()
    opts = {**TEST_ROUTER_OPTIONS, **RabbitMQBackend.router_options}
    backend = RabbitMQBackend(namespace)
    try:
        async with (
            RoomRouter(RabbitMQBroker.from_url(url), namespace=namespace, **opts) as a,
            RoomRouter(RabbitMQBroker.from_url(url), namespace=namespace, **opts) as b,
        ):
            member = b.member("m")
            await member.join("room")
            await a.publish("room", b"hello", persist=True)
            assert [e.payload for e in await receive_n(member, 1)] == [b"hello"]
    finally:
        await backend.cleanup()
