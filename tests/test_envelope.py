from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomrouter import Envelope, InvalidRoomName
from roomrouter._envelope import IdGenerator, decode_envelope, encode_envelope, validate_room


def test_ids_strictly_increase_within_one_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    import roomrouter._envelope as mod

    monkeypatch.setattr(mod.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    gen = IdGenerator()
    ids = [gen.next() for _ in range(10_000)]  # overflows the 12-bit counter: borrows a ms
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for value in ids[:3]:
        parsed = uuid.UUID(value)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_ids_increase_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import roomrouter._envelope as mod

    now = [2_000_000_000_000_000_000]
    monkeypatch.setattr(mod.time, "time_ns", lambda: now[0])
    gen = IdGenerator()
    first = gen.next()
    now[0] -= 5_000_000_000  # five seconds back
    assert gen.next() > first


def test_id_timestamp_is_the_wall_clock() -> None:
    import time

    value = IdGenerator().next()
    ms = int(value.replace("-", "")[:12], 16)
    assert abs(ms / 1000 - time.time()) < 5


@given(
    room=st.text(min_size=1, max_size=50).filter(lambda s: s.isprintable()),
    payload=st.binary(max_size=300),
    headers=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    persist=st.booleans(),
)
def test_codec_roundtrip(room: str, payload: bytes, headers: dict[str, str], persist: bool) -> None:
    env = Envelope(IdGenerator().next(), room, "node", 1.5, payload, headers, persist)
    assert decode_envelope(encode_envelope(env)) == env


def test_wire_carries_a_version_and_rejects_others() -> None:
    env = Envelope("id", "room", "node", 1.0, b"x")
    raw = msgspec.msgpack.decode(encode_envelope(env))
    assert raw[0] == 1  # the format version leads the frame
    raw[0] = 2
    with pytest.raises(msgspec.ValidationError):
        decode_envelope(msgspec.msgpack.encode(raw))


@given(st.binary(max_size=64))
def test_garbage_never_decodes_silently(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert isinstance(env, Envelope)


@pytest.mark.parametrize("room", ["a", "*", "a.b", "#", "日本語", "a b", "x" * 1024, "\u00a0nbsp"])
def test_valid_room_names(room: str) -> None:
    assert validate_room(room) == room


@pytest.mark.parametrize("room", ["", "x" * 1025, "a\nb", "\x00", "\x7f", "\ud800", b"bytes", 1])
def test_invalid_room_names(room: object) -> None:
    with pytest.raises(InvalidRoomName):
        validate_room(room)
