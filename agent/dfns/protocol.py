"""The Dfns side of signing: which bytes to sign and what to send back (``dfns-protocol.md`` §2-§4).

Clients hand over the challenge object exactly as ``/auth/action/init`` (or ``/auth/credentials/init``)
returned it; the agent builds clientData itself, so a client can never get arbitrary bytes signed. This
module knows nothing of sockets or tokens: it takes any :class:`Signer`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

from agent.errors import BadRequest, CredentialNotAllowed

KEY_GET = "key.get"
KEY_CREATE = "key.create"
MAX_CHALLENGE_LEN = 1024
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


class Signer(Protocol):
    """Signs bytes with one key, returning the encoding Dfns expects for its algorithm (§3)."""

    def sign(self, message: bytes) -> bytes: ...

    @property
    def public_key_pem(self) -> str: ...


def b64url(data: bytes) -> str:
    """base64url without padding, as every Dfns SDK sends it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cred_id_for_key(spki_der: bytes) -> str:
    """The credId the agent uses for a key when none is configured: base64url(SHA-256(SPKI DER)).

    Stable for a key and unique across keys; it is what a key registered through the agent is called.
    """
    return b64url(hashlib.sha256(spki_der).digest())


def client_data(challenge: str, kind: str, origin: str | None = None) -> bytes:
    """The exact clientData bytes to sign.

    Default: compact JSON with sorted keys, ``{"challenge":…,"type":…}`` (Dfns's documented form).
    With an ``origin``: the seed form ``{"type","challenge","origin","crossOrigin":false}`` in that order,
    which is what the Python SDK and older TypeScript SDKs emit.

    Spelled out rather than ``json.dumps(..., separators=(",", ":"))``, which builds an encoder per call;
    the string quoting is json's own, so the bytes are the same.
    """
    q = encode_basestring_ascii
    if origin is None:
        text = f'{{"challenge":{q(challenge)},"type":{q(kind)}}}'
    else:
        text = f'{{"type":{q(kind)},"challenge":{q(challenge)},"origin":{q(origin)},"crossOrigin":false}}'
    return text.encode("ascii")


def _challenge_string(obj: Mapping[str, Any]) -> str:
    value = obj.get("challenge")
    if not isinstance(value, str) or not value:
        raise BadRequest("challenge.challenge must be a non-empty string", code="invalid_challenge")
    if len(value) > MAX_CHALLENGE_LEN:
        raise BadRequest(f"challenge.challenge is longer than {MAX_CHALLENGE_LEN} characters", code="invalid_challenge")
    if not _B64URL_RE.fullmatch(value):
        raise BadRequest("challenge.challenge is not base64url text", code="invalid_challenge")
    return value


def _optional_string(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"challenge.{key} must be a string", code="invalid_challenge")
    return value


@dataclass(frozen=True)
class UserActionChallenge:
    """What the agent needs from an ``/auth/action/init`` answer."""

    challenge: str
    challenge_identifier: str | None
    allowed_key_ids: tuple[str, ...]

    @classmethod
    def parse(cls, obj: Any) -> UserActionChallenge:
        if not isinstance(obj, Mapping):
            raise BadRequest("challenge must be the JSON object /auth/action/init returned", code="invalid_challenge")
        challenge = _challenge_string(obj)
        ident = _optional_string(obj, "challengeIdentifier")
        allow = obj.get("allowCredentials", {})
        if not isinstance(allow, Mapping):
            raise BadRequest("challenge.allowCredentials must be an object", code="invalid_challenge")
        keys = allow.get("key", [])
        if not isinstance(keys, list):
            raise BadRequest("challenge.allowCredentials.key must be a list", code="invalid_challenge")
        ids = []
        for entry in keys:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
                raise BadRequest(
                    "each challenge.allowCredentials.key entry must be an object with a string id",
                    code="invalid_challenge",
                )
            ids.append(entry["id"])
        return cls(challenge=challenge, challenge_identifier=ident, allowed_key_ids=tuple(ids))

    def require_allowed(self, cred_id: str, name: str) -> None:
        if cred_id not in self.allowed_key_ids:
            allowed = ", ".join(self.allowed_key_ids) if self.allowed_key_ids else "no Key credentials"
            raise CredentialNotAllowed(
                f"credential {name!r} (credId {cred_id}) is not in the challenge's allowCredentials.key; "
                f"allowed: {allowed}"
            )


@dataclass(frozen=True)
class RegistrationChallenge:
    """What the agent needs from an ``/auth/credentials/init`` answer."""

    challenge: str
    challenge_identifier: str | None

    @classmethod
    def parse(cls, obj: Any) -> RegistrationChallenge:
        if not isinstance(obj, Mapping):
            raise BadRequest(
                "challenge must be the JSON object /auth/credentials/init returned", code="invalid_challenge"
            )
        kind = obj.get("kind")
        if kind is not None and kind != "Key":
            raise BadRequest(
                f"challenge.kind is {kind!r}; the agent registers Key credentials", code="invalid_challenge"
            )
        return cls(challenge=_challenge_string(obj), challenge_identifier=_optional_string(obj, "challengeIdentifier"))


def key_assertion(cred_id: str, data: bytes, signature: bytes) -> dict[str, Any]:
    """The ``firstFactor`` object for ``POST /auth/action``."""
    return {
        "kind": "Key",
        "credentialAssertion": {"credId": cred_id, "clientData": b64url(data), "signature": b64url(signature)},
    }


def sign_user_action(
    challenge: UserActionChallenge, cred_id: str, signer: Signer, *, origin: str | None = None
) -> dict[str, Any]:
    data = client_data(challenge.challenge, KEY_GET, origin)
    return key_assertion(cred_id, data, signer.sign(data))


def credential_fingerprint(data: bytes, public_key_pem: str) -> bytes:
    """The "Credential Info Fingerprint" the new key signs at registration (§4.2 c)."""
    doc = {"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": public_key_pem}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def sign_registration(
    challenge: RegistrationChallenge, cred_id: str, signer: Signer, *, origin: str | None = None
) -> dict[str, str]:
    """``credentialInfo`` for ``POST /auth/credentials``: clientData plus attestationData signed by the new key."""
    data = client_data(challenge.challenge, KEY_CREATE, origin)
    pem = signer.public_key_pem
    signature = signer.sign(credential_fingerprint(data, pem))
    attestation = json.dumps({"publicKey": pem, "signature": signature.hex()}, separators=(",", ":"))
    return {"credId": cred_id, "clientData": b64url(data), "attestationData": b64url(attestation.encode("utf-8"))}
