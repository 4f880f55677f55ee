"""The ``roomrouter`` command's start-up failures, as a subprocess: one line on stderr, exit status
1, and never a password from a URL in anything it prints."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import pytest

from roomrouter._urls import redact

from .backends import require_tcp

pytestmark = pytest.mark.anyio

SECRET = "s3cretPW"
COMMAND = str(Path(sys.executable).with_name("roomrouter"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fails_in_one_line(*args: str, secret: str = SECRET) -> str:
    result = await anyio.run_process([COMMAND, *args], check=False)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert secret not in out + err, (out, err)
    assert result.returncode == 1, (result.returncode, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("roomrouter: "), err
    return lines[0]


def _worker(broker: str, sink: str = "sqlite:///unused.db") -> list[str]:
    return ["worker", "--broker", broker, "--namespace", "cli", "--sink", sink]


async def test_wrong_rabbitmq_password(tmp_path: Path) -> None:
    require_tcp("127.0.0.1", 5672, "RabbitMQ")
    url = f"amqp://guest:{SECRET}@127.0.0.1:5672/"
    line = await _fails_in_one_line(*_worker(url, f"sqlite:///{tmp_path}/w.db"))
    assert "RabbitMQ" in line
    line = await _fails_in_one_line("demo", "--broker", url, "--port", "0",
                                    "--sink", f"sqlite:///{tmp_path}/d.db")  # fmt: skip
    assert "RabbitMQ" in line


async def test_unreachable_broker(tmp_path: Path) -> None:
    port = _free_port()
    line = await _fails_in_one_line(
        *_worker(f"redis://:{SECRET}@127.0.0.1:{port}/0", f"sqlite:///{tmp_path}/w.db")
    )
    assert "Redis" in line
    line = await _fails_in_one_line(
        *_worker(f"amqp://guest:{SECRET}@127.0.0.1:{port}/", f"sqlite:///{tmp_path}/w.db")
    )
    assert "RabbitMQ" in line


async def test_missing_postgresql_database() -> None:
    require_tcp("127.0.0.1", 5432, "PostgreSQL")
    # Trust authentication ignores the password: only the database is missing.
    line = await _fails_in_one_line(
        *_worker("memory://", f"postgresql://postgres:{SECRET}@127.0.0.1/nosuchdb")
    )
    assert "nosuchdb" in line


async def test_bad_options_name_the_url_without_its_password() -> None:
    line = await _fails_in_one_line(
        *_worker(f"redis://user:{SECRET}@127.0.0.1/0?operation_timeout=soon")
    )
    assert "operation_timeout" in line and "user:***@127.0.0.1" in line
    line = await _fails_in_one_line(*_worker(f"amqp://u:{SECRET}@h/?prefetch=many"))
    assert "u:***@h" in line


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
async def test_port_out_of_range(port: str) -> None:
    line = await _fails_in_one_line("demo", "--port", port)
    assert port in line


async def test_demo_banner_hides_the_password(tmp_path: Path) -> None:
    require_tcp("127.0.0.1", 5672, "RabbitMQ")
    url = "amqp://guest:guest@127.0.0.1:5672/"
    async with await anyio.open_process(
        [COMMAND, "demo", "--broker", url, "--port", "0", "--sink", f"sqlite:///{tmp_path}/b.db"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        assert process.stdout is not None
        first = b""
        try:
            with anyio.fail_after(20):
                while b"\n" not in first:
                    first += await process.stdout.receive()
        finally:
            process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            await process.wait()
    line = first.decode().splitlines()[0]
    assert "amqp://guest:***@127.0.0.1:5672/" in line and ":guest@" not in line, line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("amqp://guest:pw@h/vhost?x=1", "amqp://guest:***@h/vhost?x=1"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=off",
            "postgresql://u@h/db?password=***&sslmode=off",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("kafka://a:9092,b:9092", "kafka://a:9092,b:9092"),
        ("sqlite:///chat.db", "sqlite:///chat.db"),
        ("amqp://u:pw@h?heartbeat=5", "amqp://u:***@h?heartbeat=5"),
        ("not a url", "not a url"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_reprs_and_errors_hide_the_password() -> None:
    from roomrouter import ConfigurationError, RoomRouter
    from roomrouter.storage import sink_from_url

    broker = RoomRouter.from_url(f"amqp://guest:{SECRET}@127.0.0.1/").broker
    sink = sink_from_url(f"postgresql://u:{SECRET}@127.0.0.1/db")
    for text in (repr(broker), repr(sink)):
        assert SECRET not in text and ":***@127.0.0.1" in text, text
    for url in (
        f"redis://:{SECRET}@h/0?sharded=maybe&operation_timeout=x",
        f"kafka://h:1?sasl_plain_password={SECRET}&nope=1",
        f"memory://x?password={SECRET}&recent_size=x",
        f"amqp://u:{SECRET}@h/?prefetch=x",
        f"nosuch://u:{SECRET}@h/",
    ):
        with pytest.raises(ConfigurationError) as info:
            RoomRouter.from_url(url)
        assert SECRET not in str(info.value) and "***" in str(info.value), info.value


async def test_mysql_sink_failures_are_one_line() -> None:
    require_tcp("127.0.0.1", 3306, "MariaDB")
    port = _free_port()
    line = await _fails_in_one_line(
        *_worker("memory://", f"mysql://root:{SECRET}@127.0.0.1:{port}/test")
    )
    assert f"MySQL at 127.0.0.1:{port}" in line
    line = await _fails_in_one_line(*_worker("memory://", f"mysql://root:{SECRET}@127.0.0.1/test"))
    assert line == "roomrouter: MySQL at 127.0.0.1:3306 refused the login for user 'root'"
    line = await _fails_in_one_line(*_worker("memory://", "mariadb://root@127.0.0.1/nosuchdb"))
    assert "nosuchdb" in line
    line = await _fails_in_one_line(
        *_worker("memory://", f"mysql://root:{SECRET}@127.0.0.1/test?table_prefix=No")
    )
    assert "table_prefix" in line
