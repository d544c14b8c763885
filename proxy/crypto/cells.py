"""The sealed cell: what an encrypted column holds (DESIGN.md section 8).

Layout (all cells)::

    byte 0      format version, 0x01
    byte 1      suite: 0x01 AES-256-GCM, random 96-bit nonce (SUITE_RANDOMIZED)
                       0x02 AES-256-SIV, deterministic       (SUITE_DETERMINISTIC)
    bytes 2..5  key_id, u32 big-endian: names (tenant, version) in the keystore
    then        0x01: 12-byte nonce, ciphertext, 16-byte GCM tag
                0x02: 16-byte SIV (the tag), ciphertext        (RFC 5297 order)

Associated data, never stored, rebuilt from where the cell is read::

    b"pgseal/v1" | header bytes 0..5 | u16 len | tenant (utf-8)
                 | u16 len | "schema.table.column" (utf-8)

so a cell copied to another tenant's row, another column, or re-labelled with
another key id or suite, fails authentication.

Keys: each tenant data key (DEK, 32 bytes) is never used directly. A subkey
per (suite, column) comes from HKDF-SHA256 with a fixed salt and
info = suite byte | column name; GCM takes 32 bytes, SIV 64 (two AES-256 keys).
Per-column subkeys also spread GCM's random-nonce budget (about 2**32 cells
per key before nonce collisions become a concern) over every column.

Theory of operation for callers: build one `CellKey` per unwrapped DEK, keep
it as long as the DEK is cached, call `seal`/`open` on the hot path (derived
ciphers are cached per column), and `close()` it when the DEK is evicted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.deterministic import SIV_KEY_LEN, SIV_TAG_LEN, SivCipher

__all__ = [
    "AAD_LABEL",
    "DEK_LEN",
    "FORMAT_VERSION",
    "GCM_NONCE_LEN",
    "GCM_TAG_LEN",
    "HEADER_LEN",
    "HKDF_SALT",
    "SUITE_DETERMINISTIC",
    "SUITE_RANDOMIZED",
    "CellError",
    "CellHeader",
    "CellKey",
    "cell_key_id",
    "random_nonce",
    "read_cell_header",
    "wipe",
]

FORMAT_VERSION: Final = 0x01
SUITE_RANDOMIZED: Final = 0x01
SUITE_DETERMINISTIC: Final = 0x02

HEADER_LEN: Final = 6
GCM_NONCE_LEN: Final = 12
GCM_TAG_LEN: Final = 16
GCM_KEY_LEN: Final = 32
DEK_LEN: Final = 32

AAD_LABEL: Final = b"pgseal/v1"
HKDF_SALT: Final = b"pgseal/v1/hkdf"

# GCM nonces are read from the kernel's CSPRNG a block at a time: one getrandom() per
# 341 nonces instead of one per sealed value (each a system call, and a release of the
# GIL that wakes any thread waiting for it). What makes a random nonce safe is that the
# same bytes are never used twice under one key, so every byte of a block is handed out
# once: under a lock, for callers on other threads (a plain Lock: a signal handler that
# sealed while this thread held it would deadlock, where an RLock would let it take the
# same bytes), and a child made by os.fork (directly or through multiprocessing) drops
# the block it inherited, whose next bytes its parent hands out too. That relies on the
# fork going through os.fork, which runs the at-fork hooks: nothing in pgseal forks
# otherwise and goes on running Python (workers are forked before any key exists;
# subprocesses exec). OpenSSL's RAND_bytes instead compares getpid() on every call, a
# system call per nonce here. The block holds only future nonces, which every cell
# stores in the clear anyway.
NONCE_BLOCK: Final = 4092


class _NonceBlock:
    __slots__ = ("at", "block", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.block = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        with self.lock:
            at = self.at
            end = at + n
            if end > len(self.block):
                self.block = os.urandom(max(NONCE_BLOCK, n))
                at, end = 0, n
            self.at = end
            return self.block[at:end]

    def forget(self) -> None:
        # The inherited bytes go first, so nothing can leave them in place; then a new
        # lock, as a thread of the parent may have held the old one at the fork.
        self.block = b""
        self.at = 0
        self.lock = threading.Lock()


_NONCES: Final = _NonceBlock()
os.register_at_fork(after_in_child=_NONCES.forget)


def random_nonce(n: int) -> bytes:
    """`n` unpredictable bytes from the kernel's CSPRNG, never handed out twice (see above)."""
    return _NONCES.take(n)

MAX_KEY_ID: Final = 0xFFFF_FFFF
# Both length prefixes in the associated data are u16.
_MAX_AAD_FIELD: Final = 0xFFFF

