"""The config loader: the example file, environment, flags, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, HostPort, load_config

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "pgseal.yaml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.listen == HostPort("127.0.0.1", 6432)
    assert config.upstream_tls.sslmode == "prefer"
    assert [s.kind for s in config.audit.sinks] == ["jsonl", "postgres"]
    assert config.path(config.policies[0]).resolve().exists()


def test_environment_then_flags_override_the_file() -> None:
    env = {"PGSEAL_LISTEN": "0.0.0.0:7000", "PGSEAL_UPSTREAM_TLS_SSLMODE": "require"}
    config = load_config(EXAMPLE, {"listen": "127.0.0.1:7001"}, environ=env)
    assert config.listen == HostPort("127.0.0.1", 7001)
    assert config.upstream_tls.sslmode == "require"


def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("listen: '127.0.0.1:1'\nhsm: {modul: x}\n")
    with pytest.raises(ConfigError, match=r"hsm\.modul"):
        load_config(bad, environ={})


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("listn: '127.0.0.1:1'\n", 1, "listn"),
        ("listen: '127.0.0.1:1'\nhsm:\n  module: m\n  modul: x\n", 4, "hsm.modul"),
        ("# comment\ncache: {ttl_seconds: 5, max_entrys: 3}\n", 2, "cache.max_entrys"),
    ],
)
def test_unknown_keys_name_the_file_and_line(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(bad, environ={"PGSEAL_WORKERS": "2"})
    assert str(caught.value) == f"{bad}:{line}: unknown config key {key!r}"


def test_a_bad_value_from_the_environment_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text("workers: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(good, environ={"PGSEAL_WORKERS": "0"})
    assert str(caught.value).startswith("workers: ")  # no file:line in front


def test_secrets_must_be_references(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("hsm: {pin: '1234'}\n")
    with pytest.raises(ConfigError, match="env:NAME or file:PATH"):
        load_config(bad, environ={})
