"""Configured Dfns Key credentials bound to keys on the token, and how a request picks one.

A credential is a name (what callers and the policy say), a Dfns credId and a key; a request names one,
or the agent picks the first the challenge allows and the caller's grant permits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import CredentialConfig
from agent.core.keystore import KeyStore
from agent.core.policy import Grant
from agent.dfns import UserActionChallenge, cred_id_for_key
from agent.errors import ConfigError, CredentialNotAllowed, UnknownCredential
from agent.token.keys import KeyInfo


@dataclass(frozen=True)
class Credential:
    name: str
    cred_id: str
    key: KeyInfo
    origin: str | None = None

    def to_json(self) -> dict[str, Any]:
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


class Credentials:
    """The agent's credentials by name, in configuration order."""

    def __init__(self, credentials: Sequence[Credential]) -> None:
        self._by_name = {c.name: c for c in credentials}

    @classmethod
    def from_config(cls, keys: KeyStore, configs: Sequence[CredentialConfig]) -> Credentials:
        """Find each credential's key; a missing or ambiguous key is a start-up (or reload) error, and so
        are two credentials with the same effective credId (see :func:`_refuse_shared_cred_ids`)."""
        found = []
        for c in configs:
            key = keys.find_key(c.key, c.key_id)
            found.append(Credential(c.name, c.cred_id or cred_id_for_key(key.spki_der), key, c.origin))
        _refuse_shared_cred_ids(found, configs)
        return cls(found)

    def __iter__(self) -> Iterator[Credential]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Credential:
        """The credential called ``name``, else 404 naming the ones there are."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name) or "none"
            raise UnknownCredential(f"no credential named {name!r}; configured: {known}") from None

    def resolve(self, name: str, grant: Grant) -> Credential:
        """``name``, which must exist (404) and be granted (403)."""
        cred = self.get(name)
        grant.require_credential(cred.name)
        return cred

    def usable(self, grant: Grant) -> list[Credential]:
        return [c for c in self._by_name.values() if grant.allows(c.name)]

    def for_challenge(self, challenge: UserActionChallenge, name: str | None, grant: Grant) -> Credential:
        """The named credential, which the challenge must allow; else the first allowed one the grant permits."""
        if name is not None:
            cred = self.resolve(name, grant)
            challenge.require_allowed(cred.cred_id, cred.name)
            return cred
        usable = self.usable(grant)
        for cred in usable:
            if cred.cred_id in challenge.allowed_key_ids:
                return cred
        allowed = ", ".join(challenge.allowed_key_ids) or "no Key credentials"
        mine = ", ".join(f"{c.name} ({c.cred_id})" for c in usable) or "none you may use"
        raise CredentialNotAllowed(
            f"none of the agent's credentials is allowed by the challenge: it allows {allowed}; the agent has {mine}"
        )


def _refuse_shared_cred_ids(found: Sequence[Credential], configs: Sequence[CredentialConfig]) -> None:
    """Two credentials with one effective credId must sign alike: the same key and the same origin (so the
    same clientData form). Then they are one Dfns credential under two names (say, with other Dfns API
    settings, or registered in two Dfns organisations: a key registered through the agent has the credId
    derived from it in each), and whichever a challenge picks, the signature is the same. Otherwise which
    key or which clientData form a challenge allowing that credId gets would depend on the order of the
    config; the usual cause is two credentials on one key without ``cred_id`` (both get the key's credId)."""
    first: dict[str, tuple[Credential, CredentialConfig]] = {}
    for cred, config in zip(found, configs, strict=True):
        if cred.cred_id not in first:
            first[cred.cred_id] = (cred, config)
            continue
        other, other_config = first[cred.cred_id]
        if other.key.fingerprint == cred.key.fingerprint and other.origin == cred.origin:
            continue
        pair = f"credentials {other.name!r} and {cred.name!r}"
        if other_config.cred_id is None and config.cred_id is None:
            same = f"both use key {cred.key.label!r} without a cred_id, so both get the credId derived from it"
        elif other_config.cred_id is None or config.cred_id is None:
            same = "have the same credId (one set by cred_id, the other derived from the key)"
        else:
            same = "set the same cred_id"
        if other.key.fingerprint != cred.key.fingerprint:
            differ = f"but different keys ({other.key.label!r}, {cred.key.label!r}): Dfns knows one key per credId"
        else:
            differ = (
                f"but sign different clientData (origin {other.origin or 'none'} vs {cred.origin or 'none'}): "
                "which form a challenge allowing it gets would depend on the order of the config"
            )
        raise ConfigError(
            f"{pair} {same} ({cred.cred_id}) {differ}. Give each an explicit, distinct cred_id (the credId "
            "Dfns registered for it), or remove one of them"
        )
