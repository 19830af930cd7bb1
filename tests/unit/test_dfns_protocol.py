"""Pure protocol tests for agent/dfns/ (dfns-protocol.md §2, §3, §4.2), using software keys, no PKCS#11."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.dfns import (
    KEY_CREATE,
    KEY_GET,
    MAX_CHALLENGE_LEN,
    ClientData,
    CredentialInfo,
    KeyAssertion,
    Registration,
    RegistrationChallenge,
    Signer,
    UserActionChallenge,
    b64url,
    b64url_decode,
    client_data,
    credential_fingerprint,
)
from agent.errors import BadRequest, CredentialNotAllowed

SPEC_CHALLENGE = "Y2gtNzloaHQtbXJlb2stOGFwOHFtMmVpZWZ0amxhZw"
SPEC_CLIENT_DATA_B64 = (
    "eyJjaGFsbGVuZ2UiOiJZMmd0Tnpsb2FIUXRiWEpsYjJzdE9HRndPSEZ0TW1WcFpXWjBhbXhoWnciLCJ0eXBlIjoia2V5LmdldCJ9"
)
CRED_ID = "Y2ktM3E5Y2MtbXFoM20tODdiOW1jNDZqZ2gxYWJqbA"
OTHER_CRED_ID = "Y2ktb3RoZXItY3JlZGVudGlhbA"
KEY_TYPES = ["ed25519", "p256", "secp256k1", "rsa2048"]
_MISSING = object()


# --------------------------------------------------------------------------------------------------------------
# A software signer implementing agent.dfns.Signer with the encodings of §3.
# --------------------------------------------------------------------------------------------------------------


class SoftwareSigner:
    """Ed25519 (raw 64 bytes), ECDSA P-256 / secp256k1 (DER, SHA-256), RSA PKCS#1 v1.5 SHA-256."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "ed25519":
            self._key = ed25519.Ed25519PrivateKey.generate()
        elif kind == "p256":
            self._key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "secp256k1":
            self._key = ec.generate_private_key(ec.SECP256K1())
        elif kind == "rsa2048":
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:  # pragma: no cover - test bug
            raise ValueError(kind)
        self.calls: list[bytes] = []

    def sign(self, message: bytes) -> bytes:
        self.calls.append(message)
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    @property
    def public_key_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )


def verify_with_pem(pem: str, signature: bytes, message: bytes) -> None:
    """Verify like the Dfns server would: from the PEM only. Raises InvalidSignature on mismatch."""
    pub = serialization.load_pem_public_key(pem.encode("ascii"))
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, message)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:  # pragma: no cover - test bug
        raise TypeError(type(pub))


_SIGNERS: dict[str, SoftwareSigner] = {}


@pytest.fixture(params=KEY_TYPES)
def signer(request: pytest.FixtureRequest) -> SoftwareSigner:
    kind = request.param
    if kind not in _SIGNERS:  # key generation (RSA especially) is slow: one key per type per run
        _SIGNERS[kind] = SoftwareSigner(kind)
    s = _SIGNERS[kind]
    s.calls.clear()
    return s


def action_init_body(**overrides: object) -> dict[str, object]:
    """A realistic /auth/action/init answer (dfns-protocol.md §1.1)."""
    body: dict[str, object] = {
        "challenge": SPEC_CHALLENGE,
        "challengeIdentifier": "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2ln",
        "allowCredentials": {
            "key": [{"type": "public-key", "id": CRED_ID}, {"type": "public-key", "id": OTHER_CRED_ID}],
            "webauthn": [],
            "passwordProtectedKey": [],
        },
        "supportedCredentialKinds": [
            {"kind": "Key", "factor": "first", "requiresSecondFactor": False},
            {"kind": "Fido2", "factor": "either", "requiresSecondFactor": False},
        ],
        "userVerification": "required",
        "externalAuthenticationUrl": "",
        "attestation": "direct",
    }
    body.update(overrides)
    return body


def credentials_init_body(**overrides: object) -> dict[str, object]:
    """A realistic /auth/credentials/init answer (dfns-protocol.md §4.2 a)."""
    body: dict[str, object] = {
        "kind": "Key",
        "challengeIdentifier": "eyJ0eXAiOiJKV1QifQ.eyJyZWciOnRydWV9.c2ln",
        "challenge": "Y2gtcmVnaXN0cmF0aW9uLWNoYWxsZW5nZQ",
        "user": {"id": "us-1", "name": "sa@example.com", "displayName": "Service"},
        "rp": {"id": "dfns.io", "name": "Dfns"},
        "attestation": "direct",
        "pubKeyCredParams": [{"type": "public-key", "alg": -7}],
        "temporaryAuthenticationToken": "deprecated",
    }
    body.update(overrides)
    return body


