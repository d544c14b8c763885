"""The cryptoperiod config section, key status against it, and the shred-report verdict."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from proxy.config import ConfigError, CryptoperiodConfig, load_config
from proxy.keys.commands import format_keys, format_masters
from proxy.keys.cryptoperiod import data_key_status, master_key_status
from proxy.keys.keystore import KeyRow, MasterRow
from proxy.keys.model import KeyInfo
from proxy.keys.shred import DestroyRecord, ShredReport, SinkEvidence

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> CryptoperiodConfig:
    path = tmp_path / "pgseal.yaml"
    path.write_text(text)
    return load_config(path, environ=environ or {}).cryptoperiod


# --- config ------------------------------------------------------------------------------


def test_defaults_are_nist_two_years_and_no_scheduled_rotation() -> None:
    periods = load_config(None, environ={}).cryptoperiod
    assert periods == CryptoperiodConfig(730, 730, False, 3600.0)


def test_section_from_yaml(tmp_path: Path) -> None:
    periods = _load(tmp_path, "cryptoperiod: {data_key_days: 90, master_key_days: 365, "
                              "rotate_on_schedule: true, check_interval_seconds: 60}\n")
    assert periods == CryptoperiodConfig(90, 365, True, 60.0)
    # a partial section keeps the other defaults
    assert _load(tmp_path, "cryptoperiod: {data_key_days: 30}\n") == CryptoperiodConfig(
        data_key_days=30)


def test_env_overrides_the_file(tmp_path: Path) -> None:
    periods = _load(tmp_path, "cryptoperiod: {data_key_days: 90}\n", {
        "PGSEAL_CRYPTOPERIOD_DATA_KEY_DAYS": "45",
        "PGSEAL_CRYPTOPERIOD_MASTER_KEY_DAYS": "400",
        "PGSEAL_CRYPTOPERIOD_ROTATE_ON_SCHEDULE": "yes",
        "PGSEAL_CRYPTOPERIOD_CHECK_INTERVAL_SECONDS": "0.5",
    })
    assert periods == CryptoperiodConfig(45, 400, True, 0.5)


@pytest.mark.parametrize(("text", "needle"), [
    ("cryptoperiod: {data_key_dayz: 90}", "unknown config key 'cryptoperiod.data_key_dayz'"),
    ("cryptoperiod: {data_key_days: 0}", "cryptoperiod.data_key_days: 1..36500, got 0"),
    ("cryptoperiod: {master_key_days: -5}", "cryptoperiod.master_key_days: 1..36500"),
    ("cryptoperiod: {data_key_days: 100000}", "cryptoperiod.data_key_days: 1..36500"),
    ("cryptoperiod: {data_key_days: two years}", "cryptoperiod.data_key_days: expected a whole"),
    ("cryptoperiod: {data_key_days: true}", "cryptoperiod.data_key_days: expected a whole"),
    ("cryptoperiod: {rotate_on_schedule: maybe}", "cryptoperiod.rotate_on_schedule: expected"),
    ("cryptoperiod: {check_interval_seconds: 0}", "cryptoperiod.check_interval_seconds"),
    ("cryptoperiod: {check_interval_seconds: .nan}", "cryptoperiod.check_interval_seconds"),
    ("cryptoperiod: {check_interval_seconds: 1e9}", "cryptoperiod.check_interval_seconds"),
    ("cryptoperiod: 730", "cryptoperiod: expected a mapping"),
])
def test_invalid_values_are_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text + "\n")
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_env_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cryptoperiod\.master_key_days"):
        _load(tmp_path, "", {"PGSEAL_CRYPTOPERIOD_MASTER_KEY_DAYS": "0"})


# --- status --------------------------------------------------------------------------------


def test_only_active_keys_can_be_past_their_period() -> None:
    periods = CryptoperiodConfig(data_key_days=10)
    old = NOW - dt.timedelta(days=11)
    assert data_key_status("active", old, periods, NOW).expired
    assert not data_key_status("retired", old, periods, NOW).applies
    assert not data_key_status("destroyed", old, periods, NOW).applies
    boundary = NOW - dt.timedelta(days=10)
    assert data_key_status("active", boundary, periods, NOW).expired  # due at the boundary
    fresh = data_key_status("active", boundary + dt.timedelta(seconds=1), periods, NOW)
    assert not fresh.expired
    assert fresh.describe(NOW) == "ok 0d left"
    assert data_key_status("active", NOW - dt.timedelta(days=15), periods, NOW).describe(
        NOW) == "EXPIRED 5d ago"
    assert data_key_status("retired", old, periods, NOW).describe(NOW) == "-"


def test_master_age_counts_from_activation() -> None:
    periods = CryptoperiodConfig(master_key_days=365)
    assert master_key_status("active", NOW - dt.timedelta(days=400), periods, NOW).expired
    assert not master_key_status("active", None, periods, NOW).applies  # never activated
    assert not master_key_status("pending", NOW - dt.timedelta(days=400), periods, NOW).applies


def test_tables_flag_expired_keys() -> None:
    periods = CryptoperiodConfig(data_key_days=30, master_key_days=30)
    keys = [
        KeyInfo(1, "acme", 1, "retired", "k1", NOW - dt.timedelta(days=90), NOW, None),
        KeyInfo(2, "acme", 2, "active", "k1", NOW - dt.timedelta(days=40), None, None),
        KeyInfo(3, "beta", 1, "active", "k1", NOW - dt.timedelta(days=1), None, None),
    ]
    rows = format_keys(keys, NOW, periods).splitlines()
    assert rows[0].split()[-1] == "CRYPTOPERIOD"
    assert rows[1].endswith(" -")
    assert "EXPIRED 10d ago" in rows[2]
    assert "ok 29d left" in rows[3]
    masters = [MasterRow("k0", "pgseal-master", "destroyed"),
               MasterRow("k1", "pgseal-master", "active", NOW, NOW - dt.timedelta(days=31))]
    table = format_masters(masters, NOW, periods).splitlines()
    assert table[0].split() == ["MASTER", "LABEL", "STATE", "ACTIVATED", "AGE", "CRYPTOPERIOD"]
    assert table[1].endswith(" -") and "EXPIRED 1d ago" in table[2]


# --- the shred-report verdict --------------------------------------------------------------


def _row(key_id: int, version: int, state: str, wrapped: bytes | None = None) -> KeyRow:
    return KeyRow(key_id, "acme", version, state, "k1", wrapped and b"n" * 12, wrapped,
                  NOW, None, NOW if state == "destroyed" else None)


def _report(keys: list[KeyRow], sinks: list[SinkEvidence], in_cache: bool = False) -> ShredReport:
    return ShredReport("acme", "keystore x", keys, {}, in_cache, 1, (0, None), 300.0, sinks)


def _sink(*key_ids: int, chain_ok: bool = True) -> SinkEvidence:
    return SinkEvidence("jsonl a", True,
                        [DestroyRecord(i, "h" * 64, "ts", i, i) for i in key_ids],
                        "intact" if chain_ok else "BROKEN: line 3: record edited", chain_ok)


def test_verdict() -> None:
    shredded = [_row(1, 1, "destroyed"), _row(2, 2, "destroyed")]
    assert _report(shredded, [_sink(1, 2)]).reasons() == []
    assert "SHREDDED" in _report(shredded, [_sink(1, 2)]).render(NOW).splitlines()[-1]
    # an active key left (e.g. created again after the destroy)
    (reason,) = _report([*shredded, _row(3, 3, "active", b"w" * 48)], [_sink(1, 2)]).reasons()
    assert "version 3 (key id 3) is active, not destroyed" in reason
    assert "NOT SHREDDED" in _report([_row(3, 1, "active", b"w")], [_sink()]).render(NOW)
    # no keys at all: nothing to show
    assert "has no data keys" in _report([], [_sink()]).reasons()[0]
    # the audit record of one destroy is missing; a broken chain; nothing readable
    assert "no key.destroy audit record for version 2" in _report(
        shredded, [_sink(1)]).reasons()[0]
    assert "BROKEN" in _report(shredded, [_sink(1, 2, chain_ok=False)]).reasons()[0]
    unreadable = SinkEvidence("stdout", False, chain="not readable back")
    assert "no audit sink" in _report(shredded, [unreadable]).reasons()[0]
    # this process still holding a key
    assert "cache" in _report(shredded, [_sink(1, 2)], in_cache=True).reasons()[0]
