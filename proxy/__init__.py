"""pgseal: a PostgreSQL wire-protocol proxy that seals configured columns per tenant."""

from proxy._native import use_pure_sources

__version__ = "0.1.0"

# Before anything can import a compiled module: the pure build when asked or when the
# compiled one is stale (proxy/_native.py).
PURE_REASON = use_pure_sources()
