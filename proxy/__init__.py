"""pgseal: a PostgreSQL wire-protocol proxy that seals configured columns per tenant."""

__version__ = "0.1.0"
