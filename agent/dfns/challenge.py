"""Challenges as Dfns hands them out (``/auth/action/init``, ``/auth/credentials/init``), checked on the way in.

Clients pass the challenge object exactly as Dfns returned it; only the fields the agent needs are read,
and each is checked, so a malformed one is a clear 400 and never reaches the token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import BadRequest, CredentialNotAllowed

MAX_CHALLENGE_LEN = 1024
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_challenge")


def _challenge_string(obj: Mapping[str, Any]) -> str:
    value = obj.get("challenge")
    if not isinstance(value, str) or not value:
        raise _invalid("challenge.challenge must be a non-empty string")
    if len(value) > MAX_CHALLENGE_LEN:
        raise _invalid(f"challenge.challenge is longer than {MAX_CHALLENGE_LEN} characters")
    if not _B64URL_RE.fullmatch(value):
        raise _invalid("challenge.challenge is not base64url text")
    return value


def _optional_string(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"challenge.{key} must be a string")
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
            raise _invalid("challenge must be the JSON object /auth/action/init returned")
        challenge = _challenge_string(obj)
        ident = _optional_string(obj, "challengeIdentifier")
        allow = obj.get("allowCredentials", {})
        if not isinstance(allow, Mapping):
            raise _invalid("challenge.allowCredentials must be an object")
        keys = allow.get("key", [])
        if not isinstance(keys, list):
            raise _invalid("challenge.allowCredentials.key must be a list")
        ids = []
        for entry in keys:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
                raise _invalid("each challenge.allowCredentials.key entry must be an object with a string id")
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
            raise _invalid("challenge must be the JSON object /auth/credentials/init returned")
        kind = obj.get("kind")
        if kind is not None and kind != "Key":
            raise _invalid(f"challenge.kind is {kind!r}; the agent registers Key credentials")
        return cls(challenge=_challenge_string(obj), challenge_identifier=_optional_string(obj, "challengeIdentifier"))
