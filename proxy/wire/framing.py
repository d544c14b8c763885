"""Framing of the PostgreSQL v3 byte streams. Pure: bytes in, frames out.

Theory of operation
-------------------
After startup every message is `type:u8 | length:u32 (includes itself) | body`.
A `FrameBuffer` holds the bytes received on one direction and hands them back
in the largest pieces the caller allows:

* `bytes`: one or more whole messages nobody needs to look at, as ONE slice,
  to be forwarded as received (a DataRow on this path is never decoded; when a
  received chunk is all pass-through it comes back as the very same object);
* `Frame(type, body)`: a whole message of a type the caller asked to see
  (`held_types`, a 256-entry bytearray used as a lookup table);
* a message longer than `stream_threshold` whose type is not held is streamed:
  its bytes go out as they arrive, so a 64 MB value never sits whole in the
  proxy's memory.

Types in the `watched` table are not held but counted as they pass (`seen`),
with the type and first body byte of the last one kept (`last_watched_type`,
`last_watched_byte`): that is all the session needs of Sync/Query (each owes
a ReadyForQuery), of Execute (is one still without its Sync?) and of
ReadyForQuery itself (the transaction status), without a per-message object.

Lengths outside [4, max_message] are a protocol violation blamed on the peer
(`ProtocolViolation.who`); nothing else raises. The startup phase (no type
byte: length + code) is read with `next_startup_packet`.
"""

from __future__ import annotations

import struct
from typing import Final

# PostgreSQL's own limit for a frontend message is 1 GiB - 1 (PQ_LARGE_MESSAGE_LIMIT).
MAX_MESSAGE: Final = (1 << 30) - 1
# Startup packets are small; PostgreSQL refuses ones over 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
STREAM_THRESHOLD: Final = 64 * 1024

_read_u32: Final = struct.Struct("!I").unpack_from


def u32_at(data: bytes, pos: int) -> int:
    """The big-endian unsigned 32-bit integer at `pos` (the caller checked the length).
    Compiled, four byte reads cost a fraction of a struct call and the tuple it returns:
    this runs for every message framed, and for every value of a Bind or DataRow."""
    return data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]


# passes_whole's per-type table (a list: CPython indexes lists faster than bytearrays).
_PASS, _WATCH, _STOP = 0, 1, 2

# Every frontend message type PostgreSQL knows after startup.
FRONTEND_TYPES: Final = frozenset(b"BCdcfDEHFPpQSX")


class ProtocolViolation(Exception):
    """Malformed bytes on the wire. `who` is "client" or "server": whose fault it is."""

    def __init__(self, who: str, message: str) -> None:
        super().__init__(message)
        self.who = who
        self.message = message


