"""Verifying a Key credential's signature the way Dfns does (``dfns-protocol.md`` §3).

Node's ``crypto.verify`` defaults: pure Ed25519 (64 bytes), strict-DER ECDSA over SHA-256 (a raw ``r||s``,
what an HSM's CKM_ECDSA returns, is rejected), RSA PKCS#1 v1.5 over SHA-256. The agent uses it to prove a
key still signs after a reconnect; the local Dfns-compatible server uses it to judge assertions.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def load_public_key(pem: str) -> PublicKey:
    """Parse a PEM public key of a kind Dfns accepts for Key credentials (§3), else :class:`ValueError`."""
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeError) as e:
        raise ValueError("publicKey is not a PEM public key") from e
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP256K1)):
            raise ValueError(f"unsupported elliptic curve {key.curve.name}; use P-256, secp256k1 or Ed25519")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA keys must be at least 2048 bits")
        return key
    raise ValueError("unsupported public key type; use Ed25519, ECDSA P-256/secp256k1 or RSA")


def _hash_for(algorithm: object) -> hashes.HashAlgorithm | None:
    """The digest named by an optional ``algorithm`` field (§3/§4.2 d); None when the name is unknown."""
    if algorithm is None or algorithm in ("SHA256", "RSA-SHA256", "sha256"):
        return hashes.SHA256()
    if algorithm in ("SHA512", "RSA-SHA512", "sha512"):
        return hashes.SHA512()
    return None


def verify_signature(key: PublicKey, signature: bytes, message: bytes, algorithm: object = None) -> bool:
    """True when ``signature`` is a valid Dfns-encoded signature of ``message`` by ``key``."""
    digest = _hash_for(algorithm)
    if digest is None:
        return False
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            if len(signature) != 64:
                return False
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            r, s = decode_dss_signature(signature)
            if encode_dss_signature(r, s) != signature:
                return False
            key.verify(signature, message, ec.ECDSA(digest))
        else:
            key.verify(signature, message, padding.PKCS1v15(), digest)
    except (InvalidSignature, ValueError):
        return False
    return True
