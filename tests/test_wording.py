"""One wording for a service that cannot be reached, on every backend (issue 20):
``cannot reach Redis at 127.0.0.1:1: connection refused``, a refused login said as such, and
never the ``repr`` of a client library's exception in a message.

Each backend is pointed at a closed loopback port (tests/ports.py) through its public entry
point (a router, a presence store, a storage worker, a sink), and the message is compared
whole."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomrouter import ConfigurationError, RoomRouter
from roomrouter._errors import (
    BrokerUnavailable,
    RoomRouterError,
    SinkError,
    describe,
    unreachable,
)
from roomrouter.storage import StorageWorker
from roomrouter.storage._urls import sink_from_url

from .backends import require_tcp
from .ports import free_port

pytestmark = pytest.mark.anyio

SRC = Path(__file__).resolve().parents[1] / "src" / "roomrouter"


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _router_error(broker: str, presence: str | None = None) -> BaseException:
    router = RoomRouter.from_url(broker, namespace="wording", presence=presence)
    with pytest.raises(BaseException) as caught:
        async with router:
            pass
    error = _first_error(caught.value)
    assert isinstance(error, BrokerUnavailable), repr(error)
    return error


async def _worker_error(broker: str, tmp_path: Path) -> BaseException:
    worker = StorageWorker.from_urls(broker, "wording", f"sqlite:///{tmp_path}/w.db")
    with pytest.raises(BaseException) as caught:
        await worker.run()
    error = _first_error(caught.value)
    assert isinstance(error, BrokerUnavailable), repr(error)
    return error


async def _sink_error(url: str) -> BaseException:
    sink = sink_from_url(url)
    try:
        with pytest.raises(SinkError) as caught:
            await sink.start()
    finally:
        await sink.aclose()
    return caught.value


# -- the helper ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)"), "connection refused"),
        (TimeoutError(), "timed out"),
        (socket.gaierror(-2, "Name or service not known"), "name not resolved"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset"),
        (OSError(113, "No route to host"), "host unreachable"),
        (RedisTimeoutError("Timeout connecting to server"), "timed out"),
        # A library that folds the cause into its own message.
        (
            RuntimeError("Error 111 connecting to 127.0.0.1:1. Connect call failed."),
            "connection refused",
        ),
    ],
)
def test_reason_in_words(exc: BaseException, reason: str) -> None:
    assert str(unreachable("Redis", "127.0.0.1", 1, exc)) == (
        f"cannot reach Redis at 127.0.0.1:1: {reason}"
    )
    assert describe(exc) == reason


def test_the_reason_is_found_in_the_cause() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as inner:
            raise ValueError(("wrapped", 3)) from inner
    except ValueError as exc:
        error = unreachable("MySQL", "db.example", 3306, exc, error=SinkError)
    assert isinstance(error, SinkError)
    assert str(error) == "cannot reach MySQL at db.example:3306: connection refused"


def test_refused_login_and_ipv6_and_purpose() -> None:
    class ProbableAuthenticationError(Exception):
        pass

    exc = ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    assert str(unreachable("RabbitMQ", "::1", 5672, exc, user="guest")) == (
        "RabbitMQ at [::1]:5672 refused the login for user 'guest'"
    )
    assert str(unreachable("Redis", "h", 1, TimeoutError(), purpose="presence")) == (
        "cannot reach Redis at h:1 for presence: timed out"
    )


async def test_no_password_even_in_an_address() -> None:
    error = unreachable("Kafka", "user:s3cret@k1:9092,u:s3cret@k2:9092", None, TimeoutError())
    assert str(error) == "cannot reach Kafka at k1:9092,k2:9092: timed out"
    # A kafka:// URL cannot carry credentials (aiokafka takes SASL as client options): it is
    # refused in one line that shows no password.
    with pytest.raises(ConfigurationError) as caught:
        RoomRouter.from_url("kafka://user:s3cret@127.0.0.1:9092?operation_timeout=2")
    assert "s3cret" not in str(caught.value) and "user:***@" in str(caught.value)


def test_an_unknown_error_is_named_never_its_repr() -> None:
    class OddLibraryError(Exception):
        pass

    exc = OddLibraryError("the server said no", 42)
    assert describe(exc) == "OddLibraryError: the server said no"
    assert str(unreachable("Kafka", "k:9092", None, exc)) == (
        "Kafka at k:9092: OddLibraryError: the server said no"
    )
    assert "(" not in describe(OddLibraryError(("a", "tuple")))


def test_no_message_in_src_shows_the_repr_of_an_exception() -> None:
    """``{exc!r}`` in a message shows ``<ProbableAuthenticationError: ('ACCESS_REFUSED ...',)>``
    to a person: every backend says ``describe(exc)`` instead."""
    pattern = re.compile(r"\{(?:exc|again|result|error|err|e)!r\}")
    found = [
        f"{path.relative_to(SRC)}:{number}"
        for path in sorted(SRC.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


# -- every backend at a closed port ----------------------------------------------------------


async def test_redis() -> None:
    port = free_port()
    error = await _router_error(f"redis://:pw@127.0.0.1:{port}/0")
    assert str(error) == f"cannot reach Redis at 127.0.0.1:{port}: connection refused"


async def test_redis_storage_consumer(tmp_path: Path) -> None:
    port = free_port()
    error = await _worker_error(f"redis://127.0.0.1:{port}/0", tmp_path)
    assert str(error) == f"cannot reach Redis at 127.0.0.1:{port}: connection refused"


async def test_redis_cluster(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?cluster=1&operation_timeout=2"
    error = await _router_error(url)
    assert str(error) == f"cannot reach Redis Cluster at 127.0.0.1:{port}: connection refused"
    error = await _worker_error(url, tmp_path)
    assert str(error) == f"cannot reach Redis Cluster at 127.0.0.1:{port}: connection refused"


async def test_redis_presence() -> None:
    require_tcp("127.0.0.1", 6379, "Redis")
    port = free_port()
    error = await _router_error("memory://", presence=f"redis://127.0.0.1:{port}/0")
    assert str(error) == (
        f"cannot reach Redis at 127.0.0.1:{port} for presence: connection refused"
    )


async def test_rabbitmq(tmp_path: Path) -> None:
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    for error in (await _router_error(url), await _worker_error(url, tmp_path)):
        assert str(error) == f"cannot reach RabbitMQ at 127.0.0.1:{port}: connection refused"


async def test_rabbitmq_wrong_password(tmp_path: Path) -> None:
    require_tcp("127.0.0.1", 5672, "RabbitMQ")
    url = "amqp://guest:wrong-password@127.0.0.1:5672/"
    for error in (await _router_error(url), await _worker_error(url, tmp_path)):
        assert str(error) == "RabbitMQ at 127.0.0.1:5672 refused the login for user 'guest'"


async def test_kafka(tmp_path: Path) -> None:
    port = free_port()
    url = f"kafka://127.0.0.1:{port}?operation_timeout=2"
    for error in (await _router_error(url), await _worker_error(url, tmp_path)):
        assert str(error) == f"cannot reach Kafka at 127.0.0.1:{port}: no broker answered"


async def test_postgresql() -> None:
    port = free_port()
    error = await _sink_error(f"postgresql://u:pw@127.0.0.1:{port}/db")
    assert str(error) == f"cannot reach PostgreSQL at 127.0.0.1:{port}: connection refused"


async def test_postgresql_unknown_role() -> None:
    require_tcp("127.0.0.1", 5432, "PostgreSQL")
    error = await _sink_error("postgresql://nobody-here:pw@127.0.0.1:5432/test")
    assert str(error) == "PostgreSQL at 127.0.0.1:5432 refused the login for user 'nobody-here'"


async def test_mysql() -> None:
    port = free_port()
    error = await _sink_error(f"mysql://u:pw@127.0.0.1:{port}/db")
    assert str(error) == f"cannot reach MySQL at 127.0.0.1:{port}: connection refused"


async def test_mysql_wrong_password() -> None:
    require_tcp("127.0.0.1", 3306, "MariaDB")
    error = await _sink_error("mysql://root:wrong-password@127.0.0.1:3306/test")
    assert str(error) == "MySQL at 127.0.0.1:3306 refused the login for user 'root'"


def test_every_message_is_a_roomrouter_error() -> None:
    assert issubclass(BrokerUnavailable, RoomRouterError) and issubclass(SinkError, RoomRouterError)
