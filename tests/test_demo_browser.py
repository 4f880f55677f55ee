"""The demo chat in a real browser: Debian's chromium driven by Playwright, two demo nodes on
Redis. What a person would check by hand with two browsers: users on different nodes talk, a
user in another room sees nothing, a late joiner gets the history and the who-is-here list, a
reload comes back to the room and recovers what it missed, a message over the limit gets a
clear error, the room field follows the room actually joined.

It takes the screenshot shown in the README: ``ROOMROUTER_SCREENSHOT=1 pytest
tests/test_demo_browser.py`` writes it to docs/demo.png (otherwise to the test's temporary
directory, so a test run leaves the checkout as it was). Chromium is the system's
(``/usr/bin/chromium``; ``.ci/run`` installs it): never ``playwright install``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from roomrouter._demo import DemoSettings

from .backends import BACKENDS
from .test_demo import Node, serve

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 10_000  # ms: every expectation below, at most


def _require_browser() -> None:
    message = None
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            message = 'playwright is missing (pip install -e ".[dev]")'
    if message is None:
        return
    if os.environ.get("CI"):
        pytest.fail(message + "; CI runs the browser test", pytrace=False)
    pytest.skip(message)


async def open_chat(context: BrowserContext, node: Node, name: str, room: str) -> Page:
    """A tab on ``node`` that joined ``room`` as ``name``."""
    from playwright.async_api import expect

    page = await context.new_page()
    await page.goto(f"http://{node.host}/")
    await expect(page.locator("#status")).to_have_class("up", timeout=WAIT)
    await page.fill("#name", name)
    await page.fill("#room", room)
    await page.click("#join")
    await expect(page.locator("#text")).to_be_enabled(timeout=WAIT)
    await expect(page.locator("#people li.me")).to_have_text(f"{name} (you)", timeout=WAIT)
    return page


def _watch_console(context: BrowserContext) -> list[str]:
    """Console errors, uncaught page errors and HTTP errors of every tab of ``context``, as
    they happen (the list the caller keeps grows)."""
    problems: list[str] = []

    def watch(page: Page) -> None:
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "response",
            lambda response: (
                problems.append(f"HTTP {response.status} {response.url}")
                if response.status >= 400
                else None
            ),
        )

    for page in context.pages:
        watch(page)
    context.on("page", watch)
    return problems


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def test_the_chat_in_a_browser_on_two_redis_nodes(tmp_path: Path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    screenshot = SCREENSHOT if os.environ.get("ROOMROUTER_SCREENSHOT") else tmp_path / "demo.png"
    redis = BACKENDS["redis"](f"browser-{uuid.uuid4().hex[:8]}")
    redis.available()
    settings = DemoSettings(
        broker="redis://127.0.0.1:6379/0",
        namespace=redis.namespace,
        sink=f"sqlite:///{tmp_path / 'chat.db'}",
        history=20,
    )
    try:
        async with (
            serve(settings) as node_a,
            serve(settings) as node_b,
            async_playwright() as playwright,
        ):
            context = await playwright.chromium.launch_persistent_context(
                tmp_path / "profile",  # a fresh profile: nothing from an earlier run
                executable_path=str(CHROMIUM),
                args=ARGS,
                headless=True,
                viewport={"width": 960, "height": 600},
            )
            problems = _watch_console(context)
            try:
                await _scenario(context, node_a, node_b, screenshot)
            finally:
                await context.close()
    finally:
        await redis.cleanup()
    # Every tab ran without a console error (a missing favicon was one in each).
    assert problems == []


async def _scenario(context: BrowserContext, node_a: Node, node_b: Node, screenshot: Path) -> None:
    from playwright.async_api import expect

    # Users on different nodes talk; each sees the other arrive.
    alice = await open_chat(context, node_a, "alice", "lobby")
    bob = await open_chat(context, node_b, "bob", "lobby")
    await expect(alice.locator("#log li.presence")).to_have_text(["bob joined"], timeout=WAIT)
    await expect(alice.locator("#people li")).to_have_text(["alice (you)", "bob"], timeout=WAIT)
    await say(alice, "hello from node A")
    await expect(bob.locator("#log li.message").last).to_contain_text(
        "hello from node A", timeout=WAIT
    )
    await say(bob, "hi from node B")
    await expect(alice.locator("#log li.message")).to_have_count(2, timeout=WAIT)
    await expect(alice.locator("#log li.message").last).to_contain_text("hi from node B")
    node_of_bob = (await node_b.stats())["node"]
    await expect(alice.locator("#log li.message").last).to_contain_text(f"node {node_of_bob}")

    # A user in another room, on the same node as Bob, sees none of it.
    dave = await open_chat(context, node_b, "dave", "elsewhere")
    await say(alice, "lobby only")
    await expect(bob.locator("#log li.message").last).to_contain_text("lobby only", timeout=WAIT)
    await say(dave, "dave alone")
    await expect(dave.locator("#log li.message").last).to_contain_text("dave alone", timeout=WAIT)
    await expect(dave.locator("#log li.message")).to_have_count(1)
    await expect(dave.locator("#people li")).to_have_text(["dave (you)"])
    await expect(alice.locator("#log")).not_to_contain_text("dave")

    # A late joiner sees the history and who is here.
    carol = await open_chat(context, node_a, "carol", "lobby")
    await expect(carol.locator("#log li.message")).to_have_count(3, timeout=WAIT)
    await expect(carol.locator("#log li.message").first).to_contain_text("hello from node A")
    await expect(carol.locator("#people li")).to_have_text(["alice", "bob", "carol (you)"])
    await expect(carol.locator("#log li.divider").first).to_contain_text("3 earlier message(s)")

    # A reload comes back to the room, with what the tab showed.
    await bob.reload()
    await expect(bob.locator("#log li.divider").last).to_contain_text(
        "back in #lobby: 0 missed", timeout=WAIT
    )
    await expect(bob.locator("#room")).to_have_value("lobby")
    await expect(bob.locator("#log li.message")).to_have_count(3)
    # Under its own name, though Dave's tab (same origin) saved "dave" as the name to suggest.
    await expect(bob.locator("#name")).to_have_value("bob")
    await expect(bob.locator("#people li")).to_have_text(["alice", "carol", "bob (you)"])
    await expect(alice.locator("#people li")).to_have_text(["alice (you)", "carol", "bob"])
    # Away and back (the tab's session survives the navigation): it recovers what it missed.
    await bob.goto("about:blank")
    await expect(alice.locator("#people li")).to_have_count(2, timeout=WAIT)  # bob left
    await say(alice, "while bob was away")
    await expect(carol.locator("#log li.message").last).to_contain_text("while bob was away")
    await bob.goto(f"http://{node_b.host}/")
    await expect(bob.locator("#log li.divider").last).to_contain_text(
        "back in #lobby: 1 missed message(s) recovered", timeout=WAIT
    )
    await expect(bob.locator("#log li.message")).to_have_count(4)
    await expect(bob.locator("#log li.message").last).to_contain_text("while bob was away")
    await expect(bob.locator("#room")).to_have_value("lobby")
    await expect(alice.locator("#people li")).to_have_text(["alice (you)", "carol", "bob"])

    # The room field follows the room actually joined: a refused join puts it back.
    await alice.fill("#room", "r" * 65)
    await alice.click("#join")
    await expect(alice.locator("#notes p.error")).to_contain_text("InvalidRoomName", timeout=WAIT)
    await expect(alice.locator("#room")).to_have_value("lobby")

    # A message over the limit: a clear error in the page, before anything is sent; the text
    # stays to be shortened, and the connection stays up.
    too_long = "x" * (16 * 1024 + 1)
    await say(alice, too_long)
    await expect(alice.locator("#notes p.error")).to_contain_text("Message too long")
    await expect(alice.locator("#text")).to_have_value(too_long)
    # The server's answer to one that gets past the page (sent as a raw frame): an error frame.
    await alice.evaluate("() => send({type: 'send', text: 'y'.repeat(40000)})")
    await expect(alice.locator("#notes p.error")).to_contain_text("PayloadTooLarge", timeout=WAIT)
    await expect(alice.locator("#status")).to_have_class("up")
    await alice.fill("#text", "")
    await say(alice, "still connected")
    await expect(carol.locator("#log li.message").last).to_contain_text("still connected")

    await say(carol, "welcome back, bob")
    await expect(alice.locator("#log li.message").last).to_contain_text("welcome back, bob")
    await alice.evaluate("() => document.getElementById('notes').replaceChildren()")
    await alice.fill("#text", "see you on node B")
    png = await alice.screenshot(path=str(screenshot))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a picture, not a blank page


async def test_a_batch_of_messages_in_one_frame_shows_in_order(tmp_path: Path) -> None:
    """With a delivery batch delay, ten messages sent at once reach the other tab as one
    ``messages`` frame, shown in order, and kept across a reload."""
    _require_browser()
    from playwright.async_api import WebSocket, async_playwright, expect

    settings = DemoSettings(
        broker=f"memory://browser-{uuid.uuid4().hex[:8]}",
        sink=f"sqlite:///{tmp_path / 'chat.db'}",
        history=20,
        delivery_batch_delay=0.2,
    )
    async with serve(settings) as node, async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
        )
        problems = _watch_console(context)
        try:
            alice = await open_chat(context, node, "alice", "lobby")
            bob = await open_chat(context, node, "bob", "lobby")
            frames: list[str] = []

            def on_websocket(ws: WebSocket) -> None:
                ws.on("framereceived", lambda payload: frames.append(str(payload)))

            bob.on("websocket", on_websocket)
            await bob.reload()  # its new connection is watched
            await expect(bob.locator("#text")).to_be_enabled(timeout=WAIT)
            texts = [f"burst {i}" for i in range(10)]
            await alice.evaluate(
                "(texts) => texts.forEach((text) => send({type: 'send', text}))", texts
            )
            await expect(bob.locator("#log li.message")).to_have_count(10, timeout=WAIT)
            shown = await bob.locator("#log li.message").all_inner_texts()
            assert all(text in line for text, line in zip(texts, shown, strict=True)), shown
            assert any('"type":"messages"' in f for f in frames), frames
            await bob.reload()  # what the tab showed comes back
            await expect(bob.locator("#log li.message")).to_have_count(10, timeout=WAIT)
        finally:
            await context.close()
    assert problems == []
