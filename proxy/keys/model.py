"""What the key service hands out: data keys ready for cells, and key facts for listings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from proxy.crypto.cells import CellKey


@dataclass(frozen=True, slots=True)
class DataKey:
    """A tenant data key, unwrapped and ready: seal and open cells with `cell_key`.

    `state` is "active" (seal and open) or "retired" (open only: a newer version exists).
    The data path must seal only with the key `KeyService.current_key` returns.
    """

    key_id: int
    tenant: str
    version: int
    state: str
    kek: str
    cell_key: CellKey

    def __repr__(self) -> str:  # never the key
        return (f"DataKey(key_id={self.key_id}, tenant={self.tenant!r}, "
                f"version={self.version}, state={self.state!r})")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A keystore row as `pgseal keys list` shows it (no key material, not even wrapped)."""

    key_id: int
    tenant: str
    version: int
    state: str
    kek: str
    created_at: datetime
    rotated_at: datetime | None
    destroyed_at: datetime | None


@dataclass(frozen=True, slots=True)
class MasterRotation:
    """Outcome of `KeyService.rotate_master`."""

    new_kek: str
    old_keks: tuple[str, ...]  # destroyed on the token by this run
    rewrapped: int
    resumed: bool  # an interrupted earlier rotation was completed