# --------------------------------------------------------------------------------------------------------------
# clientData bytes (§2)
# --------------------------------------------------------------------------------------------------------------


def test_client_data_default_form_is_sorted_and_compact() -> None:
    assert client_data("abc_-123", KEY_GET) == b'{"challenge":"abc_-123","type":"key.get"}'


def test_client_data_default_form_for_key_create() -> None:
    assert client_data("abc_-123", KEY_CREATE) == b'{"challenge":"abc_-123","type":"key.create"}'


def test_client_data_constants_match_spec() -> None:
    assert KEY_GET == "key.get"
    assert KEY_CREATE == "key.create"


def test_client_data_origin_form_has_sdk_key_order() -> None:
    got = client_data("abc", KEY_GET, origin="https://app.dfns.io")
    assert got == b'{"type":"key.get","challenge":"abc","origin":"https://app.dfns.io","crossOrigin":false}'


def test_client_data_origin_form_for_key_create() -> None:
    got = client_data("abc", KEY_CREATE, origin="https://app.dfns.ninja")
    assert got == b'{"type":"key.create","challenge":"abc","origin":"https://app.dfns.ninja","crossOrigin":false}'


def test_client_data_spec_example() -> None:
    data = client_data(SPEC_CHALLENGE, KEY_GET)
    assert b64url(data) == SPEC_CLIENT_DATA_B64
    assert b64url_decode(SPEC_CLIENT_DATA_B64) == data
    assert data == b'{"challenge":"' + SPEC_CHALLENGE.encode() + b'","type":"key.get"}'


def test_client_data_is_challenge_verbatim_not_reencoded() -> None:
    # §1.1: the challenge is already base64url text; it must not be decoded or re-encoded.
    doc = json.loads(client_data(SPEC_CHALLENGE, KEY_GET))
    assert doc == {"challenge": SPEC_CHALLENGE, "type": "key.get"}


# --------------------------------------------------------------------------------------------------------------
# base64url (§2 "encoding on the wire")
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", range(0, 40))
def test_b64url_has_no_padding_and_round_trips(length: int) -> None:
    data = os.urandom(length)
    text = b64url(data)
    assert "=" not in text
    assert re.fullmatch(r"[A-Za-z0-9_-]*", text)
    assert b64url_decode(text) == data


def test_b64url_uses_url_safe_alphabet() -> None:
    data = b"\xfb\xff\xbf"  # standard base64 would be "+/+/"
    assert b64url(data) == "-_-_"
    assert b64url_decode("-_-_") == data


def test_b64url_known_vector() -> None:
    assert b64url(b"ch-79hht-mreok-8ap8qm2eieftjlag") == SPEC_CHALLENGE
    assert b64url_decode(CRED_ID) == b"ci-3q9cc-mqh3m-87b9mc46jgh1abjl"


# --------------------------------------------------------------------------------------------------------------
# UserActionChallenge.parse
# --------------------------------------------------------------------------------------------------------------


def test_parse_realistic_action_init_body() -> None:
    body = action_init_body()
    ch = UserActionChallenge.parse(body)
    assert ch.challenge == SPEC_CHALLENGE
    assert ch.challenge_identifier == body["challengeIdentifier"]
    assert ch.allowed_key_ids == (CRED_ID, OTHER_CRED_ID)


def test_parse_without_allow_credentials_or_identifier() -> None:
    ch = UserActionChallenge.parse({"challenge": "abc"})
    assert ch.challenge == "abc"
    assert ch.challenge_identifier is None
    assert ch.allowed_key_ids == ()


def test_parse_accepts_max_length_challenge() -> None:
    value = "a" * MAX_CHALLENGE_LEN
    assert UserActionChallenge.parse({"challenge": value}).challenge == value


def _assert_invalid_challenge(obj: object, match: str | None = None) -> BadRequest:
    with pytest.raises(BadRequest, match=match) as info:
        UserActionChallenge.parse(obj)
    err = info.value
    assert err.code == "invalid_challenge"
    assert err.status == 400
    assert err.to_json()["error"]["code"] == "invalid_challenge"
    return err


@pytest.mark.parametrize("obj", [None, "challenge", 42, ["challenge"], b"{}"])
def test_parse_rejects_non_objects(obj: object) -> None:
    _assert_invalid_challenge(obj, match="JSON object")


