"""The backend registry (entry-point groups ``roomrouter.brokers`` and ``roomrouter.sinks``,
name = URL scheme): the built-in backends are registered like any other, an unknown scheme
lists the installed ones, a missing extra is named, there is no import cycle, and a third-party
package found only through its entry points works by URL in ``RoomRouter.from_url``,
``roomrouter inspect`` and ``roomrouter worker``'s sink, and passes the shipped suites."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from roomrouter import ConfigurationError, MissingDependency, RoomRouter
from roomrouter._registry import BROKER_GROUP, SINK_GROUP, installed_schemes
from roomrouter.brokers import Broker, broker_from_url
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.storage import Sink, SQLiteSink, sink_from_url

from .helpers import receive_n

pytest_plugins = ["pytester"]

ROOMROUTER_CLI = Path(sys.executable).parent / "roomrouter"


def test_the_built_in_backends_are_entry_points() -> None:
    from importlib.metadata import entry_points

    brokers = {ep.name: ep.value for ep in entry_points(group=BROKER_GROUP)}
    assert {"memory", "redis", "rediss", "amqp", "amqps", "kafka"} <= set(brokers)
    assert all(value.startswith("roomrouter.") for value in brokers.values())
    sinks = {ep.name for ep in entry_points(group=SINK_GROUP)}
    assert {"sqlite", "postgresql", "postgres", "mysql", "mariadb"} <= sinks


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://x", "MemoryBroker"),
        ("MEMORY://x", "MemoryBroker"),
        ("redis://127.0.0.1:6379/0", "RedisBroker"),
        ("rediss://127.0.0.1:6379/0", "RedisBroker"),
        ("redis://127.0.0.1:7000/0?cluster=1", "RedisClusterBroker"),
        ("amqp://guest:guest@127.0.0.1/", "RabbitMQBroker"),
        ("kafka://127.0.0.1:9092", "KafkaBroker"),
    ],
)
def test_each_built_in_scheme_resolves(url: str, kind: str) -> None:
    broker = broker_from_url(url)
    assert isinstance(broker, Broker) and type(broker).__name__ == kind


def test_options_reach_the_factory() -> None:
    broker = broker_from_url("memory://opts?recent_size=7", redelivery_after=3.0)
    assert isinstance(broker, MemoryBroker)
    assert (broker.recent_size, broker.redelivery_after) == (7, 3.0)
    sink = sink_from_url("sqlite://:memory:", table_prefix="other")
    assert isinstance(sink, SQLiteSink) and sink.table_prefix == "other"


def test_an_unknown_scheme_lists_the_installed_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url("nope://user:hunter2@host/")
    message = str(info.value)
    assert "hunter2" not in message and "'nope'" in message
    for scheme in installed_schemes(BROKER_GROUP):
        assert f"{scheme}://" in message
    with pytest.raises(ConfigurationError, match=r"sqlite://.*roomrouter\.sinks"):
        sink_from_url("nope:///x.db")
    with pytest.raises(ConfigurationError, match="unknown broker URL scheme"):
        RoomRouter.from_url("nope://x")


@pytest.mark.parametrize(
    ("url", "module", "extra", "backend"),
    [
        ("redis://h/0", "redis", "redis", "roomrouter.brokers.redis"),
        ("kafka://h:1", "aiokafka", "kafka", "roomrouter.brokers.kafka"),
        ("amqp://h/", "aiormq", "rabbitmq", "roomrouter.brokers.rabbitmq"),
        ("amqp://h/", "aiohttp", "rabbitmq", "roomrouter.brokers.rabbitmq"),
        ("nats://h:1", "nats", "nats", "roomrouter.brokers.nats"),
    ],
)
def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str, backend: str
) -> None:
    # `import <module>` (and of its submodules) fails; the backend is imported afresh.
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    keep = {"roomrouter.brokers", "roomrouter.brokers._base", "roomrouter.brokers.memory"}
    for name in [n for n in sys.modules if n.startswith("roomrouter.brokers.")]:
        if name not in keep:
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependency, match=rf'pip install "roomrouter\[{extra}\]"') as info:
        broker_from_url(url)
    assert info.value.module == module  # the package that is missing, not a guess


def test_no_import_cycle_and_only_the_chosen_backend_is_imported() -> None:
    # A backend module imported first (it imports the URL helpers, which import no backend),
    # and resolving one scheme imports that backend only.
    code = textwrap.dedent(
        """
        import sys
        import roomrouter.brokers.memory
        import roomrouter._urls, roomrouter.urls
        backends = ("redis", "redis_cluster", "rabbitmq", "kafka")
        loaded = [b for b in backends if "roomrouter.brokers." + b in sys.modules]
        assert not loaded, loaded
        from roomrouter.brokers import broker_from_url
        broker_from_url("kafka://127.0.0.1:9092")
        loaded = [b for b in backends if "roomrouter.brokers." + b in sys.modules]
        assert loaded == ["kafka"], loaded
        """
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)


# -- a third-party backend, known only by its entry points ---------------------------------------

ECHO_PACKAGE = '''
"""A third party's backends, written against roomrouter's public modules only: echo://
brokers wrap the memory broker (nodes of one process), echo:// sinks wrap SQLite."""

