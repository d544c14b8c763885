"""PKCS#11 access to the master key (KEK), for any PKCS#11 module; SoftHSM2 embedded by default.

Theory of operation
-------------------
python-pkcs11 calls ``C_Initialize(NULL)``: no locking callbacks, so a module such as
SoftHSM2 runs without internal locks. Every PKCS#11 call therefore happens on ONE thread
per process (a single-worker executor); coroutines await its futures and the event loop
never blocks on the HSM. That thread owns all PKCS#11 state: the loaded module and one
``_TokenLink`` per (module, token) holding a logged-in session and the handles of master
keys found so far. Several ``HsmClient`` objects in one process (two key services, a CLI
command and a test) share a link, because PKCS#11 login state belongs to the application
and token: a second ``C_Login`` would fail with USER_ALREADY_LOGGED_IN.

Master keys are AES-256 keys generated on the token: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
not CKA_EXTRACTABLE, usable only to encrypt and decrypt. They share the configured label and
are told apart by CKA_ID; ``kek`` (the hex of that id) is the name the keystore records next
to each wrapped data key and binds into its AAD. A token holds a few at most: master-key
rotation adds one, re-wraps, then destroys the old one.

Wrapping a data key is ``C_Encrypt`` with CKM_AES_GCM (a random 96-bit nonce, the AAD given
by the caller); unwrapping is ``C_Decrypt``. We deliberately do not use ``C_WrapKey`` with
SoftHSM2's CKM_AES_KEY_WRAP_PAD, whose output does not follow RFC 5649, so wrapped keys
would not move to another HSM.

Faults (module missing, token missing, wrong PIN, device gone) surface as
``KeyServiceUnavailable`` with one line naming the module and token, never the PIN. The link
reconnects lazily on the next call, so the proxy recovers once the fault clears. A PIN the
token rejected is not tried again in this process (a real HSM locks its user PIN after a
few wrong tries); a changed PIN source (``file:`` edited) is tried at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11.mechanisms import GCMParams

from proxy.config import Config, ConfigError, HsmConfig, resolve_secret
from proxy.errors import KeyServiceUnavailable

log = logging.getLogger("pgseal.keys.hsm")

_T = TypeVar("_T")

DEK_PURPOSE = b"pgseal-dek/v1"
GCM_NONCE_BYTES = 12
KEK_ID_BYTES = 8

# --- the one PKCS#11 thread -------------------------------------------------

_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pkcs11_executor() -> ThreadPoolExecutor:
    """The process-wide single thread every PKCS#11 call runs on (created on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgseal-pkcs11")
        return _executor


def run_on_pkcs11_thread(fn: Callable[[], _T]) -> _T:
    """Run `fn` on the PKCS#11 thread and wait (for synchronous callers: the CLI, fixtures)."""
    return _pkcs11_executor().submit(fn).result()


