"""The member <-> router interface (issue 21): a member is known to its router by id until it
closes, whichever way it closes; and the router's modules talk to members (and to each other)
through names without a leading underscore, so the member's state has one owner."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from roomrouter import MemberClosed, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

from .conftest import unique_namespace

pytestmark = pytest.mark.anyio

SRC = Path(__file__).resolve().parent.parent / "src" / "roomrouter"
#: The router and the modules it delegates to: none reaches into another object's privates.
ROUTER_MODULES = ["_router.py", "_joins.py", "_gaps.py", "_lifecycle.py", "_options.py"]
#: Public by convention despite the underscore (namedtuple's API).
NAMEDTUPLE = {"_replace", "_asdict", "_fields", "_make"}


async def test_get_member_until_it_closes() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        m = router.member("m")
        assert router.get_member("m") is m
        assert router.get_member("other") is None
        await m.join("R")
        assert repr(m) == "<Member 'm' 1 room(s)>"
        await m.close()
        assert router.get_member("m") is None
        assert repr(m) == "<Member 'm' closed: closed>"
        assert router.stats()["members"] == 0
        again = router.member("m")  # the id is free again
        assert router.get_member("m") is again is not m
        with pytest.raises(MemberClosed):
            await m.join("R")
    assert again.closed and again.close_reason == "router closed"
    assert router.get_member("m") is None


async def test_a_member_closed_by_overflow_is_forgotten() -> None:
    async with RoomRouter(
        MemoryBroker(unique_namespace()), linger=0, inbox_size=2, overflow="disconnect"
    ) as router:
        m = router.member("m")
        await m.join("R")
        for i in range(3):
            await router.publish("R", b"%d" % i)
        assert m.close_reason == "overflow"
        assert router.get_member("m") is None
        assert m.rooms == frozenset()
        assert router.local_rooms == frozenset()
        # what was queued before the overflow is still there, then the close
        assert [(await m.receive()).payload for _ in range(2)] == [b"0", b"1"]
        with pytest.raises(MemberClosed):
            await m.receive()


def _private_reaches(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: another object's private attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name in NAMEDTUPLE or name.endswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", ROUTER_MODULES)
def test_the_router_touches_no_private_attribute_of_another_object(module: str) -> None:
    assert _private_reaches(SRC / module) == []


def test_the_check_finds_a_private_reach(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(member):\n    member._deliver(1)\n    return member.__class__\n")
    assert _private_reaches(bad) == ["bad.py:2: member._deliver"]


def test_membership_names_have_no_underscore() -> None:
    from roomrouter._inbox import Inbox
    from roomrouter._joins import Joins
    from roomrouter._member import Membership

    wanted = {n for n in vars(Membership) if not n.startswith("_")}
    assert wanted == {"join", "leave", "forget", "rooms_of"}
    assert all(callable(getattr(Joins, n)) for n in wanted)  # the router's side has them all
    assert {"deliver", "deliver_gap", "deliver_recovered", "close", "check_open"} <= set(dir(Inbox))
