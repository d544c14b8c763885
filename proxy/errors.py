"""Errors that reach a user: each carries the SQLSTATE the proxy answers with.

The CLI prints `pgseal: <message>` (one line, no traceback) and exits 1; the
proxy sends an ErrorResponse with `sqlstate`. Messages never contain a
plaintext value or key material.
"""

from __future__ import annotations

from typing import TypeVar


class PgsealError(Exception):
    sqlstate = "XX000"


class UnsupportedStatement(PgsealError):
    """The statement touches a protected column in a way the proxy cannot handle."""

    sqlstate = "0A000"


class AccessDenied(PgsealError):
    """Tenant or role denial."""

    sqlstate = "42501"


class KeyServiceUnavailable(PgsealError):
    """HSM, keystore or audit sink unavailable: the key use fails closed."""

    sqlstate = "58030"


class KeyNotFound(PgsealError):
    """No key with that id/tenant, or it was destroyed (crypto-shredded)."""

    sqlstate = "58030"


_E = TypeVar("_E", bound=BaseException)


def without_context(error: _E) -> _E:
    """`raise without_context(X)` in an except block does what `raise X from None` means:
    the error being handled (which may hold a client's bytes: a UnicodeDecodeError keeps
    the whole value) is not shown with X in any traceback. Setting __cause__ sets
    __suppress_context__ too. The compiled build (proxy/_native.py) needs this: mypyc
    leaves __suppress_context__ False for `from None`."""
    error.__cause__ = None
    return error