@pytest.mark.parametrize(
    "challenge",
    [pytest.param(_MISSING, id="missing"), "", None, 123, ["abc"], {"v": "abc"}],
)
def test_parse_rejects_missing_empty_or_non_string_challenge(challenge: object) -> None:
    body = action_init_body()
    if challenge is _MISSING:
        del body["challenge"]
    else:
        body["challenge"] = challenge
    _assert_invalid_challenge(body, match="non-empty string")


@pytest.mark.parametrize(
    "challenge",
    ["abc def", "abc+def", "abc/def", "abc.def", '{"x":1}', "abc===", "=abc", "ab=c", "é"],
)
def test_parse_rejects_non_base64url_challenge(challenge: str) -> None:
    _assert_invalid_challenge(action_init_body(challenge=challenge), match="base64url")


def test_parse_rejects_challenge_with_trailing_newline() -> None:
    _assert_invalid_challenge(action_init_body(challenge="abc\n"), match="base64url")


def test_parse_rejects_over_long_challenge() -> None:
    err = _assert_invalid_challenge(action_init_body(challenge="a" * (MAX_CHALLENGE_LEN + 1)))
    assert "longer than" in err.message


@pytest.mark.parametrize("allow", [[], "key", 1, [{"key": []}]])
def test_parse_rejects_allow_credentials_not_object(allow: object) -> None:
    _assert_invalid_challenge(action_init_body(allowCredentials=allow), match="allowCredentials must be an object")


@pytest.mark.parametrize("keys", [{"id": CRED_ID}, CRED_ID, 7, None])
def test_parse_rejects_key_not_list(keys: object) -> None:
    _assert_invalid_challenge(
        action_init_body(allowCredentials={"key": keys, "webauthn": []}), match="allowCredentials.key must be a list"
    )


@pytest.mark.parametrize(
    "entry",
    [{"type": "public-key"}, {"type": "public-key", "id": 5}, {"id": None}, CRED_ID, ["id", CRED_ID]],
)
def test_parse_rejects_key_entry_without_string_id(entry: object) -> None:
    body = action_init_body(allowCredentials={"key": [{"type": "public-key", "id": CRED_ID}, entry]})
    _assert_invalid_challenge(body, match="string id")


def test_parse_rejects_non_string_challenge_identifier() -> None:
    _assert_invalid_challenge(action_init_body(challengeIdentifier=12), match="challengeIdentifier")


# --------------------------------------------------------------------------------------------------------------
# require_allowed
# --------------------------------------------------------------------------------------------------------------


def test_require_allowed_passes_for_listed_credential() -> None:
    ch = UserActionChallenge.parse(action_init_body())
    assert ch.require_allowed(CRED_ID, "ops") is None
    assert ch.require_allowed(OTHER_CRED_ID, "other") is None


def test_require_allowed_rejects_unlisted_credential_naming_allowed_ids() -> None:
    ch = UserActionChallenge.parse(action_init_body())
    with pytest.raises(CredentialNotAllowed) as info:
        ch.require_allowed("bm90LWFsbG93ZWQ", "ops")
    err = info.value
    assert err.status == 422
    assert err.code == "credential_not_allowed"
    assert "'ops'" in err.message
    assert "bm90LWFsbG93ZWQ" in err.message
    assert CRED_ID in err.message
    assert OTHER_CRED_ID in err.message


def test_require_allowed_says_no_key_credentials_when_none_allowed() -> None:
    body = action_init_body(allowCredentials={"key": [], "webauthn": [{"type": "public-key", "id": "d2Vi"}]})
    ch = UserActionChallenge.parse(body)
    with pytest.raises(CredentialNotAllowed, match="no Key credentials") as info:
        ch.require_allowed(CRED_ID, "ops")
    assert info.value.status == 422
    assert info.value.code == "credential_not_allowed"


# --------------------------------------------------------------------------------------------------------------
# The firstFactor of a user action (§1.3, §3), as it goes on the wire
# --------------------------------------------------------------------------------------------------------------


def sign_user_action(ch: UserActionChallenge, cred_id: str, signer: Signer, *, origin: str | None = None) -> Any:
    return KeyAssertion.sign(ClientData.for_user_action(ch, origin), cred_id, signer).to_json()


def key_assertion(cred_id: str, data: bytes, signature: bytes) -> Any:
    return KeyAssertion(cred_id, ClientData(data), signature).to_json()


def sign_registration(ch: RegistrationChallenge, cred_id: str, signer: Signer, *, origin: str | None = None) -> Any:
    return CredentialInfo.sign(ClientData.for_registration(ch, origin), cred_id, signer).to_json()