from urllib.parse import urlsplit

from roomrouter.brokers import Broker
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.storage import Sink, sink_from_url
from roomrouter.urls import flag, pop_options, redact

made = []


class EchoBroker(Broker):
    name = "echo"

    def __init__(self, hub, *, loud=False):
        self.inner = MemoryBroker(hub)
        self.loud = loud

    def __repr__(self):
        return f"<EchoBroker {self.inner.hub.name}>"

    async def start(self, context):
        await self.inner.start(context)

    async def aclose(self):
        await self.inner.aclose()

    async def subscribe(self, rooms):
        await self.inner.subscribe(rooms)

    async def unsubscribe(self, rooms):
        await self.inner.unsubscribe(rooms)

    async def publish(self, room, frame, *, to=None):
        await self.inner.publish(room, frame)

    async def publish_control(self, frame, *, to=None):
        return await self.inner.publish_control(frame, to=to)

    async def broker_subscriptions(self):
        return await self.inner.broker_subscriptions()


def broker(url, **options):
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if p)
    found = pop_options(url, query, [("loud", flag)])
    if query:
        raise ValueError(f"unknown options {sorted(query)} in {redact(url)}")
    made.append(url)
    return EchoBroker("echo-" + parts.netloc + parts.path, **{**found, **options})


class EchoSink(Sink):
    name = "echo"

    def __init__(self, inner):
        self.inner = inner

    async def start(self):
        await self.inner.start()

    async def aclose(self):
        await self.inner.aclose()

    async def write(self, envelopes):
        return await self.inner.write(envelopes)

    async def history(self, room, *, before=None, after=None, limit=50):
        return await self.inner.history(room, before=before, after=after, limit=limit)

    async def count(self, room=None):
        return await self.inner.count(room)

    async def latest_id(self, room):
        return await self.inner.latest_id(room)


def sink(url, **options):
    return EchoSink(sink_from_url("sqlite://" + url.partition("://")[2], **options))
