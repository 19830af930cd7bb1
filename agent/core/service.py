"""The signing service: configured Dfns credentials bound to keys on the token.

This is what the server (and, later, other front ends) call; it turns a challenge and an optional
credential name into Dfns's ``firstFactor`` or ``credentialInfo``. It is thread-safe: the server runs it on
a pool of threads, each of which signs on its own token session. Every signing attempt that gets as far
as choosing a credential is written to the audit log before its result is returned.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.caller import Caller
from agent.config import CredentialConfig
from agent.core.audit import AuditLog, elapsed_ms
from agent.core.metrics import Metrics
from agent.core.policy import UNRESTRICTED, Grant
from agent.dfns import protocol as dfns
from agent.errors import AgentError, CircuitOpen, CredentialNotAllowed, UnknownCredential
from agent.token.device import KeyInfo, Token


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


@dataclass
class Attempt:
    """A signing attempt and its audit record, before the record is written."""

    record: dict[str, Any]
    started: float
    result: dict[str, Any] | None = None
    error: AgentError | None = None

    def kind(self, error: AgentError | None) -> str | None:
        """ok / refused / error, or None when not worth a record or a count: a bad request that never
        reached a credential, or a fail-fast answer while the token recovers."""
        if error is None:
            return "ok"
        if isinstance(error, CircuitOpen) or ("credential" not in self.record and error.status < 500):
            return None
        return "refused" if error.status < 500 else "error"

    def audit_fields(self) -> dict[str, Any] | None:
        """The record to write, or None (see :meth:`kind`)."""
        kind, e = self.kind(self.error), self.error
        if kind is None:
            return None
        fields = {**self.record, "outcome": kind, "latency_ms": elapsed_ms(self.started)}
        if e is not None:
            fields.update(code=e.code, reason=e.message)
        return fields

    def outcome(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _KeySigner:
    """A :class:`agent.dfns.protocol.Signer` backed by one key on the token."""

    def __init__(self, token: Token, key: KeyInfo) -> None:
        self._token, self._key = token, key

    def sign(self, message: bytes) -> bytes:
        return self._token.sign(self._key, message)

    @property
    def public_key_pem(self) -> str:
        return self._key.public_pem


class SigningService:
    def __init__(
        self,
        token: Token,
        credentials: Sequence[Credential],
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.token = token
        self.audit = audit
        self.metrics = metrics
        self._credentials = {c.name: c for c in credentials}
        self.started = time.time()

    @classmethod
    def from_config(
        cls,
        token: Token,
        configs: Sequence[CredentialConfig],
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> SigningService:
        """Find each credential's key on the token; a missing or ambiguous key is a start-up error."""
        creds = []
        for c in configs:
            key = token.find_key(c.key, c.key_id)
            creds.append(Credential(c.name, c.cred_id or dfns.cred_id_for_key(key.spki_der), key, c.origin))
        return cls(token, creds, audit, metrics)

    @property
    def credentials(self) -> list[Credential]:
        return list(self._credentials.values())

    def credential(self, name: str) -> Credential:
        try:
            return self._credentials[name]
        except KeyError:
            known = ", ".join(self._credentials) or "none"
            raise UnknownCredential(f"no credential named {name!r}; configured: {known}") from None

    def _choose(self, challenge: dfns.UserActionChallenge, name: str | None, grant: Grant) -> Credential:
        if name is not None:
            cred = self.credential(name)
            grant.require_credential(cred.name)
            challenge.require_allowed(cred.cred_id, cred.name)
            return cred
        for cred in self._credentials.values():
            if cred.cred_id in challenge.allowed_key_ids and (
                grant.credentials is None or cred.name in grant.credentials
            ):
                return cred
        allowed = ", ".join(challenge.allowed_key_ids) or "no Key credentials"
        usable = [c for c in self._credentials.values() if grant.credentials is None or c.name in grant.credentials]
        mine = ", ".join(f"{c.name} ({c.cred_id})" for c in usable) or "none you may use"
        raise CredentialNotAllowed(
            f"none of the agent's credentials is allowed by the challenge: it allows {allowed}; the agent has {mine}"
        )

    def _attempt(
        self,
        event: str,
        caller: Caller | None,
        action: Mapping[str, Any] | None,
        work: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Attempt:
        """Run ``work`` (which fills in the audit record as it learns things); audit nothing yet."""
        started = time.perf_counter()
        record: dict[str, Any] = {
            "event": event,
            "caller": caller.to_json() if caller else None,
            "agentPid": os.getpid(),
        }
        if action is not None:
            record["action"] = dict(action)
        try:
            return Attempt(record, started, result=work(record))
        except AgentError as e:
            return Attempt(record, started, error=e)

    def finish(self, attempt: Attempt) -> dict[str, Any]:
        """Audit the attempt, then return its result (or raise its error). Blocking; for threads."""
        fields = attempt.audit_fields()
        if fields is not None and self.audit is not None:
            try:
                self.audit.record(**fields)
            except AgentError as e:
                if attempt.error is None:
                    self._count(attempt, e)
                    raise  # fail closed: no durable record, no signature
        self._count(attempt, attempt.error)
        return attempt.outcome()

    def _count(self, attempt: Attempt, error: AgentError | None) -> None:
        if self.metrics is None:
            return
        name = attempt.record.get("credential")
        if name is None:
            return
        kind = attempt.kind(error)
        if kind is None:
            return
        cred = self._credentials.get(name)
        key_type = cred.key.type_name if cred is not None else "unknown"
        seconds = time.perf_counter() - attempt.started if kind == "ok" else None
        self.metrics.sign_outcome(name, key_type, kind, seconds)

    async def finish_async(self, attempt: Attempt) -> dict[str, Any]:
        """The same for the event loop: awaits the audit log's group commit."""
        fields = attempt.audit_fields()
        if fields is not None and self.audit is not None:
            try:
                await self.audit.record_async(**fields)
            except AgentError as e:
                if attempt.error is None:
                    self._count(attempt, e)
                    raise
        self._count(attempt, attempt.error)
        return attempt.outcome()

    def sign(
        self,
        challenge: Mapping[str, Any],
        credential: str | None = None,
        *,
        caller: Caller | None = None,
        grant: Grant | None = None,
        action: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sign an ``/auth/action/init`` challenge; returns ``firstFactor`` for ``POST /auth/action``."""
        return self.finish(self.sign_attempt(challenge, credential, caller=caller, grant=grant, action=action))

    def sign_attempt(
        self,
        challenge: Mapping[str, Any],
        credential: str | None = None,
        *,
        caller: Caller | None = None,
        grant: Grant | None = None,
        action: Mapping[str, Any] | None = None,
    ) -> Attempt:
        """The signing half of :meth:`sign`: everything but the audit write (see :meth:`finish`)."""

        def work(record: dict[str, Any]) -> dict[str, Any]:
            parsed = dfns.UserActionChallenge.parse(challenge)
            record["challenge"] = parsed.challenge
            if parsed.challenge_identifier is not None:
                record["challengeIdentifierSha256"] = sha256_hex(parsed.challenge_identifier.encode())
            if credential is not None:
                record["credential"] = credential
            cred = self._choose(parsed, credential, grant or UNRESTRICTED)
            record.update(credential=cred.name, credId=cred.cred_id, keyFingerprint=cred.key.fingerprint)
            data = dfns.client_data(parsed.challenge, dfns.KEY_GET, cred.origin)
            record["clientDataSha256"] = sha256_hex(data)
            assertion = dfns.key_assertion(cred.cred_id, data, self.token.sign(cred.key, data))
            # Not secret, and it makes every record checkable later: rebuild clientData from the
            # challenge, compare its hash, verify this signature with the key of that fingerprint.
            record["signature"] = assertion["credentialAssertion"]["signature"]
            return assertion

        return self._attempt("sign", caller, action, work)

    def register(
        self,
        challenge: Mapping[str, Any],
        credential: str,
        *,
        cred_id: str | None = None,
        credential_name: str | None = None,
        caller: Caller | None = None,
    ) -> dict[str, Any]:
        """Sign an ``/auth/credentials/init`` challenge with the credential's key.

        Returns the body for ``POST /auth/credentials`` (which needs a user action from an existing credential).
        """
        return self.finish(
            self.register_attempt(
                challenge, credential, cred_id=cred_id, credential_name=credential_name, caller=caller
            )
        )

    def register_attempt(
        self,
        challenge: Mapping[str, Any],
        credential: str,
        *,
        cred_id: str | None = None,
        credential_name: str | None = None,
        caller: Caller | None = None,
    ) -> Attempt:
        """The signing half of :meth:`register`."""

        def work(record: dict[str, Any]) -> dict[str, Any]:
            parsed = dfns.RegistrationChallenge.parse(challenge)
            record["challenge"] = parsed.challenge
            cred = self.credential(credential)
            record.update(credential=cred.name, credId=cred_id or cred.cred_id, keyFingerprint=cred.key.fingerprint)
            info = dfns.sign_registration(
                parsed, cred_id or cred.cred_id, _KeySigner(self.token, cred.key), origin=cred.origin
            )
            record["clientDataSha256"] = sha256_hex(dfns.b64url_decode(info["clientData"]))
            body: dict[str, Any] = {
                "credentialKind": "Key",
                "credentialInfo": info,
                "credentialName": credential_name or cred.name,
            }
            if parsed.challenge_identifier is not None:
                body["challengeIdentifier"] = parsed.challenge_identifier
            return body

        return self._attempt("register", caller, None, work)

    async def audit_refusal(self, caller: Caller | None, endpoint: str, error: AgentError, **fields: Any) -> None:
        """Record a request the policy refused (best effort: the refusal stands either way). Awaited, so
        a caller hammering refused requests does not stall the event loop on fsyncs."""
        if self.audit is None:
            return
        record = {"event": "refused", "caller": caller.to_json() if caller else None, "endpoint": endpoint}
        try:
            await self.audit.record_async(**record, **fields, outcome="refused", code=error.code, reason=error.message)
        except AgentError:
            pass

    def health(self) -> dict[str, Any]:
        """Token state, anchor session logged in, every credential's key still the same key, audit writable."""
        status = self.token.health()
        keys: dict[str, bool] = {}
        if status["state"] == "ok":
            for cred in self._credentials.values():
                try:
                    found = self.token.find_key(cred.key.label, cred.key.id or None)
                    keys[cred.name] = found.fingerprint == cred.key.fingerprint
                except AgentError:
                    keys[cred.name] = False
        else:
            keys = {name: False for name in self._credentials}
        reasons = [status["reason"]] if status.get("reason") else []
        reasons += [f"key for credential {n!r} not found or changed" for n, good in keys.items() if not good]
        if status["state"] == "ok" and not all(keys.values()):
            state = "degraded"
        else:
            state = status["state"]
        if self.audit is not None and not self.audit.healthy:
            reasons.append(self.audit.last_error or "audit log unavailable")
            state = "down"
        result: dict[str, Any] = {
            "status": state,
            "token": {
                **self.token.identity.describe(),
                "present": status["present"],
                "loggedIn": status["logged_in"],
                "reconnects": status["reconnects"],
            },
            "keys": keys,
            "uptimeSeconds": round(time.time() - self.started, 3),
        }
        if reasons:
            result["reason"] = "; ".join(dict.fromkeys(reasons))
        return result
