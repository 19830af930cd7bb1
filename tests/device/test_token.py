"""The token layer in-process, on a real SoftHSM token: key generation, attributes, signing, threads."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

import agent.token.device as agent_token
from agent.config import KeygenTemplate, TokenConfig
from agent.dev.testing import (
    KINDS,
    PIN,
    TOKEN_LABEL,
    key_label,
    make_token_env,
    softhsm_module,
    verify_signature,
    wait_until,
)
from agent.errors import KeyExists, KeyNotFound, KeyUsageRefused, TokenUnavailable
from agent.health import TokenHealth, TokenState
from agent.secret import Secret
from agent.token import KeyKind, Token, unload_module
from agent.token import module as token_module
from agent.token.keys import EC_PARAMS


@pytest.fixture(scope="module")
def token(template_token: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    te = make_token_env(template_token, tmp_path_factory.mktemp("inproc") / "hsm")
    os.environ["SOFTHSM2_CONF"] = str(te.softhsm_conf)
    t = Token.open(TokenConfig(module=softhsm_module(), label=TOKEN_LABEL), Secret(PIN, "test"), rw=True)
    try:
        yield t
    finally:
        t.close()
        unload_module(softhsm_module())


def test_token_is_present_and_logged_in(token: Token) -> None:
    assert token.health() == TokenHealth(TokenState.OK, present=True, logged_in=True, reconnects=0)
    assert token.identity.label == TOKEN_LABEL
    assert token.identity.manufacturer == "SoftHSM project"


def test_keys_lists_every_type_with_fingerprints(token: Token) -> None:
    listed = {k.label: k for k in token.keys()}
    for kind in KINDS:
        info = listed[key_label(kind)]
        assert info.type_name == kind
        assert info.fingerprint.startswith("sha256:") and len(info.fingerprint) == 7 + 64
        assert info.sensitive and not info.extractable and info.always_sensitive and info.never_extractable


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_signs_in_the_encoding_dfns_expects(token: Token, kind: str) -> None:
    info = token.find_key(key_label(kind))
    message = b'{"challenge":"Y2gtMQ","type":"key.get"}'
    verify_signature(info.public_pem, token.sign(info, message), message)


def test_ed25519_spki_is_rfc8410_not_ec_public_key(token: Token) -> None:
    info = token.find_key(key_label("ed25519"))
    assert info.spki_der.hex().startswith("302a300506032b6570032100")
    assert len(info.spki_der) == 44
    assert isinstance(info.public_key, ed25519.Ed25519PublicKey)


@pytest.mark.parametrize("kind", KINDS)
def test_generated_private_keys_are_sensitive_non_extractable_sign_only(token: Token, kind: str) -> None:
    label = f"gen-{kind}"
    info = token.generate(KeyKind(kind), label)
    assert info.kind is KeyKind(kind)
    priv = token._anchor.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    assert priv[Attribute.SENSITIVE] is True
    assert priv[Attribute.EXTRACTABLE] is False
    assert priv[Attribute.PRIVATE] is True
    assert priv[Attribute.TOKEN] is True
    assert priv[Attribute.SIGN] is True
    for attribute in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
        assert priv[attribute] is False, attribute
    # The private value cannot be read out of the token.
    secret = Attribute.PRIVATE_EXPONENT if kind.startswith("rsa") else Attribute.VALUE
    with pytest.raises(p11.AttributeSensitive):
        priv[secret]
    message = b"fresh key"
    verify_signature(info.public_pem, token.sign(info, message), message)


def test_duplicate_label_is_refused(token: Token) -> None:
    with pytest.raises(KeyExists, match="already exists"):
        token.generate(KeyKind.P256, key_label("p256"))


@pytest.mark.parametrize("kind", ["rsa2048", "p256"])
def test_a_key_the_agent_would_refuse_to_serve_is_not_left_behind(
    token: Token, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # keygen_template = "module": SoftHSM's own template lets the key decrypt or derive as well, which the
    # agent refuses to serve unless allow_other_usages is set.
    module_template = dataclasses.replace(token._cfg, keygen_template=KeygenTemplate.MODULE)
    monkeypatch.setattr(token, "_cfg", module_template)
    label = f"module-{kind}"
    with pytest.raises(KeyUsageRefused, match="also allows CKA_.*key destroyed.*allow_other_usages = true"):
        token.generate(KeyKind(kind), label)
    assert list(token._anchor.get_objects({Attribute.LABEL: label})) == []
    monkeypatch.setattr(token, "_cfg", dataclasses.replace(module_template, allow_other_usages=True))
    info = token.generate(KeyKind(kind), label)
    assert info.other_usages and token.check_signing(info)


@pytest.mark.parametrize(("twin_id", "ours_stays"), [(b"\x00", False), (b"\xff" * 9, True)])
def test_of_two_keys_generated_at_once_with_one_label_one_stays(
    token: Token, twin_id: bytes, ours_stays: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process makes a key with the same label between the agent's check and its generation: forced
    # here by making it just before the real generation (SoftHSM, real objects; only the order is arranged).
    label = f"race-{twin_id.hex()}"
    real = agent_token.generate_keypair

    def twin_first(*args: Any, **kwargs: Any) -> Any:
        token._anchor.generate_keypair(KeyType.EC, 256, id=twin_id, label=label, store=True,
                                       public_template={Attribute.EC_PARAMS: EC_PARAMS[KeyKind.P256]})  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(agent_token, "generate_keypair", twin_first)
    if ours_stays:
        info = token.generate(KeyKind.P256, label)
        assert info.id != twin_id
    else:
        with pytest.raises(KeyExists, match="at the same time; key destroyed"):
            token.generate(KeyKind.P256, label)
    ids = {
        bytes(k[Attribute.ID])
        for k in token._anchor.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
    }
    assert len(ids) == (2 if ours_stays else 1) and twin_id in ids
    # Where ours stays, the twin's maker (another process) destroys its own: at most a moment of two.


def test_ambiguous_label_needs_a_key_id(token: Token) -> None:
    # Two keys with one label, made behind the agent's back (as other tools can).
    for key_id in (b"\x0a", b"\x0b"):
        token._anchor.generate_keypair(KeyType.RSA, 2048, id=key_id, label="twin", store=True)
    with pytest.raises(KeyNotFound, match=r"ids 0a, 0b\); choose one: key_id = .* --id for keys public"):
        token.find_key("twin")
    assert token.find_key("twin", b"\x0b").id == b"\x0b"


def test_missing_key_is_reported_by_label(token: Token) -> None:
    with pytest.raises(KeyNotFound, match="no private key labelled 'absent'"):
        token.find_key("absent")


def test_a_label_under_another_id_is_reported_with_the_id_asked_for(token: Token) -> None:
    label = key_label("p256")
    present = token.find_key(label).id
    asked = b"\xff" + present
    with pytest.raises(KeyNotFound, match=f"no private key labelled '{label}' with id {asked.hex()} on "):
        token.find_key(label, asked)


def test_threads_sign_concurrently_without_crashing(token: Token) -> None:
    """python-pkcs11 + SoftHSM crash under concurrent signing unless the module uses OS locking."""
    keys = [token.find_key(key_label(k)) for k in ("ed25519", "p256", "secp256k1")]
    results: list[tuple[str, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(150):
                key = keys[(n + i) % len(keys)]
                message = f"thread {n} message {i}".encode()
                sig = token.sign(key, message)
                with lock:
                    results.append((key.public_pem, sig, message))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 8 * 150
    for pem, sig, message in results:
        verify_signature(pem, sig, message)


# ------------------------------------------------------------------------------------------------------
# Faults SoftHSM cannot produce: MOCK PKCS#11 LAYER.
# SoftHSM 2.6.1 never returns CKR_DEVICE_REMOVED or CKR_PIN_LOCKED and never expires a session by itself,
# so these tests make the python-pkcs11 boundary raise those errors (what a real HSM's module would
# answer). Everything else (sessions, login, recovery, self-test) runs on the real SoftHSM token.


def _fail_first(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> dict[str, int]:
    real = agent_token.sign_with
    calls = {"n": 0}

    def flaky(priv: Any, kind: KeyKind, message: bytes, mechanism: Any = None) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return real(priv, kind, message, mechanism)

    monkeypatch.setattr(agent_token, "sign_with", flaky)
    return calls


def _restore(token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    if token.state is not TokenState.OK:
        token.circuit.state = TokenState.DEGRADED  # from down too: recover the shared token for the next test
        token.circuit.fault("test cleanup")
        wait_until(lambda: token.state == "ok", 15, "token state ok")


def test_a_stale_session_is_retried_once_on_a_fresh_one(token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    key = token.find_key(key_label("ed25519"))
    calls = _fail_first(monkeypatch, p11.SessionHandleInvalid())  # e.g. YubiHSM expired an idle session
    before = token.reconnects
    verify_signature(key.public_pem, token.sign(key, b"after idle"), b"after idle")
    assert calls["n"] == 2 and token.state == "ok" and token.reconnects == before


def test_device_removed_opens_the_circuit_then_recovery_verifies_and_resumes(
    token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = token.find_key(key_label("p256"))
    token.expect_keys([key])
    _fail_first(monkeypatch, p11.DeviceRemoved())
    before = token.reconnects
    with pytest.raises(TokenUnavailable, match="DeviceRemoved"):
        token.sign(key, b"m")
    wait_until(lambda: token.state == "ok", 15, "token state ok")
    assert token.reconnects == before + 1
    verify_signature(key.public_pem, token.sign(key, b"back"), b"back")
    _restore(token, monkeypatch)


class _LockedPin:
    """A token whose module answers C_Login with CKR_PIN_LOCKED (mock); the rest is the real token."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.logins = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def open(self, **kwargs: Any) -> Any:
        if kwargs.get("user_pin") is not None:
            self.logins += 1
            raise p11.PinLocked()
        return self._real.open(**kwargs)


