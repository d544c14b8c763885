"""pgseal configuration: YAML file, then PGSEAL_* environment, then command-line flags.

Every key of DESIGN.md section 4 is known here; an unknown key anywhere is an
error naming it (a security tool must not silently ignore a misspelt setting).
Environment variables map onto keys by upper-casing the dotted path with `_`:
`PGSEAL_LISTEN`, `PGSEAL_UPSTREAM`, `PGSEAL_HSM_MODULE`, `PGSEAL_KEYSTORE_DSN`,
`PGSEAL_CACHE_TTL_SECONDS`, `PGSEAL_POLICIES` (os.pathsep-separated) ...
`PGSEAL_HSM_PIN` is not an override: it is the default *source* of the PIN
(`hsm.pin: "env:PGSEAL_HSM_PIN"`), so it holds the secret itself.

Secrets are never stored in this object: `hsm.pin` stays a reference
(`env:NAME` or `file:PATH`) until `resolve_secret` is called at the point of use.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator (one line). `unknown_key`: the
    dotted key that is not a config key, when that is the problem (load_config then says
    on which line of the file it is)."""

    def __init__(self, message: str, *, unknown_key: str | None = None) -> None:
        super().__init__(message)
        self.unknown_key = unknown_key


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "address") -> HostPort:
        text = str(text).strip()
        if text.startswith("["):  # [::1]:6432
            host, sep, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            if not sep or not port_text:
                raise ConfigError(f"{what}: expected [HOST]:PORT, got {text!r}")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{what}: port must be a number, got {port_text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{what}: port out of range: {port}")
        return cls(host or "127.0.0.1", port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


SSLMODES = ("disable", "prefer", "require", "verify-full")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    sslmode: str = "prefer"
    root_cert: str | None = None

    def __post_init__(self) -> None:
        if self.sslmode not in SSLMODES:
            raise ConfigError(
                f"upstream_tls.sslmode: one of {', '.join(SSLMODES)}, got {self.sslmode!r}"
            )
        if self.sslmode == "verify-full" and not self.root_cert:
            raise ConfigError("upstream_tls.root_cert is required with sslmode verify-full")


def default_softhsm_module() -> str:
    candidates = [
        "/usr/lib/softhsm/libsofthsm2.so",
        *sorted(glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")),
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    return candidates[0]


@dataclass(frozen=True, slots=True)
class HsmConfig:
    module: str = field(default_factory=default_softhsm_module)
    token_label: str = "pgseal"  # noqa: S105 - a token's name, not a secret
    pin: str = "env:PGSEAL_HSM_PIN"
    so_pin: str = "env:PGSEAL_HSM_SO_PIN"
    master_key_label: str = "pgseal-master"
    # Where `pgseal hsm init` keeps an embedded SoftHSM2 token (its own softhsm2.conf),
    # unless SOFTHSM2_CONF is already set in the environment.
    softhsm_dir: str = ".pgseal/hsm"

    def __post_init__(self) -> None:
        for name in ("pin", "so_pin"):
            check_secret_ref(getattr(self, name), f"hsm.{name}")


@dataclass(frozen=True, slots=True)
class KeystoreConfig:
    dsn: str = "postgresql://pgseal@127.0.0.1:5432/postgres"
    schema: str = "pgseal"
    auto_create: bool = True

    def __post_init__(self) -> None:
        if not self.schema.replace("_", "").isalnum() or self.schema[0].isdigit():
            raise ConfigError(f"keystore.schema: a plain identifier, got {self.schema!r}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl_seconds: float = 300.0
    max_entries: int = 10000
    max_uses: int = 1048576

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0 or self.max_entries <= 0 or self.max_uses <= 0:
            raise ConfigError("cache: ttl_seconds, max_entries and max_uses must be positive")


AUDIT_SINK_KINDS = ("jsonl", "postgres", "stdout")


@dataclass(frozen=True, slots=True)
class AuditSinkConfig:
    """One sink: kind jsonl (path), postgres (table) or stdout."""

    kind: str
    path: str | None = None
    table: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> AuditSinkConfig:
        if not isinstance(raw, Mapping) or len(raw) != 1:
            raise ConfigError(
                f"{where}: each sink is a mapping with one key: {', '.join(AUDIT_SINK_KINDS)}"
            )
        ((kind, value),) = raw.items()
        if kind == "jsonl":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.jsonl: a file path")
            return cls("jsonl", path=value)
        if kind == "postgres":
            value = value or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.postgres: a mapping like {{table: pgseal.audit}}")
            unknown = set(value) - {"table"}
            if unknown:
                raise ConfigError(f"{where}.postgres: unknown key {sorted(unknown)[0]!r}")
            return cls("postgres", table=str(value.get("table", "pgseal.audit")))
        if kind == "stdout":
            if value not in (None, {}):
                raise ConfigError(f"{where}.stdout takes no settings")
            return cls("stdout")
        raise ConfigError(f"{where}: unknown sink {kind!r} (one of {', '.join(AUDIT_SINK_KINDS)})")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    sinks: tuple[AuditSinkConfig, ...] = (AuditSinkConfig("jsonl", path="audit/pgseal.jsonl"),)
    on_failure: str = "block"

    def __post_init__(self) -> None:
        if self.on_failure not in ("block", "warn"):
            raise ConfigError(f"audit.on_failure: block or warn, got {self.on_failure!r}")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort | None = None


# Defaults from NIST SP 800-57 Part 1 Rev. 5, section 5.3.6, Table 1 ("Suggested
# cryptoperiods for key types"): a symmetric data-encryption key (our tenant data keys)
# and a symmetric key-wrapping key (our HSM master key) both have an originator-usage
# period of up to 2 years (recipient-usage up to that + 3 years: a retired data key keeps
# opening old cells meanwhile, and `pgseal rekey` moves them on before it is destroyed).
NIST_SYMMETRIC_OUP_DAYS = 730
MAX_CRYPTOPERIOD_DAYS = 36500  # a typo guard: a century is never meant


@dataclass(frozen=True, slots=True)
class CryptoperiodConfig:
    """How long a key may protect new data before it must be rotated (originator usage).

    `pgseal keys list` flags keys past it; with `rotate_on_schedule` every encrypting
    proxy checks every `check_interval_seconds` and one of them (advisory lock on the
    keystore) rotates the keys found due.
    """

    data_key_days: int = NIST_SYMMETRIC_OUP_DAYS
    master_key_days: int = NIST_SYMMETRIC_OUP_DAYS
    rotate_on_schedule: bool = False
    check_interval_seconds: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("data_key_days", "master_key_days"):
            days = getattr(self, name)
            if not 1 <= days <= MAX_CRYPTOPERIOD_DAYS:
                raise ConfigError(f"cryptoperiod.{name}: 1..{MAX_CRYPTOPERIOD_DAYS}, got {days}")
        if not 0 < self.check_interval_seconds <= 86400 * 7:
            raise ConfigError(
                "cryptoperiod.check_interval_seconds: more than 0 and at most a week "
                f"(604800), got {self.check_interval_seconds}"
            )


@dataclass(frozen=True, slots=True)
class Config:
    listen: HostPort = HostPort("127.0.0.1", 6432)
    upstream: HostPort = HostPort("127.0.0.1", 5432)
    workers: int = 1
    tls: TlsConfig | None = None
    upstream_tls: UpstreamTlsConfig = UpstreamTlsConfig()
    hsm: HsmConfig = field(default_factory=HsmConfig)
    keystore: KeystoreConfig = KeystoreConfig()
    cache: CacheConfig = CacheConfig()
    audit: AuditConfig = AuditConfig()
    policies: tuple[str, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    cryptoperiod: CryptoperiodConfig = CryptoperiodConfig()
    # Directory the relative paths above were written against (the config file's folder).
    base_dir: str = "."

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"workers: 1..256, got {self.workers}")

    def path(self, relative: str) -> Path:
        """A path from the config, resolved against the config file's folder."""
        p = Path(relative)
        return p if p.is_absolute() else Path(self.base_dir) / p


# --- secrets ---------------------------------------------------------------


def check_secret_ref(ref: str, where: str) -> None:
    if not (ref.startswith("env:") or ref.startswith("file:")) or len(ref) < 5:
        raise ConfigError(
            f"{where}: env:NAME or file:PATH (the secret itself never goes in the config)"
        )


def resolve_secret(ref: str, where: str = "secret") -> str:
    """Read a secret named by `env:NAME` or `file:PATH`. The value is never logged."""
    check_secret_ref(ref, where)
    kind, _, name = ref.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return value
    try:
        return Path(name).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {name}: {exc.strerror}") from None


# --- loading ---------------------------------------------------------------


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is HostPort:
        return value if isinstance(value, HostPort) else HostPort.parse(value, where)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(os.pathsep) if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        inner = args[0]
        if inner is AuditSinkConfig:
            return tuple(AuditSinkConfig.parse(v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string")
        return str(value)
    raise ConfigError(f"{where}: unsupported value")  # pragma: no cover


def _build(cls: type[_T], raw: Mapping[str, Any], where: str) -> _T:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)} - {"base_dir"}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown config key {path!r}", unknown_key=path)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a required field missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """PGSEAL_SECTION_KEY=value -> {"section": {"key": value}} for known keys only."""
    out: dict[str, Any] = {}
    hints = get_type_hints(Config)
    for f in fields(Config):
        if f.name == "base_dir":
            continue
        hint = hints[f.name]
        inner = [a for a in get_args(hint) if a is not type(None)] or [hint]
        section = inner[0]
        if isinstance(section, type) and is_dataclass(section):
            for sub in fields(section):
                if (f.name, sub.name) in (("hsm", "pin"), ("hsm", "so_pin")):
                    continue  # PGSEAL_HSM_PIN holds the PIN itself, see module doc
                name = f"PGSEAL_{f.name}_{sub.name}".upper()
                if name in environ:
                    out.setdefault(f.name, {})[sub.name] = environ[name]
        else:
            name = f"PGSEAL_{f.name}".upper()
            if name in environ:
                out[f.name] = environ[name]
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the config: file (if any) < PGSEAL_* environment < overrides (command-line flags).

    `path` None means `$PGSEAL_CONFIG` if set, otherwise defaults only.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("PGSEAL_CONFIG") or None
    raw: dict[str, Any] = {}
    base_dir = "."
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{at}: invalid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
        raw = loaded
        base_dir = str(Path(path).resolve().parent)
    raw = _merge(raw, _env_overrides(environ))
    if overrides:
        raw = _merge(raw, {k: v for k, v in overrides.items() if v is not None})
    try:
        config = _build(Config, raw, "")
    except ConfigError as exc:
        # An unknown key can only come from the file (the environment and the flags name
        # known keys only): say where it is, as policy errors do.
        if path is None or exc.unknown_key is None:
            raise
        line = _key_line(text, exc.unknown_key)
        raise ConfigError(f"{path}{'' if line is None else f':{line}'}: {exc}") from None
    return replace(config, base_dir=base_dir)


def _key_line(text: str, dotted: str) -> int | None:
    """The 1-based line of `a.b.c` in a YAML text, if it is a chain of mapping keys."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:  # pragma: no cover - it was loaded a moment ago
        return None
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return None
    return line