def test_client_data_carries_its_wire_forms() -> None:
    data = ClientData.build(SPEC_CHALLENGE, KEY_GET)
    assert data.raw == client_data(SPEC_CHALLENGE, KEY_GET)
    assert data.b64url == SPEC_CLIENT_DATA_B64
    assert data.sha256 == hashlib.sha256(data.raw).digest() and data.sha256_hex == hashlib.sha256(data.raw).hexdigest()
    assert ClientData.for_user_action(UserActionChallenge.parse(action_init_body())) == data


def test_registration_body_names_the_credential_and_keeps_the_challenge_identifier(signer: SoftwareSigner) -> None:
    ch = RegistrationChallenge.parse(credentials_init_body())
    info = CredentialInfo.sign(ClientData.for_registration(ch), "bmV3", signer)
    body = Registration(info, "hsm-2027", ch.challenge_identifier).to_json()
    assert body == {
        "credentialKind": "Key",
        "credentialInfo": info.to_json(),
        "credentialName": "hsm-2027",
        "challengeIdentifier": ch.challenge_identifier,
    }
    assert "challengeIdentifier" not in Registration(info, "x", None).to_json()


def test_software_signer_encodings(signer: SoftwareSigner) -> None:
    """Sanity check of the test double: the §3 encodings."""
    sig = signer.sign(b"hello")
    if signer.kind == "ed25519":
        assert len(sig) == 64
    elif signer.kind == "rsa2048":
        assert len(sig) == 256
    else:
        assert sig[0] == 0x30 and sig[1] == len(sig) - 2 and len(sig) <= 72  # DER SEQUENCE, not raw r||s
        r, s = decode_dss_signature(sig)
        assert r > 0 and s > 0
    verify_with_pem(signer.public_key_pem, sig, b"hello")


def test_sign_user_action_shape_and_signature(signer: SoftwareSigner) -> None:
    ch = UserActionChallenge.parse(action_init_body())
    result = sign_user_action(ch, CRED_ID, signer)

    assert set(result) == {"kind", "credentialAssertion"}
    assert result["kind"] == "Key"
    assertion = result["credentialAssertion"]
    assert set(assertion) == {"credId", "clientData", "signature"}
    assert assertion["credId"] == CRED_ID
    for field in ("clientData", "signature"):
        assert "=" not in assertion[field]
        assert re.fullmatch(r"[A-Za-z0-9_-]+", assertion[field])

    data = b64url_decode(assertion["clientData"])
    assert data == b'{"challenge":"' + SPEC_CHALLENGE.encode() + b'","type":"key.get"}'
    assert assertion["clientData"] == SPEC_CLIENT_DATA_B64
    assert signer.calls == [data]  # signs exactly those bytes, once

    signature = b64url_decode(assertion["signature"])
    verify_with_pem(signer.public_key_pem, signature, data)
    with pytest.raises(InvalidSignature):
        verify_with_pem(signer.public_key_pem, signature, client_data(SPEC_CHALLENGE, KEY_CREATE))
    with pytest.raises(InvalidSignature):
        verify_with_pem(signer.public_key_pem, signature, data + b" ")


def test_sign_user_action_with_origin_uses_sdk_form(signer: SoftwareSigner) -> None:
    ch = UserActionChallenge.parse(action_init_body())
    result = sign_user_action(ch, CRED_ID, signer, origin="https://app.dfns.io")
    assertion = result["credentialAssertion"]
    data = b64url_decode(assertion["clientData"])
    assert data == (
        b'{"type":"key.get","challenge":"' + SPEC_CHALLENGE.encode() + b'","origin":"https://app.dfns.io",'
        b'"crossOrigin":false}'
    )
    verify_with_pem(signer.public_key_pem, b64url_decode(assertion["signature"]), data)


def test_key_assertion_encodes_without_padding() -> None:
    out = key_assertion("aWQ", b"x", b"\xff\xfe")
    assert out == {"kind": "Key", "credentialAssertion": {"credId": "aWQ", "clientData": "eA", "signature": "__4"}}


# --------------------------------------------------------------------------------------------------------------
# Registration (§4.2)
# --------------------------------------------------------------------------------------------------------------


def test_registration_challenge_parse_realistic_body() -> None:
    body = credentials_init_body()
    ch = RegistrationChallenge.parse(body)
    assert ch.challenge == body["challenge"]
    assert ch.challenge_identifier == body["challengeIdentifier"]


def test_registration_challenge_parse_without_kind() -> None:
    body = credentials_init_body()
    del body["kind"]
    assert RegistrationChallenge.parse(body).challenge == "Y2gtcmVnaXN0cmF0aW9uLWNoYWxsZW5nZQ"