'''

ECHO_ENTRY_POINTS = """
[roomrouter.brokers]
echo = echo_backend:broker

[roomrouter.sinks]
echo = echo_backend:sink
"""


def make_echo_package(where: Path) -> Path:
    """``echo_backend`` and its ``.dist-info`` (what pip would install) under ``where``."""
    (where / "echo_backend").mkdir(parents=True)
    (where / "echo_backend" / "__init__.py").write_text(ECHO_PACKAGE)
    info = where / "echo_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ECHO_ENTRY_POINTS)
    return where


@pytest.fixture
def echo_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = make_echo_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(path))
    yield path
    sys.modules.pop("echo_backend", None)


@pytest.mark.anyio
async def test_a_third_party_scheme_works_in_from_url(echo_path: Path) -> None:
    assert "echo" in installed_schemes(BROKER_GROUP)
    assert "echo" in installed_schemes(SINK_GROUP)
    async with (
        RoomRouter.from_url("echo://hub-1?loud=1", namespace="ns") as a,
        RoomRouter.from_url("echo://hub-1", namespace="ns") as b,
    ):
        assert type(a.broker).__name__ == "EchoBroker" and a.broker.loud is True  # type: ignore[attr-defined]
        member = b.member("m")
        await member.join("room")
        sent = await a.publish("room", b"through echo://")
        [got] = await receive_n(member, 1)
        assert got.id == sent.id

        # roomrouter inspect's own code, in this process (the echo hub lives here).
        from roomrouter.cli import _inspect

        report = await _inspect("echo://hub-1", "ns", None, 0.5)
        assert {n["id"] for n in report["nodes"]} == {a.node_id, b.node_id}
        assert report["rooms"] == [{"room": "room", "hosts": [b.node_id], "presence": None}]
    import echo_backend  # type: ignore[import-not-found]

    assert echo_backend.made[:2] == ["echo://hub-1?loud=1", "echo://hub-1"]


def test_a_third_party_scheme_works_in_the_cli(echo_path: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(echo_path), "PATH": str(ROOMROUTER_CLI.parent)}
    # A fresh process finds the scheme through the distribution's entry points.
    done = subprocess.run(
        [str(ROOMROUTER_CLI), "inspect", "--broker", "echo://cli", "--namespace", "ns",
         "--wait", "0.2", "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["broker"] == "echo://cli" and report["nodes"] == []
    # An unknown scheme is one line that lists the installed ones, echo:// among them.
    done = subprocess.run(
        [str(ROOMROUTER_CLI), "inspect", "--broker", "nope://x", "--namespace", "ns"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "unknown broker URL scheme 'nope'" in line and "echo://" in line, line


@pytest.mark.anyio
async def test_a_third_party_sink_works_by_url(echo_path: Path, tmp_path: Path) -> None:
    from roomrouter import Envelope

    sink = sink_from_url(f"echo:///{tmp_path}/echo.db")
    assert isinstance(sink, Sink) and sink.name == "echo"
    async with sink:
        envelope = Envelope(id="0001", room="r", origin="n", ts=0.0, payload=b"p")
        assert await sink.write([envelope]) == 1
        assert [e.id for e in await sink.history("r")] == ["0001"]


def test_a_third_party_package_passes_the_shipped_suites(pytester: pytest.Pytester) -> None:
    make_echo_package(pytester.path)
    pytester.makepyfile(
        test_echo_contract=f"""
        from roomrouter.testing import BrokerContract, SinkContract


        class TestEchoBroker(BrokerContract):
            broker_url = "echo://contract"


        class TestEchoSink(SinkContract):
            sink_url = "echo:///{pytester.path}/contract.db"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    # Everything but the reconnect tests (no hook can cut an in-process hub) and the dead
    # letters (the echo sink keeps none) passes.
    assert outcomes.get("skipped") == 3, result.stdout.str()
    assert outcomes["passed"] >= 50, outcomes


# -- the public URL helpers (roomrouter.urls) ------------------------------------------------------


def test_url_helpers() -> None:
    from roomrouter import urls

    assert (
        urls.redact("redis://u:hunter2@h:1/0?password=x&a=1")
        == "redis://u:***@h:1/0?password=***&a=1"
    )
    assert urls.redact("not a url") == "not a url"
    assert urls.url_scheme("AMQP://h/") == "amqp" and urls.url_scheme("nothing") == ""
    assert [urls.flag(v) for v in ("1", "TRUE", " yes", "on", "0", "no", "")] == [True] * 4 + [
        False
    ] * 3
    query = {"n": "3", "x": "keep"}
    assert urls.pop_options("s://h", query, [("n", int), ("absent", int)]) == {"n": 3}
    assert query == {"x": "keep"}
    with pytest.raises(ConfigurationError, match=r"bad n in 's://u:\*\*\*@h'"):
        urls.pop_options("s://u:pw@h", {"n": "three"}, [("n", int)])
    assert urls.parse_hosts("a:1, b ,[::1]:3,[::2]", 9) == [
        ("a", 1),
        ("b", 9),
        ("::1", 3),
        ("::2", 9),
    ]
    for bad in ("a:x", ":1", "a:0", "a:70000", " , "):
        with pytest.raises(ConfigurationError):
            urls.parse_hosts(bad, 9, url="s://u:pw@" + bad)