# Shortest well-formed cell per suite: header + nonce + tag, header + SIV.
_MIN_LEN: Final = {
    SUITE_RANDOMIZED: HEADER_LEN + GCM_NONCE_LEN + GCM_TAG_LEN,
    SUITE_DETERMINISTIC: HEADER_LEN + SIV_TAG_LEN,
}

# Derived ciphers kept per CellKey. A policy names far fewer columns than
# this; the bound only stops a caller bug from growing memory forever.
_MAX_CACHED_COLUMNS: Final = 4096


class CellError(Exception):
    """A cell cannot be opened. Raised for every failure of `open`/`read_cell_header`.

    Deliberately one type with one fixed message: whether the version, suite,
    length, key id, tenant, column or tag was wrong is not revealed, so error
    text can never become an oracle or leak anything about the cell.
    """

    def __init__(self) -> None:
        super().__init__("cell cannot be opened")


@dataclass(frozen=True, slots=True)
class CellHeader:
    """The clear header of a cell: which format, which suite, which key."""

    version: int
    suite: int
    key_id: int


def read_cell_header(cell: bytes | bytearray | memoryview) -> CellHeader:
    """Parse a cell's clear header without any key.

    Returns the header only if the version and suite are known and the cell
    is long enough for that suite; otherwise raises `CellError`. A valid
    header says nothing about authenticity: only `CellKey.open` checks that.
    """
    key_id = cell_key_id(cell)  # first: it validates the length the suite is read from
    return CellHeader(FORMAT_VERSION, cell[1], key_id)


def cell_key_id(cell: bytes | bytearray | memoryview) -> int:
    """The key id of a cell whose header `read_cell_header` accepts (else `CellError`):
    which key to fetch, found once per cell read, without building a CellHeader."""
    n = len(cell)
    if n < HEADER_LEN or cell[0] != FORMAT_VERSION:
        raise CellError
    shortest = _MIN_LEN.get(cell[1])
    if shortest is None or n < shortest:
        raise CellError
    if isinstance(cell, bytes):
        # Compiled, byte reads beat a slice and int.from_bytes (once per cell opened).
        return cell[2] << 24 | cell[3] << 16 | cell[4] << 8 | cell[5]
    return int.from_bytes(cell[2:HEADER_LEN], "big")


def wipe(buf: bytearray) -> None:
    """Overwrite `buf` with zeros in place (best effort).

    Python gives no guarantee that no other copy exists (immutable `bytes`
    the key came from, buffers inside OpenSSL, swapped-out pages); this only
    shortens the life of the copy the caller owns.
    """
    # Same-length slice assignment writes into the existing buffer, no realloc.
    buf[:] = bytes(len(buf))


def _length_prefixed(field: str, what: str) -> bytes:
    raw = field.encode("utf-8")
    if len(raw) > _MAX_AAD_FIELD:
        raise ValueError(f"{what} is longer than {_MAX_AAD_FIELD} bytes")
    return len(raw).to_bytes(2, "big") + raw


class _Gcm:
    """AES-256-GCM bound to one column's header and associated data."""

    __slots__ = ("aad", "aead", "header")

    def __init__(self, key: bytes, header: bytes, aad: bytes) -> None:
        self.aead = AESGCM(key)
        self.header = header
        self.aad = aad


class _Siv:
    """AES-256-SIV bound to one column's header and associated data."""

    __slots__ = ("cipher", "header")

    def __init__(self, key: bytes, header: bytes, aad: bytes) -> None:
        self.cipher = SivCipher(key, aad)
        self.header = header


