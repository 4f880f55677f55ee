"""Connection state recovery with the official socket.io client (the vendored 4.8.4 of
examples/socketio) in headless Chromium, across two nodes on Redis behind a small TCP "load
balancer" that the test points at one node or the other, and can hold new connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from .backends import Backend
from .helpers import eventually
from .test_sio_recovery import _check, emit_each, node, redis  # noqa: F401 (fixture)
from .test_socketio import CHROMIUM, CHROMIUM_ARGS, require_chromium

pytestmark = pytest.mark.anyio

CLIENT = Path(__file__).parents[1] / "examples" / "socketio" / "static" / "socket.io.min.js"

PAGE = """<!doctype html><html><head><link rel="icon" href="data:,">
<script src="/socket.io.min.js"></script></head><body><script>
window.got = [];
window.connects = [];
const socket = io({transports: ["websocket"], reconnectionDelay: 100,
                   reconnectionDelayMax: 200});
window.sock = socket;
socket.on("connect", () => window.connects.push({id: socket.id, recovered: socket.recovered}));
socket.on("said", (value) => window.got.push(value));
</script></body></html>
"""


class Balancer:
    """Forwards each new TCP connection to ``target``; while held, new ones wait."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open = asyncio.Event()
        self.open.set()
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.open.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Balancer]:
        server = await asyncio.start_server(self._spawn, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.slow
async def test_chromium_recovers_on_the_other_node(redis: Backend, tmp_path: Path) -> None:  # noqa: F811
    """The page's transport closed (``socket.io.engine.close()``), events emitted meanwhile
    from both nodes, the reconnect sent to the other node: ``socket.recovered`` is true, the
    same id, the missed events once and in order, then live; then once more, back."""
    require_chromium()
    from playwright.async_api import async_playwright

    page_file = tmp_path / "index.html"
    page_file.write_text(PAGE)
    static = {
        "/": {"content_type": "text/html", "filename": str(page_file)},
        "/socket.io.min.js": {"content_type": "text/javascript", "filename": str(CLIENT)},
    }
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(node(redis, static_files=static))
        b = await stack.enter_async_context(node(redis, static_files=static))
        balancer = await stack.enter_async_context(Balancer(port_of(a.url)).serve())
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        stack.push_async_callback(browser.close)
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{balancer.port}/")
        await page.wait_for_function("window.connects.length === 1")
        sid = await page.evaluate("window.sock.id")
        assert await page.evaluate("window.sock.emitWithAck('join', 'r')") == "joined"
        await emit_each(b, [1])
        await page.wait_for_function("window.got.length === 1")

        sent = [1]
        for round_, (old, new) in enumerate([(a, b), (b, a)]):
            balancer.open.clear()
            await page.evaluate("window.sock.io.engine.close()")
            await eventually(lambda old=old: _check(not old.manager.is_connected(sid, "/")))
            missed = [10 * (round_ + 1) + i for i in range(4)]
            await emit_each(new, missed[:2])
            await emit_each(old, missed[2:])
            sent += missed
            balancer.target = port_of(new.url)
            balancer.open.set()
            await page.wait_for_function(f"window.connects.length === {round_ + 2}")
            assert await page.evaluate("window.connects.at(-1)") == {"id": sid, "recovered": True}
            await page.wait_for_function(f"window.got.length >= {len(sent)}", timeout=10_000)
            await anyio.sleep(0.3)
            assert await page.evaluate("window.got") == sent
            assert new.manager.is_connected(sid, "/")
        await emit_each(b, [99])
        await page.wait_for_function(f"window.got.length === {len(sent) + 1}")
        assert (await page.evaluate("window.got"))[-1] == 99
