"""What a Key credential sends back to Dfns (``dfns-protocol.md`` §3, §4): the signed assertion of a user
action, and the credential info (clientData + attestation) of a registration."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dfns.clientdata import ClientData
from agent.dfns.encoding import b64url


class Signer(Protocol):
    """Signs bytes with one key, returning the encoding Dfns expects for its algorithm (§3)."""

    def sign(self, message: bytes) -> bytes: ...

    @property
    def public_key_pem(self) -> str: ...


def cred_id_for_key(spki_der: bytes) -> str:
    """The credId the agent uses for a key when none is configured: base64url(SHA-256(SPKI DER)).

    Stable for a key and unique across keys; it is what a key registered through the agent is called.
    """
    return b64url(hashlib.sha256(spki_der).digest())


@dataclass(frozen=True)
class KeyAssertion:
    """The ``firstFactor`` of ``POST /auth/action``: the clientData signed by the credential's key."""

    cred_id: str
    client_data: ClientData
    signature: bytes

    @classmethod
    def sign(cls, data: ClientData, cred_id: str, signer: Signer) -> KeyAssertion:
        """Sign ``key.get`` clientData (see :meth:`ClientData.for_user_action`)."""
        return cls(cred_id, data, signer.sign(data.raw))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "Key",
            "credentialAssertion": {
                "credId": self.cred_id,
                "clientData": self.client_data.b64url,
                "signature": b64url(self.signature),
            },
        }


def credential_fingerprint(data: bytes, public_key_pem: str) -> bytes:
    """The "Credential Info Fingerprint" the new key signs at registration (§4.2 c)."""
    doc = {"clientDataHash": hashlib.sha256(data).hexdigest(), "publicKey": public_key_pem}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class CredentialInfo:
    """``credentialInfo`` for ``POST /auth/credentials``: clientData plus attestationData signed by the new key."""

    cred_id: str
    client_data: ClientData
    attestation: bytes

    @classmethod
    def sign(cls, data: ClientData, cred_id: str, signer: Signer) -> CredentialInfo:
        """Attest ``key.create`` clientData with the new key (see :meth:`ClientData.for_registration`)."""
        pem = signer.public_key_pem
        signature = signer.sign(credential_fingerprint(data.raw, pem))
        attestation = json.dumps({"publicKey": pem, "signature": signature.hex()}, separators=(",", ":"))
        return cls(cred_id, data, attestation.encode("utf-8"))

    def to_json(self) -> dict[str, str]:
        return {
            "credId": self.cred_id,
            "clientData": self.client_data.b64url,
            "attestationData": b64url(self.attestation),
        }


@dataclass(frozen=True)
class Registration:
    """The body of ``POST /auth/credentials`` for a new Key credential."""

    info: CredentialInfo
    name: str
    challenge_identifier: str | None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "credentialKind": "Key",
            "credentialInfo": self.info.to_json(),
            "credentialName": self.name,
        }
        if self.challenge_identifier is not None:
            body["challengeIdentifier"] = self.challenge_identifier
        return body