class CellKey:
    """One tenant data key (DEK), ready to seal and open cells.

    Built from the key id stored in every cell header, the tenant the key
    belongs to (bound into the associated data) and the 32-byte DEK.
    `random_nonce(n)` must return n unpredictable bytes; it is only
    replaced in tests (known-answer vectors).

    The first use of a (suite, column) pair runs HKDF and builds the cipher;
    later uses reuse it. `column` must be the fully qualified
    "schema.table.column" exactly as the policy names it: the same column
    spelled two ways is two different columns to this class.
    """

    __slots__ = ("_dek", "_gcm", "_gcm_header", "_random_nonce", "_siv", "_siv_header",
                 "_tenant_field", "key_id", "tenant")

    def __init__(
        self,
        key_id: int,
        tenant: str,
        dek: bytes | bytearray,
        *,
        random_nonce: Callable[[int], bytes] = random_nonce,
    ) -> None:
        if not 0 <= key_id <= MAX_KEY_ID:
            raise ValueError("key_id must fit in an unsigned 32-bit integer")
        if len(dek) != DEK_LEN:
            raise ValueError("a data key is exactly 32 bytes")
        self.key_id = key_id
        self.tenant = tenant
        self._tenant_field = _length_prefixed(tenant, "tenant")
        # Our own mutable copy, so close() can zero it.
        self._dek: bytearray | None = bytearray(dek)
        self._random_nonce = random_nonce
        key_bytes = key_id.to_bytes(4, "big")
        self._gcm_header = bytes((FORMAT_VERSION, SUITE_RANDOMIZED)) + key_bytes
        self._siv_header = bytes((FORMAT_VERSION, SUITE_DETERMINISTIC)) + key_bytes
        self._gcm: dict[str, _Gcm] = {}
        self._siv: dict[str, _Siv] = {}

    def __repr__(self) -> str:
        # Never the key, never a derived key.
        return f"CellKey(key_id={self.key_id}, tenant={self.tenant!r})"

    # -- derivation (cold path) ------------------------------------------

    def _subkey(self, suite: int, column: str, length: int) -> tuple[bytes, bytes]:
        """Return (subkey, associated data) for one suite and column."""
        if self._dek is None:
            raise ValueError("this CellKey was closed")
        info = bytes((suite,)) + column.encode("utf-8")
        hkdf = HKDF(algorithm=SHA256(), length=length, salt=HKDF_SALT, info=info)
        subkey = hkdf.derive(self._dek)
        header = self._gcm_header if suite == SUITE_RANDOMIZED else self._siv_header
        aad = AAD_LABEL + header + self._tenant_field + _length_prefixed(column, "column")
        return subkey, aad

    def _gcm_for(self, column: str) -> _Gcm:
        entry = self._gcm.get(column)
        if entry is None:
            key, aad = self._subkey(SUITE_RANDOMIZED, column, GCM_KEY_LEN)
            entry = _Gcm(key, self._gcm_header, aad)
            if len(self._gcm) >= _MAX_CACHED_COLUMNS:
                self._gcm.clear()
            self._gcm[column] = entry
        return entry

    def _siv_for(self, column: str) -> _Siv:
        entry = self._siv.get(column)
        if entry is None:
            key, aad = self._subkey(SUITE_DETERMINISTIC, column, SIV_KEY_LEN)
            entry = _Siv(key, self._siv_header, aad)
            if len(self._siv) >= _MAX_CACHED_COLUMNS:
                self._siv.clear()
            self._siv[column] = entry
        return entry

    # -- hot path ----------------------------------------------------------

    def seal(self, column: str, plaintext: bytes, *, deterministic: bool) -> bytes:
        """Seal `plaintext` for `column` under this key; return the cell bytes.

        deterministic=False (AES-256-GCM): every call gives a different cell.
        deterministic=True (AES-256-SIV): the same (key, column, plaintext)
        always gives the same cell; see `proxy.crypto.deterministic` for what
        that leaks.
        """
        if deterministic:
            siv = self._siv_for(column)
            return siv.header + siv.cipher.seal(plaintext)
        gcm = self._gcm_for(column)
        nonce = self._random_nonce(GCM_NONCE_LEN)
        if len(nonce) != GCM_NONCE_LEN:
            raise ValueError("random_nonce returned the wrong number of bytes")
        return gcm.header + nonce + gcm.aead.encrypt(nonce, plaintext, gcm.aad)

    def open(self, column: str, cell: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt a cell read from `column`; return the plaintext.

        Raises `CellError` (and nothing else) unless the cell was sealed by
        this very key, for this tenant and this column, and is unmodified.
        The header's key id must equal `self.key_id`: there is no trial
        decryption with other keys.
        """
        try:
            suite = cell[1]
            if suite == SUITE_RANDOMIZED:
                gcm = self._gcm_for(column)
                if cell[:HEADER_LEN] != gcm.header or len(cell) < _MIN_LEN[SUITE_RANDOMIZED]:
                    raise CellError
                nonce_end = HEADER_LEN + GCM_NONCE_LEN
                return gcm.aead.decrypt(cell[HEADER_LEN:nonce_end], cell[nonce_end:], gcm.aad)
            if suite == SUITE_DETERMINISTIC:
                siv = self._siv_for(column)
                if cell[:HEADER_LEN] != siv.header or len(cell) < _MIN_LEN[SUITE_DETERMINISTIC]:
                    raise CellError
                return siv.cipher.open(cell[HEADER_LEN:])
        except (InvalidTag, IndexError):
            pass
        # Raised here, after the handler, not in it: the cause must not travel with the error,
        # and an error raised outside a handler has no __context__ at all (the compiled build
        # does not honour `from None`'s __suppress_context__).
        raise CellError

    def close(self) -> None:
        """Forget the DEK and every derived cipher (best-effort zeroing).

        After `close`, `seal` and `open` raise ValueError: the key is gone.
        """
        if self._dek is not None:
            wipe(self._dek)
            self._dek = None
        self._gcm.clear()
        self._siv.clear()