@pytest.mark.parametrize("kind", ["Fido2", "Password", "PasswordProtectedKey", "RecoveryKey", "key", 1])
def test_registration_challenge_rejects_other_kinds(kind: object) -> None:
    with pytest.raises(BadRequest, match="Key credentials") as info:
        RegistrationChallenge.parse(credentials_init_body(kind=kind))
    assert info.value.code == "invalid_challenge"
    assert info.value.status == 400


@pytest.mark.parametrize("obj", [None, [], "x"])
def test_registration_challenge_rejects_non_objects(obj: object) -> None:
    with pytest.raises(BadRequest) as info:
        RegistrationChallenge.parse(obj)
    assert info.value.code == "invalid_challenge"


@pytest.mark.parametrize("challenge", ["", None, "not base64url!", "a" * (MAX_CHALLENGE_LEN + 1)])
def test_registration_challenge_rejects_bad_challenge(challenge: object) -> None:
    with pytest.raises(BadRequest) as info:
        RegistrationChallenge.parse(credentials_init_body(challenge=challenge))
    assert info.value.code == "invalid_challenge"


def test_credential_fingerprint_exact_bytes() -> None:
    data = b'{"challenge":"abc","type":"key.create"}'
    pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    expected_hash = hashlib.sha256(data).hexdigest()
    assert (
        credential_fingerprint(data, pem)
        == (
            '{"clientDataHash":"' + expected_hash + '","publicKey":"-----BEGIN PUBLIC KEY-----\\nAAAA\\n'
            '-----END PUBLIC KEY-----\\n"}'
        ).encode()
    )


def test_sign_registration(signer: SoftwareSigner) -> None:
    ch = RegistrationChallenge.parse(credentials_init_body())
    new_cred_id = b64url(b"hsm-key-label")
    info = sign_registration(ch, new_cred_id, signer)

    assert set(info) == {"credId", "clientData", "attestationData"}
    assert info["credId"] == new_cred_id
    assert "=" not in info["clientData"] and "=" not in info["attestationData"]

    data = b64url_decode(info["clientData"])
    assert data == b'{"challenge":"Y2gtcmVnaXN0cmF0aW9uLWNoYWxsZW5nZQ","type":"key.create"}'

    attestation = json.loads(b64url_decode(info["attestationData"]))
    assert set(attestation) == {"publicKey", "signature"}
    assert attestation["publicKey"] == signer.public_key_pem
    assert re.fullmatch(r"[0-9a-f]+", attestation["signature"])  # lowercase hex

    # Rebuild the fingerprint the way the server does (§4.2 c) — independently of agent/dfns/.
    fingerprint = (
        '{"clientDataHash":"'
        + hashlib.sha256(data).hexdigest()
        + '","publicKey":'
        + json.dumps(attestation["publicKey"])
        + "}"
    ).encode("utf-8")
    assert signer.calls == [fingerprint]
    signature = bytes.fromhex(attestation["signature"])
    verify_with_pem(attestation["publicKey"], signature, fingerprint)
    with pytest.raises(InvalidSignature):
        verify_with_pem(attestation["publicKey"], signature, data)  # not clientData itself
    tampered = fingerprint.replace(hashlib.sha256(data).hexdigest().encode(), b"0" * 64)
    with pytest.raises(InvalidSignature):
        verify_with_pem(attestation["publicKey"], signature, tampered)


def test_sign_registration_with_origin(signer: SoftwareSigner) -> None:
    ch = RegistrationChallenge.parse(credentials_init_body())
    info = sign_registration(ch, "bmV3", signer, origin="https://app.dfns.io")
    data = b64url_decode(info["clientData"])
    assert data == (
        b'{"type":"key.create","challenge":"Y2gtcmVnaXN0cmF0aW9uLWNoYWxsZW5nZQ","origin":"https://app.dfns.io",'
        b'"crossOrigin":false}'
    )
    attestation = json.loads(b64url_decode(info["attestationData"]))
    fingerprint = json.dumps(
        {"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": signer.public_key_pem},
        separators=(",", ":"),
    ).encode()
    verify_with_pem(signer.public_key_pem, bytes.fromhex(attestation["signature"]), fingerprint)


def test_sign_registration_attestation_pem_is_byte_identical(signer: SoftwareSigner) -> None:
    ch = RegistrationChallenge.parse(credentials_init_body())
    info = sign_registration(ch, "bmV3", signer)
    raw = b64url_decode(info["attestationData"])
    pem = signer.public_key_pem
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert json.loads(raw)["publicKey"].encode() == pem.encode()
    assert json.dumps(pem).encode() in raw  # the PEM appears verbatim (JSON-escaped newlines only)
