"""Wire codec: round trips, whole vs byte-at-a-time feeding, and the fuzz invariant
(any bytes give messages or a ProtocolViolation, never another exception)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.framing import (
    FRONTEND_TYPES,
    Frame,
    FrameBuffer,
    ProtocolViolation,
    held_table,
    next_startup_packet,
)

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
values = st.one_of(st.none(), st.binary(max_size=64))
fmt = st.sampled_from([0, 1])
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)

message_strategies = st.one_of(
    st.builds(m.Query, names),
    st.builds(m.Parse, names, names, st.lists(u32, max_size=5).map(tuple)),
    st.builds(lambda p, s, vals, f, r: m.Bind(p, s, (f,) if vals else (), tuple(vals), (r,)),
              names, names, st.lists(values, max_size=5), fmt, fmt),
    st.builds(m.Describe, st.sampled_from(["S", "P"]), names),
    st.builds(m.Close, st.sampled_from(["S", "P"]), names),
    st.builds(m.Execute, names, st.integers(0, 2**31 - 1)),
)

backend_strategies = st.one_of(
    st.builds(m.DataRow, st.lists(values, max_size=6).map(tuple)),
    st.builds(m.ReadyForQuery, st.sampled_from(["I", "T", "E"])),
    st.builds(m.ParameterStatus, names, names),
    st.builds(m.BackendKeyData, i32, i32),
    st.builds(m.CommandComplete, names),
    st.builds(m.ParameterDescription, st.lists(u32, max_size=5).map(tuple)),
    st.builds(
        m.RowDescription,
        st.lists(
            st.builds(m.FieldDescription, names, u32, st.integers(-(2**15), 2**15 - 1), u32,
                      st.integers(-(2**15), 2**15 - 1), i32, fmt),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(m.NotificationResponse, i32, names, names),
)

FRONTEND_DECODERS = {
    m.Query: m.decode_query, m.Parse: m.decode_parse, m.Bind: m.decode_bind,
    m.Describe: m.decode_describe, m.Close: m.decode_close, m.Execute: m.decode_execute,
}
BACKEND_DECODERS = {
    m.DataRow: m.decode_data_row, m.ReadyForQuery: m.decode_ready_for_query,
    m.ParameterStatus: m.decode_parameter_status, m.BackendKeyData: m.decode_backend_key_data,
    m.CommandComplete: m.decode_command_complete,
    m.ParameterDescription: m.decode_parameter_description,
    m.RowDescription: m.decode_row_description,
    m.NotificationResponse: m.decode_notification_response,
}


def body_of(raw: bytes) -> bytes:
    (length,) = struct.unpack("!i", raw[1:5])
    assert length == len(raw) - 1
    return raw[5:]


@given(message_strategies)
def test_frontend_messages_round_trip(msg: object) -> None:
    raw = msg.encode()  # type: ignore[attr-defined]
    assert FRONTEND_DECODERS[type(msg)](body_of(raw)) == msg


@given(backend_strategies)
def test_backend_messages_round_trip(msg: object) -> None:
    raw = msg.encode()  # type: ignore[attr-defined]
    assert BACKEND_DECODERS[type(msg)](body_of(raw)) == msg


@given(st.lists(st.tuples(names.filter(bool), names), max_size=5))
def test_startup_message_round_trip(params: list[tuple[str, str]]) -> None:
    msg = m.StartupMessage(m.PROTOCOL_3_0, (("user", "u"), *params))
    buf = bytearray(msg.encode())
    packet = next_startup_packet(buf)
    assert packet is not None and not buf
    assert m.decode_startup_packet(packet) == msg


def test_error_response_round_trip() -> None:
    err = m.ErrorResponse.make("0A000", "pgseal: nope", detail="why")
    assert m.decode_error_response(body_of(err.encode())) == err
    assert err.sqlstate == "0A000" and err.message == "pgseal: nope"


def collect(buf: FrameBuffer, chunks: list[bytes]) -> tuple[bytes, list[Frame]]:
    """Feed chunks; return (all pass-through bytes, held frames) in order."""
    passed = bytearray()
    frames: list[Frame] = []
    for chunk in chunks:
        buf.feed(chunk)
        while (item := buf.next()) is not None:
            if isinstance(item, Frame):
                passed += item.raw
                frames.append(item)
            else:
                passed += item
    return bytes(passed), frames


@settings(max_examples=200)
@given(st.lists(message_strategies, min_size=1, max_size=8), st.sampled_from([b"", b"Q", b"BP", b"QPBDCE"]))
def test_whole_and_byte_at_a_time_give_the_same_result(msgs: list[object], held: bytes) -> None:
    stream = b"".join(x.encode() for x in msgs)  # type: ignore[attr-defined]
    whole = collect(FrameBuffer("client", held=held_table(held)), [stream])
    one_by_one = collect(
        FrameBuffer("client", held=held_table(held)), [stream[i : i + 1] for i in range(len(stream))]
    )
    assert whole[0] == stream
    assert one_by_one[0] == stream
    assert [f.raw for f in whole[1]] == [f.raw for f in one_by_one[1]]
    assert all(f.type in held for f in whole[1])


@given(st.lists(message_strategies, min_size=1, max_size=8))
def test_fast_path_agrees_with_slow_path(msgs: list[object]) -> None:
    stream = b"".join(x.encode() for x in msgs)  # type: ignore[attr-defined]
    watched = held_table(b"SQ")
    fast = FrameBuffer("client", watched=watched)
    assert fast.passes_whole(stream)
    slow = FrameBuffer("client", watched=watched)
    assert collect(slow, [stream])[0] == stream
    assert fast.seen == slow.seen
    # A held type in the chunk sends it down the slow path, unchanged state.
    held = FrameBuffer("client", held=held_table(b"QPBDCE"))
    assert not held.passes_whole(stream)
    assert held.buffered == 0


def test_large_pass_through_message_streams_without_being_held() -> None:
    big = m.Bind("", "s", (1,), (b"x" * 1_000_000,), ()).encode()
    buf = FrameBuffer("client", stream_threshold=64 * 1024)
    chunk = 65536
    passed = 0
    for i in range(0, len(big), chunk):
        buf.feed(big[i : i + chunk])
        while (item := buf.next()) is not None:
            assert isinstance(item, bytes)
            passed += len(item)
        assert buf.buffered < 2 * chunk  # never holds the whole message
    assert passed == len(big)


def test_streamed_message_counts_as_seen() -> None:
    big = m.Query("select '" + "x" * 200_000 + "'").encode()
    buf = FrameBuffer("client", watched=held_table(b"Q"))
    buf.feed(big[:1000])
    assert isinstance(buf.next(), bytes)
    assert buf.take_seen(ord("Q")) == 1


@pytest.mark.parametrize("length", [0, 3, -1, 2**31 - 1])
def test_absurd_lengths_are_protocol_violations(length: int) -> None:
    buf = FrameBuffer("client", valid_types=FRONTEND_TYPES)
    buf.feed(b"Q" + struct.pack("!i", length) + b"xx")
    with pytest.raises(ProtocolViolation) as info:
        buf.next()
    assert info.value.who == "client"


def test_unknown_frontend_type_is_a_protocol_violation() -> None:
    buf = FrameBuffer("client", valid_types=FRONTEND_TYPES)
    buf.feed(b"\x01\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation):
        buf.next()


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_framing_only_raises_protocol_violation(data: bytes) -> None:
    buf = FrameBuffer("client", held=held_table(b"QPB"), valid_types=FRONTEND_TYPES)
    try:
        buf.feed(data)
        while (item := buf.next()) is not None:
            if isinstance(item, Frame):
                {"Q": m.decode_query, "P": m.decode_parse, "B": m.decode_bind}[chr(item.type)](item.body)
    except ProtocolViolation:
        pass


@settings(max_examples=500)
@given(st.sampled_from(list(FRONTEND_DECODERS.values()) + list(BACKEND_DECODERS.values())
                       + [m.decode_sasl_initial_response, m.decode_authentication,
                          m.decode_error_response]),
       st.binary(max_size=100))
def test_fuzz_decoders_only_raise_protocol_violation(decoder: object, body: bytes) -> None:
    try:
        decoder(body)  # type: ignore[operator]
    except ProtocolViolation:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_fuzz_startup_only_raises_protocol_violation(data: bytes) -> None:
    buf = bytearray(struct.pack("!i", len(data) + 4) + data)
    try:
        packet = next_startup_packet(buf)
        if packet is not None:
            m.decode_startup_packet(packet)
    except ProtocolViolation:
        pass