class Frame:
    """A whole message the caller asked to see. `body` excludes type and length; `raw`
    is the whole message as received (most frames are forwarded unchanged)."""

    __slots__ = ("body", "raw", "type")

    def __init__(self, type: int, body: bytes, raw: bytes | None = None) -> None:
        self.type = type
        self.body = body
        self.raw = (
            raw
            if raw is not None
            else bytes((type,)) + (len(body) + 4).to_bytes(4, "big") + body
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return self.type == other.type and self.body == other.body

    def __hash__(self) -> int:
        return hash((self.type, self.body))

    def __repr__(self) -> str:
        return f"Frame(type={self.type!r}, body={self.body!r})"


def held_table(types: bytes | str = b"") -> bytearray:
    """A 256-entry lookup table: table[t] is 1 when messages of type t are held."""
    table = bytearray(256)
    for t in types.encode() if isinstance(types, str) else types:
        table[t] = 1
    return table


class FrameBuffer:
    """Receive buffer for one direction of one connection (see module doc)."""

    __slots__ = (
        "_buf",
        "_kinds",
        "_kinds_of",
        "_pos",
        "_stream_left",
        "held",
        "last_watched_byte",
        "last_watched_type",
        "max_message",
        "seen",
        "stream_threshold",
        "valid_types",
        "watched",
        "who",
    )

    def __init__(
        self,
        who: str,
        *,
        held: bytearray | None = None,
        watched: bytearray | None = None,
        valid_types: frozenset[int] | None = None,
        max_message: int = MAX_MESSAGE,
        stream_threshold: int = STREAM_THRESHOLD,
    ) -> None:
        self.who = who
        self.held = held if held is not None else held_table()
        self.watched = watched if watched is not None else held_table()
        self.seen = [0] * 256
        self.last_watched_byte = 0
        self.last_watched_type = 0
        self.valid_types = valid_types
        self.max_message = max_message
        self.stream_threshold = stream_threshold
        # `bytes` while it holds exactly one received chunk (the common case: no copy
        # when that chunk is forwarded whole), a bytearray once chunks are joined.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._stream_left = 0  # bytes of a streamed message still to pass through
        self._kinds: list[int] = []
        self._kinds_of: tuple[bytearray, bytearray] | None = None

    def feed(self, data: bytes) -> None:
        if self._pos == len(self._buf):
            self._buf = bytes(data)
            self._pos = 0
        elif isinstance(self._buf, bytearray):
            self._buf += data
        else:
            self._buf = bytearray(memoryview(self._buf)[self._pos :]) + data
            self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _compact(self) -> None:
        # Drop consumed bytes once they dominate, so the buffer does not grow without bound.
        if self._pos == len(self._buf):
            self._buf = b""
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            if isinstance(self._buf, bytearray):
                del self._buf[: self._pos]
            else:
                self._buf = self._buf[self._pos :]
            self._pos = 0

    def _slice(self, start: int, stop: int) -> bytes:
        buf = self._buf
        if isinstance(buf, bytes):
            return buf[start:stop]  # the whole chunk comes back as the same object
        with memoryview(buf) as view:
            return bytes(view[start:stop])

    def passes_whole(self, data: bytes) -> bool:
        """Fast path: True when `data` (nothing buffered before it) is only whole,
        valid, non-held messages. Then it is counted as seen and the caller forwards
        it as is; otherwise nothing changed and the caller must `feed` it."""
        if self._pos != len(self._buf) or self._stream_left:
            return False
        end = len(data)
        if end > self.max_message:
            return False
        # Per message: one unpack, one table lookup, one length check. A length above
        # max_message needs no test of its own: it jumps past `end`, so pos != end.
        kinds_of = self._kinds_of
        if kinds_of is None or kinds_of[0] is not self.held or kinds_of[1] is not self.watched:
            self._build_kinds()
        kinds = self._kinds
        pos = 0
        hits: list[int] | None = None
        last = -1
        while end - pos >= 5:
            mtype = data[pos]
            length = u32_at(data, pos + 1)
            kind = kinds[mtype]
            if kind:
                if kind == _STOP:
                    return False
                if hits is None:
                    hits = [mtype]
                else:
                    hits.append(mtype)
                last = pos
            if length < 4:
                return False
            pos += length + 1
        if pos != end:
            return False
        if hits is not None:
            seen = self.seen
            for mtype in hits:
                seen[mtype] += 1
            self.last_watched_type = data[last]
            if last + 5 < end:
                self.last_watched_byte = data[last + 5]
        return True

    def _build_kinds(self) -> None:
        # Rebuilt whenever `held` or `watched` is replaced (the session swaps whole
        # tables between phases; only `hold` edits one in place, and patches this one).
        self._kinds = [self._kind(t) for t in range(256)]
        self._kinds_of = (self.held, self.watched)

    def _kind(self, mtype: int) -> int:
        valid = self.valid_types
        if self.held[mtype] or (valid is not None and mtype not in valid):
            return _STOP
        return _WATCH if self.watched[mtype] else _PASS

    def next(self) -> Frame | bytes | None:
        """The next piece to act on, or None when more bytes are needed."""
        buf = self._buf
        end = len(buf)
        pos = self._pos
        if end - pos >= 5 and not self._stream_left:
            # Compiled, a byte of a `bytes` (the usual buffer) is read without boxing; the
            # union type would make both reads generic.
            if isinstance(buf, bytes):
                mtype = buf[pos]
            else:
                mtype = buf[pos]
        else:
            mtype = -1
        if mtype >= 0 and self.held[mtype]:
            # The common case with a data path: a held message first. Same checks as below.
            length = self._length_of(buf, pos, mtype)
            stop = pos + length + 1
            if stop > end:
                return None
            raw = buf[pos:stop] if type(buf) is bytes else bytes(memoryview(buf)[pos:stop])
            if stop == end:
                self._buf = b""
                self._pos = 0
            else:
                self._pos = stop
                self._compact()
            return Frame(mtype, raw[5:], raw)
        if self._stream_left:
            take = min(self._stream_left, end - pos)
            if take == 0:
                return None
            self._stream_left -= take
            self._pos = pos + take
            piece = self._slice(pos, pos + take)
            self._compact()
            return piece
        held = self.held
        watched = self.watched
        start = pos
        while end - pos >= 5:
            mtype = buf[pos]
            length = self._length_of(buf, pos, mtype)
            total = length + 1
            if held[mtype]:
                if pos > start:
                    break  # hand out the pass-through run before this message
                if end - pos < total:
                    return None
                self._pos = pos + total
                raw = self._slice(pos, pos + total)
                frame = Frame(mtype, raw[5:], raw)
                self._compact()
                return frame
            if end - pos < total:
                if pos == start and total > self.stream_threshold:
                    # Too large to hold: start streaming it through as it arrives.
                    self._stream_left = total - (end - pos)
                    if watched[mtype]:
                        self._watch(mtype, pos)
                    pos = end
                break
            if watched[mtype]:
                self._watch(mtype, pos)
            pos += total
        if pos == start:
            return None
        self._pos = pos
        span = self._slice(start, pos)
        self._compact()
        return span

    def _length_of(self, buf: bytes | bytearray, pos: int, mtype: int) -> int:
        """The length field of the message at `pos`, after checking it and its type."""
        if isinstance(buf, bytes):
            length = u32_at(buf, pos + 1)
        else:
            length = int(_read_u32(buf, pos + 1)[0])
        if length < 4 or length > self.max_message:
            raise ProtocolViolation(self.who, f"invalid message length {length}")
        if self.valid_types is not None and mtype not in self.valid_types:
            raise ProtocolViolation(self.who, f"invalid message type {mtype!r}")
        return length

    def _watch(self, mtype: int, pos: int) -> None:
        self.seen[mtype] += 1
        self.last_watched_type = mtype
        if pos + 5 < len(self._buf):
            self.last_watched_byte = self._buf[pos + 5]

    def hold(self, mtype: int, on: bool) -> None:
        """Start or stop holding one message type, in place, on a table this buffer owns
        (never a shared one). The fast path's own table follows at once; an in-place
        edit alone would not reach it (`_build_kinds` notices replaced tables only)."""
        if bool(self.held[mtype]) != on:
            self.held[mtype] = 1 if on else 0
            if self._kinds_of is not None and self._kinds_of[0] is self.held:
                # Toggled once or twice per result: patch the one entry, no rebuild.
                self._kinds[mtype] = self._kind(mtype)

    def take_seen(self, mtype: int) -> int:
        n = self.seen[mtype]
        self.seen[mtype] = 0
        return n

    def push_back(self, frame: Frame) -> None:
        """Put a frame handed out by next() back in front (to process it again later)."""
        raw = frame.raw
        rest = self._slice(self._pos, len(self._buf))
        self._buf = bytearray(raw) + rest if rest else raw
        self._pos = 0

    def take_rest(self) -> bytes:
        """Everything buffered and not yet handed out (used when a phase ends, e.g. TLS)."""
        rest = self._slice(self._pos, len(self._buf))
        self._buf = b""
        self._pos = 0
        return rest


# --- startup phase -------------------------------------------------------------

PROTOCOL_3_0: Final = 196608
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102


def next_startup_packet(buf: bytearray) -> bytes | None:
    """Pop one whole startup-phase packet (length-prefixed, no type byte) off `buf`."""
    if len(buf) < 4:
        return None
    length = int.from_bytes(buf[:4], "big")
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation("client", f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    packet = bytes(buf[:length])
    del buf[:length]
    return packet