async def _run(fn: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(_pkcs11_executor(), fn)


# --- pure helpers -------------------------------------------------------------


def dek_aad(tenant: str, version: int, kek: str) -> bytes:
    """AAD of a wrapped data key: purpose, tenant, version and master key id, length-prefixed.

    A wrapped key copied to another tenant's or version's row, or re-labelled with another
    master key, fails to unwrap instead of yielding a key.
    """
    t = tenant.encode()
    k = kek.encode()
    return b"".join(
        (
            struct.pack(">H", len(DEK_PURPOSE)), DEK_PURPOSE,
            struct.pack(">H", len(t)), t,
            struct.pack(">I", version),
            struct.pack(">H", len(k)), k,
        )
    )


def is_softhsm(module: str) -> bool:
    return "softhsm" in Path(module).name.lower()


@dataclass(frozen=True, slots=True)
class MasterKeyInfo:
    """A master key as read back from the token (attribute values, never key material)."""

    kek: str  # hex of CKA_ID
    label: str
    key_bits: int
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    local: bool  # generated on the token


@dataclass(frozen=True, slots=True)
class SofthsmToken:
    """What `ensure_softhsm_token` found or made."""

    conf: Path
    token_dir: Path | None  # None when SOFTHSM2_CONF came from the environment
    created: bool


# --- SoftHSM2 embedded default -------------------------------------------------


def softhsm_conf_path(config: Config) -> Path:
    """The softhsm2.conf in effect: $SOFTHSM2_CONF if set, else the embedded one."""
    env = os.environ.get("SOFTHSM2_CONF")
    if env:
        return Path(env)
    return config.path(config.hsm.softhsm_dir).resolve() / "softhsm2.conf"


def prepare_softhsm_env(config: Config, *, create: bool = False) -> SofthsmToken | None:
    """Point SoftHSM2 at the embedded token folder unless SOFTHSM2_CONF is already set.

    Must run before the module is first loaded in this process: SoftHSM2 reads its
    configuration in C_Initialize. With `create`, the folder and conf are made (0700).
    Returns None for a module that is not SoftHSM2.
    """
    if not is_softhsm(config.hsm.module):
        return None
    if os.environ.get("SOFTHSM2_CONF"):
        return SofthsmToken(Path(os.environ["SOFTHSM2_CONF"]), None, False)
    base = config.path(config.hsm.softhsm_dir).resolve()
    conf = base / "softhsm2.conf"
    tokens = base / "tokens"
    if create:
        tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(base, 0o700)
        if not conf.exists():
            conf.write_text(
                "# pgseal embedded SoftHSM2 token (written by `pgseal hsm init`)\n"
                f"directories.tokendir = {tokens}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
            )
    if conf.exists():
        os.environ["SOFTHSM2_CONF"] = str(conf)
    return SofthsmToken(conf, tokens, False)


def ensure_softhsm_token(config: Config) -> SofthsmToken | None:
    """Create the SoftHSM2 token named by the config when it does not exist (idempotent).

    The SO PIN and user PIN come from `hsm.so_pin` / `hsm.pin` (env: or file:), are handed
    to the module in memory (never on a command line) and never logged.
    Returns None (and does nothing) for a module that is not SoftHSM2.
    """
    found = prepare_softhsm_env(config, create=True)
    if found is None:
        return None
    hsm = config.hsm

    def work() -> bool:
        lib = _load_module(hsm.module)
        if not any(link.session for link in _links.values() if link.module == hsm.module):
            # Read the token folder again: SoftHSM2 scans it in C_Initialize only, and
            # SOFTHSM2_CONF may have changed since this process first loaded the module.
            lib.reinitialize()
        if _find_token(lib, hsm.token_label) is not None:
            return False
        # Neither secret is resolved before we know the token is missing: a second
        # `hsm init` must not need the SO PIN.
        so_pin = resolve_secret(hsm.so_pin, "hsm.so_pin")
        user_pin = resolve_secret(hsm.pin, "hsm.pin")
        _init_softhsm_token(lib, hsm.module, hsm.token_label, so_pin, user_pin)
        return True

    created = run_on_pkcs11_thread(work)
    if created:
        log.info("created SoftHSM2 token %r (conf %s)", hsm.token_label, found.conf)
    return SofthsmToken(found.conf, found.token_dir, created)


def _init_softhsm_token(lib: Any, module: str, label: str, so_pin: str, user_pin: str) -> None:
    """C_InitToken on a free slot, then C_InitPIN. PKCS#11 thread only.

    python-pkcs11 has no C_InitToken, and softhsm2-util would need the PINs on its command
    line (visible in /proc), so we call the module's exported C_InitToken through ctypes:
    dlopen of the same path returns the handle python-pkcs11 already initialized.
    """
    free = [
        s for s in lib.get_slots(token_present=True)
        if not s.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        raise KeyServiceUnavailable(f"HSM module {module} has no free slot for token {label!r}")
    label_bytes = label.encode()
    if len(label_bytes) > 32:
        raise ConfigError(f"hsm.token_label: at most 32 bytes, got {label!r}")
    raw = ctypes.CDLL(module)
    init_token = raw.C_InitToken
    init_token.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    init_token.restype = ctypes.c_ulong
    so = so_pin.encode()
    rv = init_token(free[0].slot_id, so, len(so), label_bytes.ljust(32, b" "))
    if rv != 0:
        raise KeyServiceUnavailable(
            f"HSM module {module}: C_InitToken for {label!r} failed (CKR 0x{rv:x})"
        )
    token = lib.get_token(token_label=label)
    with token.open(rw=True, so_pin=so_pin) as so_session:
        so_session.init_pin(user_pin)


# --- module and token links (PKCS#11 thread only) ------------------------------

_modules: dict[str, Any] = {}
_links: dict[tuple[str, str], _TokenLink] = {}


def _load_module(module: str) -> Any:
    lib = _modules.get(module)
    if lib is not None:
        return lib
    if not Path(module).exists():
        raise KeyServiceUnavailable(f"HSM module {module} not found (hsm.module)")
    try:
        lib = pkcs11.lib(module)
    except pkcs11.PKCS11Error as exc:
        raise KeyServiceUnavailable(f"HSM module {module} cannot be loaded: {exc}") from None
    _modules[module] = lib
    return lib


def _find_token(lib: Any, label: str) -> Any | None:
    for token in lib.get_tokens(token_label=label):
        return token
    return None


class _TokenLink:
    """A logged-in session on one token plus master key handles. PKCS#11 thread only."""

    def __init__(self, module: str, token_label: str) -> None:
        self.module = module
        self.token_label = token_label
        self.session: Any | None = None
        self.refs = 0
        self.keys: dict[tuple[str, str], Any] = {}  # (label, kek) -> SecretKey handle
        self.rejected_pin: bytes | None = None  # sha256 of the last PIN the token refused

    def where(self) -> str:
        return f"token {self.token_label!r} of HSM module {self.module}"

    def drop(self) -> None:
        """Forget the session (after a fault); the next call logs in again."""
        session, self.session = self.session, None
        self.keys.clear()
        if session is not None:
            try:
                session.close()
            except pkcs11.PKCS11Error:
                pass  # the session is already gone: that is why we drop it

    def connect(self, pin: str) -> Any:
        if self.session is not None:
            return self.session
        lib = _load_module(self.module)
        token = _find_token(lib, self.token_label)
        if token is None and not any(link.session for link in _links.values()
                                     if link.module == self.module):
            # SoftHSM2 reads its token folder in C_Initialize only: a token created by
            # another process (`pgseal hsm init`) appears after a re-initialization, which
            # is safe here because no session of this module is open.
            lib.reinitialize()
            token = _find_token(lib, self.token_label)
        if token is None:
            raise KeyServiceUnavailable(
                f"HSM token {self.token_label!r} not found in {self.module}: run `pgseal hsm init`"
            )
        digest = hashlib.sha256(pin.encode()).digest()
        if digest == self.rejected_pin:
            raise KeyServiceUnavailable(
                f"HSM login to {self.where()} refused earlier with this PIN; not retrying it "
                "(fix the PIN source named by hsm.pin)"
            )
        try:
            try:
                self.session = token.open(rw=True, user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:
                # Login state is per application and token: sessions orphaned by a fault
                # still hold it (and SoftHSM2 then skips the PIN check). Close them and log
                # in afresh, so the PIN is really checked.
                _close_orphans(self.module, token)
                self.session = token.open(rw=True, user_pin=pin)
        except pkcs11.PKCS11Error as exc:
            # python-pkcs11 opened a session before C_Login failed and does not close it:
            # close it here (this link owns every session of this process on the token).
            _close_orphans(self.module, token)
            if isinstance(exc, pkcs11.PinIncorrect):
                self.rejected_pin = digest
                reason = "wrong PIN (hsm.pin)"
            elif isinstance(exc, pkcs11.PinLocked):
                reason = "PIN locked"
            else:
                reason = type(exc).__name__
            raise KeyServiceUnavailable(f"HSM login to {self.where()} failed: {reason}") from None
        self.rejected_pin = None
        return self.session


def _close_orphans(module: str, token: Any) -> None:
    """C_CloseAllSessions on the token's slot (python-pkcs11 does not expose it)."""
    try:
        close_all = ctypes.CDLL(module).C_CloseAllSessions
        close_all.argtypes = [ctypes.c_ulong]
        close_all.restype = ctypes.c_ulong
        close_all(token.slot.slot_id)
    except (OSError, AttributeError):
        pass  # a module without the export: the session leaks until the process ends


def _link(module: str, token_label: str) -> _TokenLink:
    key = (module, token_label)
    link = _links.get(key)
    if link is None:
        link = _links[key] = _TokenLink(module, token_label)
    return link


# --- the async client ------------------------------------------------------------


class HsmClient:
    """Master-key operations on one token; every call runs on the PKCS#11 thread.

    `calls` counts round trips to the HSM thread (a cached key use must leave it unchanged);
    `unwraps` and `wraps` count data-key operations.
    """

    def __init__(self, hsm: HsmConfig) -> None:
        self.module = hsm.module
        self.token_label = hsm.token_label
        self.master_label = hsm.master_key_label
        self._pin_ref = hsm.pin
        self.calls = 0
        self.unwraps = 0
        self.wraps = 0
        self._opened = False

    # -- plumbing

    def _work(self, op: Callable[[Any, _TokenLink], _T], what: str) -> Callable[[], _T]:
        """op(session, link) as a job for the PKCS#11 thread: log in lazily, retry once."""
        try:
            pin = resolve_secret(self._pin_ref, "hsm.pin")
        except ConfigError as exc:
            raise KeyServiceUnavailable(str(exc)) from None
        module, label = self.module, self.token_label

        def work() -> _T:
            link = _link(module, label)
            for attempt in (1, 2):
                try:
                    session = link.connect(pin)
                except pkcs11.PKCS11Error as exc:  # slot listing, re-initialization
                    link.drop()
                    raise KeyServiceUnavailable(
                        f"HSM {what} on {link.where()} failed: {type(exc).__name__}"
                    ) from None
                try:
                    return op(session, link)
                except (KeyServiceUnavailable, _IntegrityFailure):
                    raise
                except pkcs11.PKCS11Error as exc:
                    # Session or device trouble (token removed, module re-initialized,
                    # handle invalid): log in again once; a second failure is reported.
                    link.drop()
                    if attempt == 2:
                        raise KeyServiceUnavailable(
                            f"HSM {what} on {link.where()} failed: {type(exc).__name__}"
                        ) from None
            raise AssertionError("unreachable")  # pragma: no cover

        self.calls += 1
        return work

    async def _call(self, op: Callable[[Any, _TokenLink], _T], what: str) -> _T:
        return await _run(self._work(op, what))

    def call_sync(self, op: Callable[[Any, _TokenLink], _T], what: str) -> _T:
        """The same for synchronous callers (CLI, fixtures); never from the event loop."""
        return run_on_pkcs11_thread(self._work(op, what))

    async def open(self) -> None:
        """Log in (once per process and token) and take a reference on the shared session."""
        if self._opened:
            return

        def ref(session: Any, link: _TokenLink) -> None:
            link.refs += 1

        await self._call(ref, "login")
        self._opened = True

    async def close(self) -> None:
        """Release the shared session; the last client to leave logs out."""
        if not self._opened:
            return
        self._opened = False
        module, label = self.module, self.token_label

        def unref() -> None:
            link = _links.get((module, label))
            if link is None:
                return
            link.refs -= 1
            if link.refs <= 0:
                link.drop()

        await _run(unref)

    # -- master keys

    def _list_op(self) -> Callable[[Any, _TokenLink], list[MasterKeyInfo]]:
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> list[MasterKeyInfo]:
            found = session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
            )
            return sorted((_describe(k) for k in found), key=lambda m: m.kek)

        return op

    async def list_masters(self) -> list[MasterKeyInfo]:
        """Every master key with the configured label on the token, attributes read back."""
        return await self._call(self._list_op(), "master key listing")

    def ensure_master_sync(self) -> tuple[list[MasterKeyInfo], bool]:
        """The master keys on the token, generating the first when there is none.

        Synchronous (for `pgseal hsm init` and test fixtures); returns (keys, created).
        """
        found = self.call_sync(self._list_op(), "master key listing")
        if found:
            return found, False
        return [self.call_sync(self._generate_op(None), "master key generation")], True

    async def generate_master(self, kek: str | None = None) -> MasterKeyInfo:
        """Generate a new AES-256 master key on the token (label from config, id `kek`)."""
        info = await self._call(self._generate_op(kek), "master key generation")
        log.info("generated master key %s/%s on token %r", self.master_label, info.kek,
                 self.token_label)
        return info

    def _generate_op(self, kek: str | None) -> Callable[[Any, _TokenLink], MasterKeyInfo]:
        kek = kek or secrets.token_hex(KEK_ID_BYTES)
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> MasterKeyInfo:
            existing = _find_master(session, label, kek)
            if existing is not None:  # a resumed rotation already made it
                return _describe(existing)
            key = session.generate_key(
                KeyType.AES, 256, id=bytes.fromhex(kek), label=label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.TOKEN: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
            link.keys[(label, kek)] = key
            return _describe(key)

        return op

    async def destroy_master(self, kek: str) -> bool:
        """Destroy one master key on the token; False when it was already gone."""
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> bool:
            link.keys.pop((label, kek), None)
            key = _find_master(session, label, kek)
            if key is None:
                return False
            key.destroy()
            return True

        done = await self._call(op, "master key destruction")
        if done:
            log.info("destroyed master key %s/%s on token %r", label, kek, self.token_label)
        return done

    def forget_handles(self) -> None:
        """Drop cached key handles at the next call (another process rotated the master key)."""
        module, label = self.module, self.token_label

        def clear() -> None:
            link = _links.get((module, label))
            if link is not None:
                link.keys.clear()

        _pkcs11_executor().submit(clear)

    # -- data keys

    async def wrap(self, kek: str, dek: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt a data key under master key `kek` on the HSM: returns (nonce, wrapped)."""
        nonce = os.urandom(GCM_NONCE_BYTES)
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> bytes:
            key = _master_handle(session, link, label, kek)
            out: bytes = key.encrypt(
                dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
            )
            return out

        wrapped = await self._call(op, "data key wrap")
        self.wraps += 1
        return nonce, wrapped

    async def unwrap(self, kek: str, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key on the HSM; KeyServiceUnavailable if it does not verify."""
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> bytes:
            key = _master_handle(session, link, label, kek)
            try:
                out: bytes = key.decrypt(
                    wrapped, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
                )
            except (pkcs11.GeneralError, pkcs11.EncryptedDataInvalid,
                    pkcs11.EncryptedDataLenRange, pkcs11.FunctionFailed):
                # SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR; others use
                # ENCRYPTED_DATA_INVALID. Check the session is healthy before blaming the data.
                session.generate_random(8 * 8)
                raise _IntegrityFailure from None
            return out

        try:
            dek = await self._call(op, "data key unwrap")
        except _IntegrityFailure:
            raise KeyServiceUnavailable(
                f"a wrapped data key failed to verify under master key {kek} "
                "(keystore row altered or moved)"
            ) from None
        self.unwraps += 1
        return dek


    async def unwrap_many(
        self, items: Sequence[tuple[str, bytes, bytes, bytes]]
    ) -> list[bytes | None]:
        """Unwrap several data keys, (kek, nonce, wrapped, aad) each, in ONE trip to the HSM
        thread (a cold cache after a restart misses on many tenants at once).

        None in place of a key that does not verify or whose master key is not on the token
        (the caller retries those one by one for the precise error); a fault of the HSM
        itself raises KeyServiceUnavailable for all.
        """
        if not items:
            return []
        label = self.master_label

        def op(session: Any, link: _TokenLink) -> list[bytes | None]:
            out: list[bytes | None] = []
            for kek, nonce, wrapped, aad in items:
                try:
                    key = _master_handle(session, link, label, kek)
                    out.append(key.decrypt(wrapped, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=GCMParams(nonce, aad)))
                except KeyServiceUnavailable:
                    out.append(None)  # master key not on the token
                except (pkcs11.GeneralError, pkcs11.EncryptedDataInvalid,
                        pkcs11.EncryptedDataLenRange, pkcs11.FunctionFailed):
                    out.append(None)
            if None in out:
                session.generate_random(8 * 8)  # the session is healthy: blame the data
            return out

        deks = await self._call(op, "data key unwrap")
        self.unwraps += sum(1 for d in deks if d is not None)
        return deks


class _IntegrityFailure(Exception):
    """The HSM is fine but the wrapped key does not authenticate (internal signal)."""


def _find_master(session: Any, label: str, kek: str) -> Any | None:
    for key in session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label,
         Attribute.ID: bytes.fromhex(kek)}
    ):
        return key
    return None


def _master_handle(session: Any, link: _TokenLink, label: str, kek: str) -> Any:
    key = link.keys.get((label, kek))
    if key is None:
        key = _find_master(session, label, kek)
        if key is None:
            raise KeyServiceUnavailable(
                f"master key {label}/{kek} not found on {link.where()}"
            )
        link.keys[(label, kek)] = key
    return key


def _describe(key: Any) -> MasterKeyInfo:
    attrs = key.get_attributes([
        Attribute.ID, Attribute.LABEL, Attribute.VALUE_LEN, Attribute.SENSITIVE,
        Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
        Attribute.LOCAL,
    ])
    return MasterKeyInfo(
        kek=bytes(attrs[Attribute.ID]).hex(),
        label=str(attrs[Attribute.LABEL]),
        key_bits=int(attrs[Attribute.VALUE_LEN]) * 8,
        sensitive=bool(attrs[Attribute.SENSITIVE]),
        extractable=bool(attrs[Attribute.EXTRACTABLE]),
        always_sensitive=bool(attrs[Attribute.ALWAYS_SENSITIVE]),
        never_extractable=bool(attrs[Attribute.NEVER_EXTRACTABLE]),
        local=bool(attrs[Attribute.LOCAL]),
    )
