"""The control plane against forged frames (issue 19, case 8): whoever can publish on a
namespace's control channel could make a node drop a live peer (``Bye``: its next publish
bypassed the broker and was lost) or wait for a node that does not exist (``Hello('ghost')``:
the next first join waited for the TTL). Without a secret both are made harmless where they
can be: a Bye keeps the node's rooms until it is silent, and a node that never heartbeats holds
no barrier past the suspect interval. With ``control_secret`` every frame is signed (HMAC)
and a forged one is dropped and counted."""

from __future__ import annotations

import anyio
import pytest

from roomrouter import ConfigurationError, RoomRouter
from roomrouter._cluster import Bye, Hello, Host, _encoder
from roomrouter._urls import pop_router_options, redact

from .conftest import ClusterFactory
from .helpers import eventually, receive_n

pytestmark = pytest.mark.anyio

SECRETS = [pytest.param(None, id="no-secret"), pytest.param("s3cret", id="secret")]


def _assert(condition: object) -> None:
    assert condition


async def _forge(router: RoomRouter, frame: bytes) -> None:
    """Straight onto the control channel, unsigned, as a raw client of the broker would."""
    await router.broker.publish_control(frame)


async def _heard(router: RoomRouter, secret: str | None, check: object) -> None:
    """Wait until ``router`` processed the forged frame: dropped (secret) or applied."""
    if secret is not None:
        await eventually(lambda: _assert(router.stats()["dropped_control_auth"] >= 1))
    else:
        await eventually(check)  # type: ignore[arg-type]


@pytest.mark.parametrize("secret", SECRETS)
async def test_a_forged_bye_loses_no_message(cluster: ClusterFactory, secret: str | None) -> None:
    a, b = await cluster(2, control_secret=secret)
    member = b.member("m")
    await member.join("R")
    assert a.remote_hosts("R") == {b.node_id}
    await _forge(a, _encoder.encode(Bye(b.node_id)))
    await _heard(a, secret, lambda: _assert(b.node_id not in a.live_nodes()))
    sent = await a.publish("R", b"after the forged bye")
    [got] = await receive_n(member, 1, timeout=5)
    assert got.id == sent.id
    # b keeps heartbeating: it is a live node again, with its rooms.
    await eventually(lambda: _assert(b.node_id in a.live_nodes()), timeout=5)
    await eventually(lambda: _assert(a.remote_hosts("R") == {b.node_id}), timeout=5)
    if secret is not None:
        assert a.stats()["dropped_control_auth"] >= 1
        assert b.stats()["dropped_control_auth"] >= 1


@pytest.mark.parametrize("secret", SECRETS)
async def test_a_forged_hello_of_a_ghost_holds_no_join(
    cluster: ClusterFactory, secret: str | None
) -> None:
    # A TTL far above the suspect interval (0.6 s): a ghost used to hold every join for it.
    a, b = await cluster(2, node_ttl=4.0, control_secret=secret)
    await _forge(a, _encoder.encode(Hello("ghost", 0, [])))
    await _heard(a, secret, lambda: _assert("ghost" in a.live_nodes()))
    took: list[float] = []

    async def join(router: RoomRouter, room: str) -> None:
        started = anyio.current_time()
        await router.member().join(room)
        took.append(anyio.current_time() - started)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(join, (a, b)[i % 2], f"room-{i}")
    assert max(took) < 1.5, f"a join waited {max(took):.2f}s for a node that never heartbeats"
    if secret is not None:
        assert "ghost" not in a.live_nodes() and "ghost" not in b.live_nodes()
    await eventually(lambda: _assert("ghost" not in a.live_nodes()), timeout=6)


@pytest.mark.parametrize("secret", SECRETS)
async def test_a_forged_host_costs_no_message(cluster: ClusterFactory, secret: str | None) -> None:
    a, b = await cluster(2, control_secret=secret)
    member = b.member("m")
    await member.join("R")
    await _forge(a, _encoder.encode(Host("ghost", 1, ["R", "elsewhere"], 99)))
    await _heard(a, secret, lambda: _assert("ghost" in a.remote_hosts("elsewhere")))
    if secret is not None:
        assert a.remote_hosts("elsewhere") == frozenset()
    started = anyio.current_time()
    await a.member().join("fresh")
    assert anyio.current_time() - started < 1.0
    sent = [await a.publish("R", f"{i}".encode()) for i in range(3)]
    got = await receive_n(member, 3, timeout=5)
    assert [e.id for e in got] == [e.id for e in sent]


async def test_nodes_with_another_secret_do_not_see_each_other(cluster: ClusterFactory) -> None:
    a, b = await cluster(2, control_secret=b"one")
    await eventually(lambda: _assert(b.node_id in a.live_nodes()))
    [c] = await cluster(1, control_secret="two", node_ttl=1.0)
    await anyio.sleep(0.5)  # several heartbeats of each
    assert c.node_id not in a.live_nodes() and a.node_id not in c.live_nodes()
    assert a.stats()["dropped_control_auth"] >= 1 and c.stats()["dropped_control_auth"] >= 1


async def test_control_secret_url_option_is_the_routers_and_never_shown() -> None:
    url = "redis://:pw@127.0.0.1:6379/0?operation_timeout=2&control_secret=s3cret"
    rest, found = pop_router_options(url)
    assert found == {"control_secret": "s3cret"}
    assert rest == "redis://:pw@127.0.0.1:6379/0?operation_timeout=2"
    assert "s3cret" not in redact(url) and "pw" not in redact(url)
    plain = "redis://127.0.0.1:6379/0?operation_timeout=2&x=%2F"
    assert pop_router_options(plain) == (plain, {})  # untouched: not re-encoded
    from roomrouter._urls import broker_from_url

    # The same URL serves a storage worker, whose broker has no such option.
    assert broker_from_url("memory://secret-url?control_secret=s3cret").name == "memory"
    router = RoomRouter.from_url("memory://secret-url?control_secret=s3cret")
    assert router._cluster._secret == b"s3cret"
    assert "s3cret" not in repr(router)
    with pytest.raises(ConfigurationError):
        RoomRouter.from_url("memory://secret-url?control_secret=a", control_secret="b")
    with pytest.raises(ConfigurationError):
        RoomRouter.from_url("memory://secret-url", control_secret="")
    with pytest.raises(ConfigurationError):
        RoomRouter.from_url("memory://x", heartbeat_interval=1.0, suspect_interval=0.5)
    with pytest.raises(ConfigurationError):
        RoomRouter.from_url("memory://x", node_ttl=5.0, suspect_interval=6.0)
