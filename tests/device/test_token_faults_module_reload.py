"""Loading the module again (recovery's later attempts) after its OS-locking initialisation failed, on a
real SoftHSM token.

The agent initialises a module twice: python-pkcs11's ``C_Initialize(NULL)``, then ``C_Finalize`` and
``C_Initialize(CKF_OS_LOCKING_OK)`` of its own (``agent/token/module.py``). A network HSM's module connects in
``C_Initialize``, so a link that drops between the two fails the second. The failure is real, not mocked:
SoftHSM's ``C_Initialize`` fails when its token store is missing, and the store is moved away for exactly
that call (the hook only times the move). The module was then left finalised while python-pkcs11 still
counted it initialised and handed it back as it was, so every later load failed on ``C_Finalize``
(``CKR_CRYPTOKI_NOT_INITIALIZED``) even once the device was back: recovery could never succeed.
"""

from __future__ import annotations

from pathlib import Path

import pkcs11
import pytest

from agent.config import TokenConfig
from agent.dev.testing import PIN, TOKEN_LABEL, key_label, make_token_env, softhsm_module, verify_signature
from agent.errors import TokenUnavailable
from agent.secret import Secret
from agent.token import Token, load_module, unload_module
from agent.token import module as token_module


def test_a_failed_locking_initialise_does_not_stop_the_module_loading_once_the_device_is_back(
    template_token: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    te = make_token_env(template_token, tmp_path / "hsm")
    monkeypatch.setenv("SOFTHSM2_CONF", str(te.softhsm_conf))
    so = softhsm_module()
    unload_module(so)
    pkcs11.unload(so)  # start with the module not loaded: load_module() runs both initialisations
    real = token_module.RawModule.reinitialize_with_locking
    store, away = te.dir / "tokens", te.dir / "tokens-away"

    def link_drops(self: token_module.RawModule) -> bool:
        store.rename(away)  # the device goes away between python-pkcs11's C_Initialize and ours
        try:
            return real(self)
        finally:
            away.rename(store)  # and is back at once

    monkeypatch.setattr(token_module.RawModule, "reinitialize_with_locking", link_drops)
    try:
        with pytest.raises(TokenUnavailable, match="CKF_OS_LOCKING_OK"):
            load_module(so)
        monkeypatch.setattr(token_module.RawModule, "reinitialize_with_locking", real)

        # The device is back: the next load (recovery's next attempt, or a restart in-process) works.
        with Token.open(TokenConfig(module=so, label=TOKEN_LABEL), Secret(PIN, "test")) as token:
            assert token.library.os_locking
            key = token.find_key(key_label("ed25519"))
            verify_signature(key.public_pem, token.sign(key, b"back"), b"back")
    finally:
        unload_module(so)
        pkcs11.unload(so)
