"""The signing service: configured Dfns credentials bound to keys on the token.

This is what the server (and, later, other front ends) call; it turns a challenge and an optional
credential name into Dfns's ``firstFactor`` or ``credentialInfo``. It is thread-safe: the server runs it on
a pool of threads, each of which signs on its own token session.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import dfns
from agent.config import CredentialConfig
from agent.errors import AgentError, CredentialNotAllowed, UnknownCredential
from agent.token import KeyInfo, Token


@dataclass(frozen=True)
class Credential:
    name: str
    cred_id: str
    key: KeyInfo
    origin: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "credId": self.cred_id,
            "keyLabel": self.key.label,
            "keyId": self.key.id.hex(),
            "keyType": self.key.type_name,
            "fingerprint": self.key.fingerprint,
            "publicKey": self.key.public_pem,
            "origin": self.origin,
        }


class _KeySigner:
    """A :class:`agent.dfns.Signer` backed by one key on the token."""

    def __init__(self, token: Token, key: KeyInfo) -> None:
        self._token, self._key = token, key

    def sign(self, message: bytes) -> bytes:
        return self._token.sign(self._key, message)

    @property
    def public_key_pem(self) -> str:
        return self._key.public_pem


class SigningService:
    def __init__(self, token: Token, credentials: Sequence[Credential]) -> None:
        self.token = token
        self._credentials = {c.name: c for c in credentials}
        self.started = time.time()

    @classmethod
    def from_config(cls, token: Token, configs: Sequence[CredentialConfig]) -> SigningService:
        """Find each credential's key on the token; a missing or ambiguous key is a start-up error."""
        creds = []
        for c in configs:
            key = token.find_key(c.key, c.key_id)
            creds.append(Credential(c.name, c.cred_id or dfns.cred_id_for_key(key.spki_der), key, c.origin))
        return cls(token, creds)

    @property
    def credentials(self) -> list[Credential]:
        return list(self._credentials.values())

    def credential(self, name: str) -> Credential:
        try:
            return self._credentials[name]
        except KeyError:
            known = ", ".join(self._credentials) or "none"
            raise UnknownCredential(f"no credential named {name!r}; configured: {known}") from None

    def _choose(self, challenge: dfns.UserActionChallenge, name: str | None) -> Credential:
        if name is not None:
            cred = self.credential(name)
            challenge.require_allowed(cred.cred_id, cred.name)
            return cred
        for cred in self._credentials.values():
            if cred.cred_id in challenge.allowed_key_ids:
                return cred
        allowed = ", ".join(challenge.allowed_key_ids) or "no Key credentials"
        mine = ", ".join(f"{c.name} ({c.cred_id})" for c in self._credentials.values())
        raise CredentialNotAllowed(
            f"none of the agent's credentials is allowed by the challenge: it allows {allowed}; the agent has {mine}"
        )

    def sign(self, challenge: Mapping[str, Any], credential: str | None = None) -> dict[str, Any]:
        """Sign an ``/auth/action/init`` challenge; returns ``firstFactor`` for ``POST /auth/action``."""
        parsed = dfns.UserActionChallenge.parse(challenge)
        cred = self._choose(parsed, credential)
        return dfns.sign_user_action(parsed, cred.cred_id, _KeySigner(self.token, cred.key), origin=cred.origin)

    def register(
        self,
        challenge: Mapping[str, Any],
        credential: str,
        *,
        cred_id: str | None = None,
        credential_name: str | None = None,
    ) -> dict[str, Any]:
        """Sign an ``/auth/credentials/init`` challenge with the credential's key.

        Returns the body for ``POST /auth/credentials`` (which needs a user action from an existing credential).
        """
        parsed = dfns.RegistrationChallenge.parse(challenge)
        cred = self.credential(credential)
        info = dfns.sign_registration(
            parsed, cred_id or cred.cred_id, _KeySigner(self.token, cred.key), origin=cred.origin
        )
        body: dict[str, Any] = {
            "credentialKind": "Key",
            "credentialInfo": info,
            "credentialName": credential_name or cred.name,
        }
        if parsed.challenge_identifier is not None:
            body["challengeIdentifier"] = parsed.challenge_identifier
        return body

    def health(self) -> dict[str, Any]:
        """Token reachable, anchor session logged in, and every credential's key still the same key."""
        status = self.token.status()
        keys: dict[str, bool] = {}
        for cred in self._credentials.values():
            try:
                found = self.token.find_key(cred.key.label, cred.key.id or None)
                keys[cred.name] = found.fingerprint == cred.key.fingerprint
            except AgentError:
                keys[cred.name] = False
        ok = status["present"] and status["logged_in"] and all(keys.values())
        result: dict[str, Any] = {
            "status": "ok" if ok else "down",
            "token": {**self.token.identity.describe(), "present": status["present"], "loggedIn": status["logged_in"]},
            "keys": keys,
            "uptimeSeconds": round(time.time() - self.started, 3),
        }
        if not ok:
            reasons = [status.get("reason")] if status.get("reason") else []
            if status["present"] and not status["logged_in"]:
                reasons.append("the token session is no longer logged in")
            reasons += [f"key for credential {n!r} not found or changed" for n, good in keys.items() if not good]
            result["reason"] = "; ".join(r for r in reasons if r)
        return result
