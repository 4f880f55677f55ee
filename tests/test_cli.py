"""The ``roomrouter`` command's start-up failures, as a subprocess: one line on stderr, exit status
1, and never a password from a URL in anything it prints."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from roomrouter._errors import BrokerUnavailable
from roomrouter._urls import redact

from .backends import require_tcp
from .ports import free_port

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


# -- issue 20: every start-up failure is one line, a running command says so --------------------


async def test_demo_with_an_unreachable_presence_store_is_one_line(tmp_path: Path) -> None:
    """It printed an 82-line ExceptionGroup from uvicorn's lifespan and exited 3."""
    port = free_port()
    sink = f"sqlite:///{tmp_path}/p.db"
    for broker in ("memory://", "redis://127.0.0.1:6379/0"):
        if broker.startswith("redis"):
            require_tcp("127.0.0.1", 6379, "Redis")
        line = await _fails_in_one_line(
            "demo", "--broker", broker, "--port", "0", "--sink", sink,
            "--presence", f"redis://:{SECRET}@127.0.0.1:{port}/0",
        )  # fmt: skip
        assert line == (
            f"roomrouter: cannot reach Redis at 127.0.0.1:{port} for presence: connection refused"
        )
    line = await _fails_in_one_line(
        "inspect", "--broker", "memory://", "--namespace", "cli", "--wait", "0",
        "--presence", f"redis://:{SECRET}@127.0.0.1:{port}/0",
    )  # fmt: skip
    assert line == (
        f"roomrouter: cannot reach Redis at 127.0.0.1:{port} for presence: connection refused"
    )


async def test_unreachable_kafka_is_one_line(tmp_path: Path) -> None:
    """aiokafka's own ERROR line per connect attempt is not printed beside roomrouter's."""
    port = free_port()
    line = await _fails_in_one_line(
        *_worker(f"kafka://127.0.0.1:{port}?operation_timeout=2", f"sqlite:///{tmp_path}/k.db")
    )
    assert line == f"roomrouter: cannot reach Kafka at 127.0.0.1:{port}: no broker answered"


def test_a_demo_whose_services_fail_in_the_lifespan_raises_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Services that fail between the check and the server's start (here: no check at all)
    surface as the roomrouter error, without uvicorn's traceback or its exit(3)."""
    from roomrouter._demo import server
    from roomrouter._demo.app import DemoSettings

    async def no_check(settings: DemoSettings) -> None:
        return None

    monkeypatch.setattr(server, "check_services", no_check)
    port = free_port()
    settings = DemoSettings(
        broker="memory://", sink=f"sqlite:///{tmp_path}/l.db",
        presence=f"redis://127.0.0.1:{port}/0",
    )  # fmt: skip
    with pytest.raises(BrokerUnavailable) as info:
        server.run(settings, port=0)
    assert str(info.value) == (
        f"cannot reach Redis at 127.0.0.1:{port} for presence: connection refused"
    )
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err


