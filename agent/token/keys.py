"""Key kinds Dfns accepts, the templates the agent creates them with, and their encodings on the wire.

Signatures come back in the standard encodings that ``cryptography`` verifies and Dfns expects: Ed25519
raw 64 bytes, ECDSA DER ``SEQUENCE{r, s}`` over SHA-256, RSA PKCS#1 v1.5 over SHA-256.

The mechanism for each kind is chosen from what the module reports (``C_GetMechanismList``/``Info``, with
``CKF_SIGN``): RSA prefers ``CKM_SHA256_RSA_PKCS`` and falls back to ``CKM_RSA_PKCS`` over a DigestInfo
built here (opencryptoki 3.8's soft token has only that); ECDSA hashes here and signs with ``CKM_ECDSA``
(SoftHSM 2.6 has no ``CKM_ECDSA_SHA256``); Ed25519 needs ``CKM_EDDSA``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT

from agent.dfns.verify import PublicKey, verify_signature
from agent.errors import IdentityMismatch, KeyNotFound, UnsupportedKey, UnsupportedMechanism


class KeyKind(str, Enum):
    """The key types Dfns accepts for Key credentials."""

    ED25519 = "ed25519"
    P256 = "p256"
    SECP256K1 = "secp256k1"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"


# DER-encoded CKA_EC_PARAMS (namedCurve OIDs), and the PrintableString form some modules use for Ed25519.
ED25519_OID = bytes.fromhex("06032b6570")
ED25519_NAME = b"\x13\x0cedwards25519"
EC_PARAMS = {
    KeyKind.P256: bytes.fromhex("06082a8648ce3d030107"),
    KeyKind.SECP256K1: bytes.fromhex("06052b8104000a"),
}
_EC_CURVES: dict[KeyKind, ec.EllipticCurve] = {KeyKind.P256: ec.SECP256R1(), KeyKind.SECP256K1: ec.SECP256K1()}
RSA_BITS = {KeyKind.RSA2048: 2048, KeyKind.RSA3072: 3072}

# Private keys sign and do nothing else; they never leave the token.
PRIVATE_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# What a private key may allow besides signing; keys that do are reported and refused unless configured.
OTHER_USAGES = (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)
# keygen_template = "module": the security attributes only, usages left to the module (tpm2-pkcs11 refuses
# CKA_DECRYPT/CKA_ENCRYPT = FALSE: "User specified and TPM specified attr mismatch").
MODULE_PRIVATE_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    # DEFAULT: python-pkcs11 leaves the attribute out (it would set its own capabilities otherwise)
    **{a: DEFAULT for a in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)},
}
MODULE_PUBLIC_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    **{a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.WRAP, Attribute.DERIVE)},
}
PUBLIC_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}


@dataclass(frozen=True)
class KeyInfo:
    """A private key on the token and its public half, as the agent needs to know it."""

    label: str
    id: bytes
    kind: KeyKind | None
    type_name: str
    public_key: PublicKey | None = field(repr=False, compare=False)
    sensitive: bool = True
    extractable: bool = False
    always_sensitive: bool = True
    never_extractable: bool = True
    other_usages: tuple[str, ...] = ()  # what the private key allows besides signing (CKA_DECRYPT, ...)
    signs: bool = True  # CKA_SIGN (true where a module does not say): python-pkcs11 offers no sign() without it

    @cached_property
    def spki_der(self) -> bytes:
        if self.public_key is None:
            raise UnsupportedKey(f"no public key found for key {self.label!r}")
        return self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @cached_property
    def public_pem(self) -> str:
        if self.public_key is None:
            raise UnsupportedKey(f"no public key found for key {self.label!r}")
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @cached_property
    def fingerprint(self) -> str:
        """``sha256:`` + hex SHA-256 of the SubjectPublicKeyInfo DER."""
        return "sha256:" + hashlib.sha256(self.spki_der).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """As ``dfns-agent keys list --json`` prints it (camelCase, like every JSON the agent writes)."""
        return {
            "label": self.label,
            "id": self.id.hex(),
            "type": self.type_name,
            "fingerprint": self.fingerprint if self.public_key is not None else None,
            "sensitive": self.sensitive,
            "extractable": self.extractable,
            "alwaysSensitive": self.always_sensitive,
            "neverExtractable": self.never_extractable,
            "otherUsages": list(self.other_usages),
        }


def _der_octets(raw: bytes, size: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING per the standard; some modules return the bare point."""
    if len(raw) == size:
        return raw
    if len(raw) >= 2 and raw[0] == 0x04:
        if raw[1] < 0x80 and raw[1] == len(raw) - 2:
            return raw[2:]
        if raw[1] == 0x81 and len(raw) > 3 and raw[2] == len(raw) - 3:
            return raw[3:]
    raise UnsupportedKey(f"unexpected CKA_EC_POINT encoding ({len(raw)} bytes)")


