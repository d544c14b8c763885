"""Pure cryptography for pgseal: no I/O, no asyncio, no sockets.

- `cells`: the sealed cell format (DESIGN.md section 8), per-column subkeys,
  AES-256-GCM sealing and opening with one opaque error.
- `deterministic`: the AES-256-SIV suite used for equality search, with
  what it leaks.
- `values`: canonical encodings of the declared column types, and
  PostgreSQL's exact text and binary output for them.

Import the submodules directly; this package re-exports nothing.
"""
