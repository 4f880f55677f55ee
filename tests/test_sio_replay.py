"""The manager's bookkeeping for clients being recovered (``_sio_replay``): what is emitted to
a held client is kept back for it alone, after what it missed, until its hold ends; and
offsets strictly increase. The wire behaviour is pinned by tests/test_sio_recovery.py."""

from __future__ import annotations

import uuid

import pytest

from roomrouter.integrations._sio_replay import Holds, OffsetIds


def test_a_held_client_gets_what_it_missed_first_then_what_was_held_then_nothing() -> None:
    holds = Holds()
    assert not holds
    holds.open("/", "a")
    holds.open("/chat", "a")  # the same sid in another namespace is another client
    members = {None: {"a", "b"}, "r": {"a"}}

    # An emit to room r while a is held: a's copy is held back and a must be skipped live.
    assert holds.divert("/", members, ["r"], [], ("o2", "ev", [2])) == ["a"]
    # One that skips a, or to a room a is not in, or of another namespace, is not held.
    assert holds.divert("/", members, ["r"], ["a"], ("o3", "ev", [3])) == []
    assert holds.divert("/", members, ["x"], [], ("o4", "ev", [4])) == []
    assert holds.divert("/other", members, ["r"], [], ("o5", "ev", [5])) == []

    holds.prepend("/", "a", [("o1", "ev", [1])])  # the missed ones, read from the caches
    assert ("/", "a") in holds
    assert holds.take("/", "a") == [("o1", "ev", [1]), ("o2", "ev", [2])]
    # Held while its packets were being sent: kept for the next take.
    assert holds.divert("/", members, [None], [], ("o6", "ev", [6])) == ["a"]
    assert holds.take("/", "a") == [("o6", "ev", [6])]
    # Nothing left: the hold ends, and later emits go live.
    assert holds.take("/", "a") is None
    assert ("/", "a") not in holds
    assert holds.divert("/", members, ["r"], [], ("o7", "ev", [7])) == []

    assert ("/chat", "a") in holds
    holds.drop("/chat", "a")
    assert not holds
    assert holds.take("/chat", "a") is None


def test_offsets_are_uuid7_and_strictly_increasing() -> None:
    ids = OffsetIds()
    offsets = [ids.next() for _ in range(10_000)]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)
    assert all(uuid.UUID(o).version == 7 and str(uuid.UUID(o)) == o for o in offsets[:100])


def test_after_its_hold_a_client_is_skipped_once_for_each_offset_it_was_sent() -> None:
    holds = Holds()
    members = {None: {"a", "b"}, "r": {"a", "b"}}
    holds.open("/", "a")
    assert holds.take("/", "a") is None  # nothing held: the hold ends
    holds.end("/", "a", {"o1", "o2"})  # sent while recovering (missed, read from the caches)
    assert holds  # the live send must ask
    # o1's envelope reaches the node only now: a is skipped for it, once; b is not.
    assert holds.already_sent("/", members, ["r"], "o1") == ["a"]
    assert holds.already_sent("/", members, ["r"], "o1") == []
    assert holds.already_sent("/", members, ["x"], "o2") == []  # a is not in x
    assert holds.already_sent("/other", members, ["r"], "o2") == []
    assert holds.already_sent("/", members, ["r"], "o9") == []
    assert holds.already_sent("/", members, [None], "o2") == ["a"]
    assert not holds  # every offset seen: forgotten
    # A new restore of the client, or its disconnect, forgets what it was sent.
    holds.end("/", "a", {"o3"})
    holds.open("/", "a")
    holds.drop("/", "a")
    assert not holds


def test_what_a_recovered_client_was_sent_expires_and_is_indexed_by_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import roomrouter.integrations._sio_replay as replay

    now = [1000.0]
    monkeypatch.setattr(replay.time, "monotonic", lambda: now[0])
    holds = Holds()
    # A storm: 2,000 clients recovered, each sent its own offsets and a shared one.
    members = {"r": {f"c{i}" for i in range(2000)}}
    for i in range(2000):
        holds.end("/", f"c{i}", {f"own{i}", "shared"})
    assert sorted(holds.already_sent("/", members, ["r"], "shared")) == sorted(members["r"])
    assert holds.already_sent("/", members, ["r"], "own7") == ["c7"]
    # An entry replaced by a later end() keeps its own deadline.
    now[0] += replay._SENT_TTL - 1
    holds.end("/", "c8", {"late"})
    assert holds.already_sent("/", members, ["r"], "own8") == []  # replaced, forgotten
    now[0] += 2  # past the first entries' deadline, not c8's
    assert holds.already_sent("/", members, ["r"], "own9") == []
    assert holds.already_sent("/", members, ["r"], "late") == ["c8"]
    assert not holds
    assert not holds._by_offset and not holds._sent  # nothing left behind
