"""Deterministic sealing (AES-256-SIV, RFC 5297) for columns searched by equality.

WARNING: deterministic encryption leaks equality. Within one tenant and one
column, the same value always gives the same cell, so anyone who can read the
stored cells (a DBA, a backup, the WAL) learns which rows share a value, how
often each value occurs, and, from the cell length, roughly how long it is.
With a small value space (booleans, dates of birth, country codes) that is
often enough to guess the values themselves. Use it only where `=`/`IN`/UNIQUE
on the encrypted column is worth that loss; the randomized suite (AES-256-GCM,
`cells.SUITE_RANDOMIZED`) leaks nothing but length.

Cells from different tenants (different data keys) or different columns
(different HKDF subkeys and associated data) never match each other.

This module only wraps the primitive; the cell layout, key derivation and
associated data are defined in `proxy.crypto.cells`, which is the one place
callers go through.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

#: AES-256-SIV takes two AES-256 keys (CMAC and CTR): 512 bits in all.
SIV_KEY_LEN: Final = 64

#: The synthetic IV that starts every SIV ciphertext; it is also the tag.
SIV_TAG_LEN: Final = 16


class SivCipher:
    """One AES-256-SIV key, bound to one associated-data string.

    `seal` is a pure function of (key, associated data, plaintext): the same
    inputs always give the same bytes (SIV || ciphertext, RFC 5297 order).
    `open` raises `cryptography.exceptions.InvalidTag` on any mismatch; the
    cell layer turns that into its one opaque error.
    """

    __slots__ = ("_aad", "_siv")

    def __init__(self, key: bytes, aad: bytes) -> None:
        if len(key) != SIV_KEY_LEN:
            raise ValueError("AES-256-SIV needs a 64-byte key")
        if not aad:
            # OpenSSL < 3.0.10 silently skipped empty associated data
            # (CVE-2023-2975); ours is never empty, and must not become so.
            raise ValueError("associated data must not be empty")
        self._siv = AESSIV(key)
        # A one-element list built once: the hot path allocates nothing extra.
        self._aad = [aad]

    def seal(self, plaintext: bytes) -> bytes:
        return self._siv.encrypt(plaintext, self._aad)

    def open(self, body: bytes | bytearray | memoryview) -> bytes:
        return self._siv.decrypt(body, self._aad)