def test_pin_locked_on_relogin_is_down_and_never_retried(token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    key = token.find_key(key_label("ed25519"))
    token.expect_keys([key])
    real_find = token_module.find_token
    seen: list[_LockedPin] = []

    def find(lib: Any, cfg: Any) -> Any:
        seen.append(_LockedPin(real_find(lib, cfg)))
        return seen[-1]

    monkeypatch.setattr(token_module, "find_token", find)
    token.circuit.fault("test: the device dropped the session")
    wait_until(lambda: token.state == "down", 15, "token state down")
    assert token.reason is not None and "PinLocked" in token.reason
    time.sleep(0.5)
    assert sum(t.logins for t in seen) == 1, "a locked PIN must not be tried again"
    with pytest.raises(TokenUnavailable, match="PinLocked"):
        token.sign(key, b"m")
    assert token.health().state is TokenState.DOWN
    _restore(token, monkeypatch)


def test_a_different_token_is_refused_after_reconnect(token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    key = token.find_key(key_label("ed25519"))
    token.expect_keys([key])
    real_find = token_module.find_token

    class OtherSerial(_LockedPin):
        serial = b"ffffffffffffffff"

    monkeypatch.setattr(token_module, "find_token", lambda lib, cfg: OtherSerial(real_find(lib, cfg)))
    token.circuit.fault("test: reconnect")
    wait_until(lambda: token.state == "down", 15, "token state down")
    assert token.reason is not None and "serial ffffffffffffffff" in token.reason
    with pytest.raises(TokenUnavailable):
        token.sign(key, b"m")
    _restore(token, monkeypatch)
