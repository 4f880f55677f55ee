"""examples/lecture's page in headless Chromium, against the example deployed as two node
processes and a worker on RabbitMQ, Redis and MariaDB (tests/test_lecture_example.py): the page
loads the history, joins and goes live while the other node keeps posting, pages back, and
after its transport is closed recovers on the other node with the messages sent meanwhile,
each shown once, in order. Through a small TCP "load balancer" (test_sio_recovery_browser's)
that the test points at one node or the other."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio

from roomrouter.brokers.redis import key_prefix

from .helpers import eventually
from .storage.conftest import mysql_prefix, mysql_url  # noqa: F401 - fixtures
from .test_lecture_example import (  # noqa: F401 - lecture: the fixture
    REDIS,
    WINDOW,
    Client,
    Lecture,
    history,
    lecture,
)
from .test_sio_recovery_browser import Balancer
from .test_socketio import CHROMIUM, CHROMIUM_ARGS, require_chromium

pytestmark = pytest.mark.anyio


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def all_messages(url: str, room: str) -> list[tuple[str, str]]:
    page = await history(url, room, limit=1000)
    return [(m["id"], m["text"]) for m in page["messages"]]


async def shown(page: Any) -> list[tuple[str, str]]:
    """The page's messages as ``(id, text)``, in the order shown."""
    items = await page.evaluate(
        "[...document.querySelectorAll('#log li.message')]"
        ".map(li => [li.dataset.id, li.firstChild.textContent])"
    )
    return [(i, text.split(": ", 1)[1]) for i, text in items]


@pytest.mark.slow
async def test_the_page_loads_history_goes_live_and_recovers_on_the_other_node(
    lecture: Lecture,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    a, b = await lecture.node("a"), await lecture.node("b")
    lecture.worker()
    room = "lecture"
    problems: list[str] = []
    async with AsyncExitStack() as stack:
        bob = await stack.enter_async_context(Client(b))
        await bob.join(room, "bob")
        for i in range(60):  # more than the page's first history page (50)
            await bob.say(f"before {i}")
        balancer = await stack.enter_async_context(Balancer(port_of(a)).serve())
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        stack.push_async_callback(browser.close)
        page = await browser.new_page()
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on(
            "response",
            lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )
        await page.goto(f"http://127.0.0.1:{balancer.port}/")
        await page.wait_for_function("window.lectureSocket && window.lectureSocket.connected")
        await page.fill("#name", "alice")
        await page.fill("#room", room)

        # Join while bob keeps posting from the other node: history, catch-up and live overlap.
        posted = 0
        stop = anyio.Event()

        async def keep_posting() -> None:
            nonlocal posted
            while not stop.is_set():
                await bob.say(f"during {posted}")
                posted += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_posting)
            await anyio.sleep(0.1)
            await page.click("#join button")
            await page.wait_for_selector(f"body[data-joined='{room}']", state="attached")
            await anyio.sleep(0.3)
            stop.set()
        everything = await all_messages(a, room)
        assert len(everything) == 60 + posted
        # The first page of history (the newest 50 at its read), then all that came after.
        first = await page.evaluate("document.querySelector('#log li').dataset.id")
        start = [i for i, _ in everything].index(first)
        assert 0 < start <= 60 + posted - 50
        await eventually(lambda: _equal(shown(page), everything[start:]), timeout=10, interval=0.1)
        assert await page.is_visible("#older")
        while await page.is_visible("#older"):  # older pages, back to the beginning
            count = len(await shown(page))
            await page.click("#older")
            await page.wait_for_function(
                f"document.querySelectorAll('#log li.message').length > {count}"
            )
        assert await shown(page) == everything

        # The transport closed; bob posts from the other node meanwhile; the reconnect goes
        # to the other node: the same socket, recovered, each missed message once, in order.
        sid = await page.evaluate("window.lectureSocket.id")
        balancer.open.clear()
        await page.evaluate("window.lectureSocket.io.engine.close()")
        await eventually(lambda: _session_waits(lecture.namespace), timeout=10)
        for i in range(5):
            await bob.say(f"missed {i}")
        balancer.target = port_of(b)
        balancer.open.set()
        await page.wait_for_selector("body[data-recoveries='1']", state="attached", timeout=10_000)
        assert await page.evaluate("window.lectureSocket.id") == sid
        everything = await all_messages(b, room)
        assert [t for _, t in everything[-5:]] == [f"missed {i}" for i in range(5)]
        await eventually(lambda: _equal(shown(page), everything), timeout=10, interval=0.1)
        await anyio.sleep(0.3)  # nothing comes twice afterwards
        assert await shown(page) == everything

        # And live again, on the other node now, typed in the page.
        await page.fill("#text", "back")
        await page.press("#text", "Enter")
        await eventually(lambda: _check(bob.got and bob.got[-1][1] == "back"), timeout=10)
        await eventually(
            lambda: _equal(shown(page), [*everything, bob.got[-1]]), timeout=10, interval=0.1
        )
    assert problems == []


def _check(condition: object) -> None:
    assert condition


async def _equal(got: Any, expected: list[tuple[str, str]]) -> None:
    assert await got == expected


async def _session_waits(namespace: str) -> None:
    """The node saw the page's transport close: one session (the page's; bob's client stays
    connected) was saved with the window as its TTL (while connected it is rewritten with a
    longer one), so a reconnect finds it."""
    client = redis.asyncio.Redis.from_url(REDIS)
    try:
        pattern = key_prefix(namespace).replace(b"{", b"\\{").replace(b"}", b"\\}")
        keys = [k async for k in client.scan_iter(match=pattern + b"sio-session:*")]
        ttls = [await client.pttl(key) for key in keys]
    finally:
        await client.aclose()
    assert len(ttls) == 2 and len([t for t in ttls if 0 < t <= WINDOW * 1000]) == 1, ttls