def _attr(obj: Any, attribute: Attribute, default: Any = None) -> Any:
    try:
        return obj[attribute]
    except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
        return default


def _classify(priv: Any) -> tuple[KeyKind | None, str]:
    key_type = _attr(priv, Attribute.KEY_TYPE)
    if key_type == KeyType.EC_EDWARDS:
        params = _attr(priv, Attribute.EC_PARAMS, b"")
        if params in (ED25519_OID, ED25519_NAME):
            return KeyKind.ED25519, KeyKind.ED25519.value
        return None, "eddsa (unsupported curve)"
    if key_type == KeyType.EC:
        params = _attr(priv, Attribute.EC_PARAMS, b"")
        for kind, der in EC_PARAMS.items():
            if params == der:
                return kind, kind.value
        return None, "ec (unsupported curve)"
    if key_type == KeyType.RSA:
        modulus = _attr(priv, Attribute.MODULUS, b"")
        bits = len(modulus) * 8
        for kind, want in RSA_BITS.items():
            if bits == want:
                return kind, kind.value
        return None, f"rsa{bits} (unsupported size)"
    return None, f"key type {key_type} (unsupported)"


def _public_key(session: Any, priv: Any, kind: KeyKind | None) -> PublicKey | None:
    if kind in RSA_BITS:
        n = int.from_bytes(priv[Attribute.MODULUS], "big")
        e = int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kind is None:
        return None
    pub = _find_public(session, priv)
    if pub is None:
        return None
    point = pub[Attribute.EC_POINT]
    if kind is KeyKind.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(_der_octets(point, 32))
    return ec.EllipticCurvePublicKey.from_encoded_point(_EC_CURVES[kind], _der_octets(point, 65))


def _find_public(session: Any, priv: Any) -> Any:
    key_id = _attr(priv, Attribute.ID, b"")
    query: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if key_id:
        query[Attribute.ID] = key_id
    else:
        query[Attribute.LABEL] = priv[Attribute.LABEL]
    return next(iter(session.get_objects(query)), None)


def key_info(session: Any, priv: Any) -> KeyInfo:
    kind, type_name = _classify(priv)
    return KeyInfo(
        label=priv[Attribute.LABEL],
        id=_attr(priv, Attribute.ID, b"") or b"",
        kind=kind,
        type_name=type_name,
        public_key=_public_key(session, priv, kind),
        sensitive=bool(_attr(priv, Attribute.SENSITIVE, False)),
        extractable=bool(_attr(priv, Attribute.EXTRACTABLE, True)),
        always_sensitive=bool(_attr(priv, Attribute.ALWAYS_SENSITIVE, False)),
        never_extractable=bool(_attr(priv, Attribute.NEVER_EXTRACTABLE, False)),
        other_usages=tuple(f"CKA_{a.name}" for a in OTHER_USAGES if _attr(priv, a, False)),
        signs=bool(_attr(priv, Attribute.SIGN, True)),
    )


# The mechanisms that can make each kind's signature, best first.
SIGN_MECHANISMS: dict[KeyKind, tuple[Mechanism, ...]] = {
    KeyKind.ED25519: (Mechanism.EDDSA,),
    KeyKind.P256: (Mechanism.ECDSA,),
    KeyKind.SECP256K1: (Mechanism.ECDSA,),
    KeyKind.RSA2048: (Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS),
    KeyKind.RSA3072: (Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS),
}
# DER DigestInfo header for SHA-256 (RFC 8017 §9.2 note 1): what CKM_RSA_PKCS signs in front of the digest.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def mechanism_name(mechanism: Mechanism) -> str:
    return f"CKM_{mechanism.name}"


def choose_mechanism(kind: KeyKind, slot: Any, where: str) -> Mechanism:
    """The best mechanism the slot offers for signing with ``kind`` keys; names the ones it lacks."""
    offered = slot.get_mechanisms()
    for mechanism in SIGN_MECHANISMS[kind]:
        if mechanism in offered and slot.get_mechanism_info(mechanism).flags & MechanismFlag.SIGN:
            return mechanism
    wanted = " or ".join(mechanism_name(m) for m in SIGN_MECHANISMS[kind])
    raise UnsupportedMechanism(f"{where} offers no {wanted} for signing: cannot sign with {kind.value} keys")


