"""The HSM side, against a real SoftHSM2 token: master key attributes, wrap/unwrap, faults."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from proxy.config import Config
from proxy.errors import KeyServiceUnavailable
from proxy.keys.hsm import HsmClient, dek_aad, ensure_softhsm_token
from tests.support.hsm_fixtures import SofthsmToken

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_master_key_attributes_read_back_from_the_token(keys_config: Config) -> None:
    hsm = HsmClient(keys_config.hsm)
    (master,) = await hsm.list_masters()
    assert master.label == keys_config.hsm.master_key_label
    assert master.key_bits == 256
    assert master.sensitive and master.always_sensitive
    assert not master.extractable and master.never_extractable
    assert master.local  # generated on the token, never imported


@pytest.mark.asyncio
async def test_master_key_value_cannot_be_read(keys_config: Config) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    from proxy.keys.hsm import run_on_pkcs11_thread

    hsm = HsmClient(keys_config.hsm)
    label = keys_config.hsm.master_key_label

    def read_value(session, link):  # type: ignore[no-untyped-def]
        key = next(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                        Attribute.LABEL: label}))
        try:
            return key[Attribute.VALUE]
        except pkcs11.AttributeSensitive:
            return None

    assert hsm.call_sync(read_value, "probe") is None
    assert run_on_pkcs11_thread(lambda: 1) == 1


@pytest.mark.asyncio
async def test_wrap_unwrap_binds_the_aad(keys_config: Config) -> None:
    hsm = HsmClient(keys_config.hsm)
    (master,) = await hsm.list_masters()
    dek = os.urandom(32)
    aad = dek_aad("acme", 1, master.kek)
    nonce, wrapped = await hsm.wrap(master.kek, dek, aad)
    assert dek not in wrapped and len(wrapped) == 32 + 16
    assert await hsm.unwrap(master.kek, nonce, wrapped, aad) == dek
    for other in (dek_aad("globex", 1, master.kek), dek_aad("acme", 2, master.kek),
                  dek_aad("acme", 1, "0" * 16)):
        with pytest.raises(KeyServiceUnavailable, match="failed to verify"):
            await hsm.unwrap(master.kek, nonce, wrapped, other)
    flipped = bytes([wrapped[0] ^ 1]) + wrapped[1:]
    with pytest.raises(KeyServiceUnavailable, match="failed to verify"):
        await hsm.unwrap(master.kek, nonce, flipped, aad)
    # the session survived the failures
    assert await hsm.unwrap(master.kek, nonce, wrapped, aad) == dek


def test_dek_aad_is_unambiguous() -> None:
    # length prefixes: ("ab", 1) and ("a", ...) never collide
    assert dek_aad("ab", 1, "k") != dek_aad("a", 1, "bk")
    assert dek_aad("acme", 1, "k") != dek_aad("acme", 2, "k")


def test_token_init_is_idempotent(softhsm_token: SofthsmToken, keys_config: Config) -> None:
    again = ensure_softhsm_token(keys_config)
    assert again is not None and not again.created
    masters, created = HsmClient(keys_config.hsm).ensure_master_sync()
    assert not created and len(masters) == 1


@pytest.mark.asyncio
async def test_wrong_pin_is_one_clear_line_without_the_pin(keys_config: Config,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.keys import hsm as hsm_module

    monkeypatch.setenv("PGSEAL_TEST_WRONG_PIN", "wrong-pin-123456")
    # A link of its own: the shared one is logged in already (login is per process).
    bad = replace(keys_config.hsm, pin="env:PGSEAL_TEST_WRONG_PIN")
    monkeypatch.setattr(hsm_module, "_links", {})
    hsm_module.run_on_pkcs11_thread(_logout_all(keys_config))
    client = HsmClient(bad)
    with pytest.raises(KeyServiceUnavailable) as info:
        await client.list_masters()
    message = str(info.value)
    assert "wrong PIN" in message and "wrong-pin-123456" not in message and "\n" not in message
    # the same wrong PIN is not tried again (a real HSM would lock the PIN)
    with pytest.raises(KeyServiceUnavailable, match="not retrying"):
        await client.list_masters()
    # fixed PIN source: works at once, no restart
    monkeypatch.setenv("PGSEAL_TEST_WRONG_PIN", os.environ["PGSEAL_TEST_HSM_PIN"])
    assert await client.list_masters()


def _logout_all(config: Config):  # type: ignore[no-untyped-def]
    def work() -> None:
        from proxy.keys import hsm as hsm_module

        lib = hsm_module._load_module(config.hsm.module)
        lib.reinitialize()  # closes every session: the token is logged out

    return work


@pytest.mark.asyncio
async def test_missing_module_and_token_are_one_clear_line(keys_config: Config) -> None:
    missing = HsmClient(replace(keys_config.hsm, module="/nonexistent/libpkcs11.so"))
    with pytest.raises(KeyServiceUnavailable,
                       match=r"HSM module /nonexistent/libpkcs11\.so not found"):
        await missing.list_masters()
    no_token = HsmClient(replace(keys_config.hsm, token_label="no-such-token"))
    with pytest.raises(KeyServiceUnavailable, match="token 'no-such-token' not found"):
        await no_token.list_masters()


@pytest.mark.asyncio
async def test_token_that_appears_later_is_found_without_restart(keys_config: Config) -> None:
    late = replace(keys_config, hsm=replace(keys_config.hsm, token_label="late-token"))
    client = HsmClient(late.hsm)
    with pytest.raises(KeyServiceUnavailable, match="token 'late-token' not found"):
        await client.list_masters()
    created = ensure_softhsm_token(late)
    assert created is not None and created.created
    masters, made = client.ensure_master_sync()
    assert made and await client.list_masters() == masters