@pytest.mark.parametrize(
    ("raised", "status", "expected"),
    [
        # A roomrouter error beside anything else in a task group is still the reason.
        (
            BaseExceptionGroup("", [ValueError("side"), BrokerUnavailable("the reason")]),
            1,
            "roomrouter: the reason",
        ),
        # A bug: one line too, never a repr, exit 2.
        (
            ExceptionGroup("", [ExceptionGroup("", [RuntimeError(("odd", 1))])]),
            2,
            "roomrouter: unexpected error: RuntimeError: odd (--verbose shows where)",
        ),
    ],
)
def test_what_escapes_a_command_is_one_line(
    raised: BaseException,
    status: int,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from roomrouter import cli

    async def run_worker(*args: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "_run_worker", run_worker)
    assert cli.main(_worker("memory://")) == status
    assert capsys.readouterr().err.splitlines() == [expected]
    if status == 2:  # --verbose: the traceback of the bug
        with pytest.raises(ExceptionGroup):
            cli.main(["--verbose", *_worker("memory://")])


async def test_worker_says_once_it_is_ready(tmp_path: Path) -> None:
    require_tcp("127.0.0.1", 5432, "PostgreSQL")
    # Trust authentication ignores the password; the banner must not show it.
    sink = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test?table_prefix=cli_banner"
    broker = "redis://127.0.0.1:6379/0"
    require_tcp("127.0.0.1", 6379, "Redis")
    async with await anyio.open_process(
        [COMMAND, *_worker(broker, sink), "--name", "banner"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first = b""
        try:
            with anyio.fail_after(20):
                while b"\n" not in first:
                    first += await process.stdout.receive()
        finally:
            process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            status = await process.wait()
        rest = b"".join([chunk async for chunk in process.stdout])
        err = b"".join([chunk async for chunk in process.stderr])
    assert status == 0, err
    assert first.decode().splitlines()[0] == (
        f"roomrouter worker: consuming {broker} namespace cli into "
        "postgresql://postgres:***@127.0.0.1:5432/test?table_prefix=cli_banner (consumer banner)"
    )
    assert SECRET not in (first + rest + err).decode()


def test_every_sink_option_documents_table_prefix() -> None:
    """``?table_prefix=`` works on every sink URL; the help of each ``--sink`` says so."""
    import click

    from roomrouter.cli import cli

    helps = {
        name: param.help or ""
        for name, command in cli.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and "--sink" in param.opts
    }
    assert set(helps) == {"demo", "worker"}
    for name, text in helps.items():
        assert "?table_prefix=name" in text and "<name>_messages" in text, (name, text)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`?table_prefix=name`" in readme


def test_the_socketio_extra_installs_an_asgi_server_with_websockets() -> None:
    """``pip install roomrouter[socketio]`` must be enough to serve python-socketio's ASGI app
    (docs/socketio.md runs it with uvicorn), at the versions the demo extra pins."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]

    def pins(extra: str) -> dict[str, str]:
        found = {}
        for requirement in extras[extra]:
            name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
            found[name] = requirement
        return found

    socketio, demo = pins("socketio"), pins("demo")
    for server in ("uvicorn", "websockets"):
        assert socketio.get(server) == demo[server], (server, extras["socketio"])


# -- scripts/test.sh and the RabbitMQ management plugin --------------------------------------

TEST_SH = Path(__file__).resolve().parents[1] / "scripts" / "test.sh"


def _test_sh(call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Source scripts/test.sh (which then only defines its functions) and run ``call``."""
    return subprocess.run(
        ["bash", "-c", f'source "{TEST_SH}"; {call}'],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip


def test_the_test_script_enables_the_management_plugin_when_it_is_off(tmp_path: Path) -> None:
    """The README's `bash scripts/test.sh` skipped ~93 RabbitMQ tests in silence when the
    management plugin was off: it runs rabbitmq-plugins when it can, else it says so."""
    with socket.socket() as amqp:  # "RabbitMQ" is up; its management API port is closed
        amqp.bind(("127.0.0.1", 0))
        amqp.listen()
        env = {
            "RABBITMQ_PORT": str(amqp.getsockname()[1]),
            "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
            "RABBITMQ_MANAGEMENT_WAIT": "1",
        }
        calls = tmp_path / "calls"
        plugins = tmp_path / "rabbitmq-plugins"
        plugins.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
        plugins.chmod(0o755)
        done = _test_sh("rabbitmq_management", RABBITMQ_PLUGINS=str(plugins), **env)
        assert done.returncode == 0, done.stderr
        assert calls.read_text() == "enable rabbitmq_management\n"
        # It did not come up (this fake enables nothing): one warning with the fix.
        assert done.stdout.splitlines()[-1] == (
            f"WARNING: the RabbitMQ management API (127.0.0.1:{env['RABBITMQ_MANAGEMENT_PORT']}) "
            "is off, so most RabbitMQ tests will be skipped; to run them: "
            "rabbitmq-plugins enable rabbitmq_management"
        )
        # Without rabbitmq-plugins: only the warning.
        done = _test_sh("rabbitmq_management", RABBITMQ_PLUGINS=str(tmp_path / "none"), **env)
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stdout
        assert done.stdout.startswith("WARNING: ") and calls.read_text().count("\n") == 1
        # A management API that listens: nothing to say, nothing to run.
        with socket.socket() as api:
            api.bind(("127.0.0.1", int(env["RABBITMQ_MANAGEMENT_PORT"])))
            api.listen()
            done = _test_sh("rabbitmq_management", RABBITMQ_PLUGINS=str(plugins), **env)
        assert done.returncode == 0 and done.stdout == "", done.stdout


def test_the_test_script_counts_the_tests_skipped_for_the_management_api(
    tmp_path: Path,
) -> None:
    reason = "RabbitMQ management API (rabbitmq_management plugin) not reachable at 127.0.0.1"
    (tmp_path / "parallel").write_text(
        f"SKIPPED [90] tests/backends.py:301: {reason}:15672 ([Errno 111] refused)\n"
        "SKIPPED [4] tests/test_kafka.py:12: Kafka not here\n"
        f"\x1b[33mSKIPPED\x1b[0m [2] tests/backends.py:301: {reason}:15672 (timed out)\n"
    )
    (tmp_path / "serial").write_text(f"SKIPPED [1] tests/backends.py:301: {reason}:15672\n")
    done = _test_sh(f'management_summary "{tmp_path}/parallel" "{tmp_path}/serial"')
    assert done.stdout == (
        "WARNING: 93 RabbitMQ tests were skipped: the RabbitMQ management API is off; "
        "to run them: rabbitmq-plugins enable rabbitmq_management\n"
    )
    (tmp_path / "serial").write_text("1 passed\n")
    (tmp_path / "parallel").write_text("SKIPPED [4] tests/test_kafka.py:12: Kafka not here\n")
    done = _test_sh(f'management_summary "{tmp_path}/parallel" "{tmp_path}/serial"')
    assert done.returncode == 0 and done.stdout == ""


def test_the_exit_statuses_are_documented() -> None:
    from click.testing import CliRunner

    from roomrouter.cli import cli

    text = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
    for status in ("0 done", "1 could not start", "2 an unexpected error", "130 interrupted"):
        assert status in text, text
