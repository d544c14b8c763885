"""`pgseal hsm init`, `pgseal keys ...` and `pgseal audit verify` run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, HsmConfig
from tests.support.hsm_fixtures import SofthsmToken

pytestmark = pytest.mark.integration

# The installed entry point, as a user runs it (python -m proxy where it is not installed).
_SCRIPT = Path(sys.executable).parent / "pgseal"
PGSEAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]


def pgseal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGSEAL, *args], capture_output=True, text=True, timeout=60,
                          env=env if env is not None else dict(os.environ))


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("pgseal: ") and "\n" not in err, err
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in err, err


def test_keys_lifecycle_from_the_command_line(make_keys_config: Any,
                                              write_config_file: Any) -> None:
    config: Config = make_keys_config()
    cfg = str(write_config_file(config))

    created = pgseal("keys", "create", "--tenant", "acme", "--config", cfg)
    assert created.returncode == 0, created.stderr
    assert "tenant 'acme': data key version 1 created" in created.stdout

    assert_one_line_failure(pgseal("keys", "create", "--tenant", "acme", "--config", cfg),
                            "already has an active data key")

    rotated = pgseal("keys", "rotate", "--tenant", "acme", "--config", cfg)
    assert rotated.returncode == 0 and "version 2 active" in rotated.stdout
    assert "version 1 retired" in rotated.stdout

    listed = pgseal("keys", "list", "--config", cfg)
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["TENANT", "VERSION", "KEY_ID", "STATE", "CREATED", "AGE",
                              "CRYPTOPERIOD"]
    assert [(r.split()[0], r.split()[1], r.split()[3]) for r in rows] == [
        ("acme", "1", "retired"), ("acme", "2", "active")]

    master = pgseal("keys", "rotate-master", "--config", cfg)
    assert master.returncode == 0, master.stderr
    assert "2 data key(s) re-wrapped" in master.stdout

    assert_one_line_failure(pgseal("keys", "destroy", "--tenant", "acme", "--config", cfg),
                            "without --yes")
    destroyed = pgseal("keys", "destroy", "--tenant", "acme", "--yes", "--config", cfg)
    assert destroyed.returncode == 0 and "destroyed 2 data key(s)" in destroyed.stdout

    # every one of those commands wrote to the same audit trail, one unbroken chain
    audit = config.path(config.audit.sinks[0].path or "")
    verified = pgseal("audit", "verify", str(audit), "--config", cfg)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok" in verified.stdout and "ends with audit.stop" in verified.stdout
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert {"key.create", "key.rotate", "key.destroy", "key.unwrap"} <= set(events)

    # tamper with one record: verify fails with one line, exit 1
    original = audit.read_text().splitlines()
    lines = list(original)
    body = json.loads(lines[3])
    body["tenant"] = "mallory"
    lines[3] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    audit.write_text("\n".join(lines) + "\n")
    assert_one_line_failure(pgseal("audit", "verify", str(audit), "--config", cfg),
                            "record edited")
    audit.write_text("\n".join(original[:-3]) + "\n")  # truncated tail
    assert_one_line_failure(pgseal("audit", "verify", str(audit)), "not audit.stop")


def test_usage_errors_exit_2() -> None:
    assert pgseal("keys").returncode == 2
    assert pgseal("keys", "create").returncode == 2  # --tenant is required


def test_wrong_pin_is_one_line(make_keys_config: Any, write_config_file: Any) -> None:
    config: Config = make_keys_config()
    cfg = str(write_config_file(replace(config, hsm=replace(config.hsm, pin="env:WRONG_PIN"))))
    env = {**os.environ, "WRONG_PIN": "not-the-pin-98765"}
    result = pgseal("keys", "list", "--config", cfg, env=env)
    assert_one_line_failure(result, "wrong PIN", "pgseal-test")
    assert "not-the-pin-98765" not in result.stdout + result.stderr
    missing = pgseal("keys", "list", "--config", cfg)  # WRONG_PIN not set at all
    assert_one_line_failure(missing, "WRONG_PIN is not set")


def test_unreachable_keystore_is_one_line(make_keys_config: Any, write_config_file: Any) -> None:
    config: Config = make_keys_config()
    dsn = "postgresql://pgseal:secret-password@127.0.0.1:1/postgres"
    cfg = str(write_config_file(replace(config, keystore=replace(config.keystore, dsn=dsn))))
    result = pgseal("keys", "create", "--tenant", "x", "--config", cfg)
    assert_one_line_failure(result, "keystore 127.0.0.1:1/postgres", "unreachable")
    assert "secret-password" not in result.stderr


def test_hsm_init_creates_the_embedded_token_once(softhsm_token: SofthsmToken, tmp_path: Path,
                                                  write_config_file: Any) -> None:
    hsm = HsmConfig(module=softhsm_token.module, token_label="pgseal-embedded",
                    pin=f"env:{softhsm_token.pin_env}", so_pin=f"env:{softhsm_token.so_pin_env}",
                    master_key_label="pgseal-master", softhsm_dir="state/hsm")
    cfg = write_config_file(Config(hsm=hsm))
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    first = pgseal("hsm", "init", "--config", str(cfg), env=env)
    assert first.returncode == 0, first.stderr
    assert "token 'pgseal-embedded': created" in first.stdout
    assert "master key 'pgseal-master': created" in first.stdout
    conf = tmp_path / "state" / "hsm" / "softhsm2.conf"  # relative to the config file
    assert conf.exists() and str(tmp_path / "state" / "hsm" / "tokens") in conf.read_text()
    second = pgseal("hsm", "init", "--config", str(cfg), env=env)
    assert second.returncode == 0, second.stderr
    assert "token 'pgseal-embedded': present" in second.stdout
    assert "master key 'pgseal-master': present" in second.stdout
    # an existing SOFTHSM2_CONF wins over the embedded folder
    other = pgseal("hsm", "init", "--config", str(cfg))
    assert other.returncode == 0 and str(softhsm_token.conf) in other.stdout
