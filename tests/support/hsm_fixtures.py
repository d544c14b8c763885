"""Fixtures for SoftHSM2 tokens, keystores and key services (owned by the key-service work).

- `softhsm_token` (session): a fresh SoftHSM2 token in a tmp folder with its own
  softhsm2.conf (SOFTHSM2_CONF points at it for the session); PINs come from the
  environment variables it names, as a deployment would have them.
- `keys_config` (session): a Config for that token and the test PostgreSQL (`pg`):
  its own keystore schema and master key label, audit to a jsonl file in a tmp folder.
- `make_keys_config` (function): more such configs, each with a fresh schema, master key
  label and audit file, for tests that must not share state (rotation of the master key,
  destroy, auto_create off); keyword overrides replace whole config sections.
- `key_service` (function): a KeyService opened on `keys_config`, closed afterwards.
- `write_config_file`: the same config as a YAML file, for the CLI run as a subprocess.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from proxy.config import (
    AuditConfig,
    AuditSinkConfig,
    CacheConfig,
    Config,
    HsmConfig,
    KeystoreConfig,
    default_softhsm_module,
)
from proxy.keys.hsm import HsmClient, ensure_softhsm_token
from proxy.keys.service import KeyService

PIN_ENV = "PGSEAL_TEST_HSM_PIN"
SO_PIN_ENV = "PGSEAL_TEST_HSM_SO_PIN"


@dataclass(frozen=True)
class SofthsmToken:
    module: str
    label: str
    conf: Path
    folder: Path
    pin_env: str
    so_pin_env: str

    @property
    def pin(self) -> str:
        return os.environ[self.pin_env]

    def hsm_config(self, master_key_label: str) -> HsmConfig:
        return HsmConfig(
            module=self.module, token_label=self.label, pin=f"env:{self.pin_env}",
            so_pin=f"env:{self.so_pin_env}", master_key_label=master_key_label,
            softhsm_dir=str(self.folder),
        )


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SofthsmToken]:
    module = default_softhsm_module()
    if not Path(module).exists():
        pytest.skip(f"SoftHSM2 not installed ({module}): apt-get install softhsm2")
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", PIN_ENV, SO_PIN_ENV)}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = secrets.token_hex(8)
    os.environ[SO_PIN_ENV] = secrets.token_hex(8)
    token = SofthsmToken(module, "pgseal-test", conf, folder, PIN_ENV, SO_PIN_ENV)
    ensure_softhsm_token(Config(hsm=token.hsm_config("unused"), base_dir=str(folder)))
    try:
        yield token
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _new_keys_config(token: SofthsmToken, dsn: str, folder: Path, **sections: Any) -> Config:
    suffix = secrets.token_hex(4)
    config = Config(
        hsm=token.hsm_config(f"pgseal-test-master-{suffix}"),
        keystore=KeystoreConfig(dsn=dsn, schema=f"pgseal_test_{suffix}", auto_create=True),
        cache=CacheConfig(ttl_seconds=300, max_entries=10000, max_uses=1048576),
        audit=AuditConfig(
            sinks=(AuditSinkConfig("jsonl", path=str(folder / f"audit-{suffix}.jsonl")),)
        ),
        base_dir=str(folder),
    )
    config = replace(config, **sections)
    HsmClient(config.hsm).ensure_master_sync()  # what `pgseal hsm init` does
    return config


def _drop_schema(pg: Any, config: Config) -> None:
    try:
        pg.execute(f'DROP SCHEMA IF EXISTS "{config.keystore.schema}" CASCADE')
    except Exception:  # cleanup must not hide the test's own result
        pass


@pytest.fixture(scope="session")
def keys_config(softhsm_token: SofthsmToken, pg: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    config = _new_keys_config(softhsm_token, pg.superuser_dsn, tmp_path_factory.mktemp("keys"))
    yield config
    _drop_schema(pg, config)


@pytest.fixture
def make_keys_config(softhsm_token: SofthsmToken, pg: Any,
                     tmp_path: Path) -> Iterator[Callable[..., Config]]:
    made: list[Config] = []

    def make(**sections: Any) -> Config:
        config = _new_keys_config(softhsm_token, pg.superuser_dsn, tmp_path, **sections)
        made.append(config)
        return config

    yield make
    for config in made:
        _drop_schema(pg, config)


@pytest_asyncio.fixture
async def key_service(keys_config: Config) -> AsyncIterator[KeyService]:
    service = await KeyService.open(keys_config)
    try:
        yield service
    finally:
        await service.close()


def config_to_yaml(config: Config) -> dict[str, Any]:
    """The YAML mapping `pgseal --config` reads back as `config` (keys sections only)."""
    sinks: list[dict[str, Any]] = []
    for sink in config.audit.sinks:
        if sink.kind == "jsonl":
            sinks.append({"jsonl": sink.path})
        elif sink.kind == "postgres":
            sinks.append({"postgres": {"table": sink.table}})
        else:
            sinks.append({"stdout": {}})
    return {
        "hsm": {
            "module": config.hsm.module, "token_label": config.hsm.token_label,
            "pin": config.hsm.pin, "so_pin": config.hsm.so_pin,
            "master_key_label": config.hsm.master_key_label,
            "softhsm_dir": config.hsm.softhsm_dir,
        },
        "keystore": {"dsn": config.keystore.dsn, "schema": config.keystore.schema,
                     "auto_create": config.keystore.auto_create},
        "cache": {"ttl_seconds": config.cache.ttl_seconds,
                  "max_entries": config.cache.max_entries, "max_uses": config.cache.max_uses},
        "audit": {"sinks": sinks, "on_failure": config.audit.on_failure},
    }


@pytest.fixture
def write_config_file(tmp_path: Path) -> Callable[..., Path]:
    def write(config: Config, name: str = "pgseal.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config_to_yaml(config)))
        return path

    return write
