"""The token layer in-process, on a real SoftHSM token: key generation, attributes, signing, threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KINDS, MODULE, PIN, TOKEN_LABEL, key_label, make_token_env, verify_signature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from agent.config import TokenConfig
from agent.errors import KeyExists, KeyNotFound
from agent.secret import Secret
from agent.token import KeyKind, Token, unload_module


@pytest.fixture(scope="module")
def token(template_token: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    te = make_token_env(template_token, tmp_path_factory.mktemp("inproc") / "hsm")
    os.environ["SOFTHSM2_CONF"] = str(te.softhsm_conf)
    t = Token.open(TokenConfig(module=MODULE, label=TOKEN_LABEL), Secret(PIN, "test"), rw=True)
    try:
        yield t
    finally:
        t.close()
        unload_module(MODULE)


def test_token_is_present_and_logged_in(token: Token) -> None:
    assert token.health() == {"state": "ok", "present": True, "logged_in": True, "reconnects": 0}
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


def test_ambiguous_label_needs_a_key_id(token: Token) -> None:
    # Two keys with one label, made behind the agent's back (as other tools can).
    for key_id in (b"\x0a", b"\x0b"):
        token._anchor.generate_keypair(KeyType.RSA, 2048, id=key_id, label="twin", store=True)
    with pytest.raises(KeyNotFound, match="set key_id"):
        token.find_key("twin")
    assert token.find_key("twin", b"\x0b").id == b"\x0b"


def test_missing_key_is_reported_by_label(token: Token) -> None:
    with pytest.raises(KeyNotFound, match="no private key labelled 'absent'"):
        token.find_key("absent")


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
