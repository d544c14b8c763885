"""Keys (DESIGN.md 7): HSM master key, wrapped tenant data keys, cache, lifecycle."""

from proxy.keys.model import DataKey, KeyInfo, MasterRotation
from proxy.keys.service import KeyExists, KeyService

__all__ = ["DataKey", "KeyExists", "KeyInfo", "KeyService", "MasterRotation"]
