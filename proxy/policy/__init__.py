"""Column policy (DESIGN.md section 5): model and YAML loader. Pure: no I/O but reading files."""

from proxy.policy.loader import PolicyError, load_policies
from proxy.policy.model import (
    COLUMN_TYPES,
    ColumnPolicy,
    ColumnType,
    Isolation,
    OnDenied,
    PolicySet,
    Search,
    TableKey,
    TablePolicy,
)

__all__ = [
    "COLUMN_TYPES",
    "ColumnPolicy",
    "ColumnType",
    "Isolation",
    "OnDenied",
    "PolicyError",
    "PolicySet",
    "Search",
    "TableKey",
    "TablePolicy",
    "load_policies",
]