def sign_with(priv: Any, kind: KeyKind, message: bytes, mechanism: Mechanism | None = None) -> bytes:
    """Sign with ``mechanism`` (one of :data:`SIGN_MECHANISMS`; default: the first for ``kind``)."""
    mechanism = mechanism or SIGN_MECHANISMS[kind][0]
    if kind is KeyKind.ED25519:
        return bytes(priv.sign(message, mechanism=Mechanism.EDDSA))
    if kind in EC_PARAMS:
        raw = bytes(priv.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    if mechanism is Mechanism.RSA_PKCS:
        return bytes(priv.sign(SHA256_DIGEST_INFO + hashlib.sha256(message).digest(), mechanism=Mechanism.RSA_PKCS))
    return bytes(priv.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS))


def generate_keypair(session: Any, kind: KeyKind, label: str, *, sign_only: bool = True) -> Any:
    """Generate a key pair on the device with the sign-only templates (or, ``sign_only=False``, with only the
    security attributes, usages left to the module); returns the private key object."""
    private, public = (
        (PRIVATE_TEMPLATE, PUBLIC_TEMPLATE) if sign_only else (MODULE_PRIVATE_TEMPLATE, MODULE_PUBLIC_TEMPLATE)
    )
    common = {"id": secrets.token_bytes(8), "label": label, "store": True}
    if kind is KeyKind.ED25519:
        try:
            _, priv = session.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={**public, Attribute.EC_PARAMS: ED25519_OID},
                private_template=private,
                **common,
            )
        except (p11.DomainParamsInvalid, p11.AttributeValueInvalid):
            # Modules that predate RFC 8410 OIDs in PKCS#11 only know the curve by name.
            _, priv = session.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={**public, Attribute.EC_PARAMS: ED25519_NAME},
                private_template=private,
                **common,
            )
    elif kind in EC_PARAMS:
        params = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: EC_PARAMS[kind]}, local=True)
        _, priv = params.generate_keypair(public_template=public, private_template=private, **common)
    else:
        _, priv = session.generate_keypair(
            KeyType.RSA, RSA_BITS[kind], public_template=public, private_template=private, **common
        )
    return priv


def ambiguous_label(label: str, ids: Sequence[bytes]) -> KeyNotFound:
    """Several keys carry ``label``: name their ids and both ways to choose one (a credential names its key
    by key_id, `keys public` by --id)."""
    listed = ", ".join(i.hex() or "(none)" for i in ids)
    return KeyNotFound(
        f"{len(ids)} private keys are labelled {label!r} (ids {listed}); "
        'choose one: key_id = "<hex id>" in the credential\'s config, --id for keys public'
    )


def no_such_key(label: str, key_id: bytes | None, where: str) -> KeyNotFound:
    """No key matches: with an id given, say so, since a key with that label may well be there under another."""
    with_id = f" with id {key_id.hex()}" if key_id else ""
    return KeyNotFound(f"no private key labelled {label!r}{with_id} on {where}")


def find_key(session: Any, label: str, key_id: bytes | None, where: str) -> KeyInfo:
    """The one private key with this label (and id), of a supported kind, with its public key."""
    query: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
    if key_id:
        query[Attribute.ID] = key_id
    found = list(session.get_objects(query))
    if not found:
        raise no_such_key(label, key_id, where)
    if len(found) > 1:
        raise ambiguous_label(label, [_attr(p, Attribute.ID, b"") for p in found])
    info = key_info(session, found[0])
    if info.kind is None:
        raise UnsupportedKey(f"key {label!r} is {info.type_name}; supported: {', '.join(k.value for k in KeyKind)}")
    if info.public_key is None:
        raise UnsupportedKey(f"key {label!r} has no public key object on {where}")
    return info


def self_test(session: Any, found: KeyInfo, expected: KeyInfo, mechanism: Mechanism | None = None) -> None:
    """Sign a fresh nonce with the key on the device and verify it with the public key known at start-up."""
    assert found.kind is not None and expected.public_key is not None
    nonce = b"dfns-agent self-test " + secrets.token_bytes(16)
    priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=found.label, id=found.id or None)
    if not verify_signature(expected.public_key, sign_with(priv, found.kind, nonce, mechanism), nonce):
        raise IdentityMismatch(f"key {found.label!r} failed the sign/verify self-test")
