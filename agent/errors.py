"""The agent's error hierarchy.

Every error a client can see carries a stable machine-readable ``code``, a human ``message`` and the
HTTP status it maps to, so the server turns any of them into ``{"error": {"code", "message"}}`` without a
lookup table, and the CLI can print the same words. Messages never contain a PIN or a bearer token.

    AgentError (internal_error, 500)
    ├── ConfigError (config_error), SecretError (secret_error), ListenError (listen_error)   start-up
    ├── BadRequest (invalid_request, invalid_json, invalid_challenge: 400)
    ├── NotFound (not_found, 404) └── UnknownCredential (unknown_credential)
    ├── CredentialNotAllowed (credential_not_allowed, 422)
    ├── Forbidden (forbidden, 403) └── RateLimited (rate_limited, 429)                        policy
    ├── AuditUnavailable (audit_unavailable, 503)                                              fail closed
    ├── TokenError (token_error, 503)                                                          PKCS#11
    │   ├── TokenUnavailable (token_unavailable) └── CircuitOpen
    │   ├── PinRejected (pin_incorrect), PinLocked (pin_locked), IdentityMismatch (token_identity_changed)
    │   ├── UnsupportedMechanism (mechanism_unsupported), SelfTestFailed (self_test_failed), TokenTimeout
    │   │   (token_timeout, 504)
    │   └── KeyNotFound (key_not_found, 404), KeyExists (key_exists, 409), UnsupportedKey (unsupported_key, 422)
    │       └── KeyUsageRefused (key_usage_refused)
    └── DfnsError (dfns_error, Dfns's status), DfnsUnreachable (502), DfnsTimeout (504),
        DfnsNotConfigured (dfns_not_configured, 422)                                           Dfns

Outside it, on purpose: :class:`agent.client.AgentClientError` is what a *client* of the agent raises for
the agent's answer (it carries the code the agent sent), and the dev area has its own.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class AgentError(Exception):
    """Base class: a failure with a stable code and the HTTP status that describes it."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details: dict[str, Any] = {}

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ConfigError(AgentError):
    """The configuration file is missing, unreadable or inconsistent (a start-up error)."""

    code = "config_error"


class SecretError(AgentError):
    """No usable source for a secret (PIN, Dfns token), or an unsafe one (e.g. a group-readable file)."""

    code = "secret_error"


class BadRequest(AgentError):
    """The request is malformed: not JSON, wrong shape, or a challenge that is not what Dfns sends."""

    code = "invalid_request"
    status = 400


class NotFound(AgentError):
    code = "not_found"
    status = 404


class UnknownCredential(NotFound):
    code = "unknown_credential"


class CredentialNotAllowed(AgentError):
    """The challenge's ``allowCredentials.key`` does not list the credential asked for."""

    code = "credential_not_allowed"
    status = 422


class TokenError(AgentError):
    """Anything that went wrong on the PKCS#11 side."""

    code = "token_error"
    status = 503


class TokenUnavailable(TokenError):
    """The token cannot be reached or its session is gone; the request may be retried later."""

    code = "token_unavailable"


class CircuitOpen(TokenUnavailable):
    """Failing fast while the token recovers. Same code for clients; not logged or audited per request
    (the fault and the recovery are logged once each), so an outage does not flood the logs."""


class PinRejected(TokenError):
    """The token refused the PIN. Never retried automatically: a retry loop locks tokens."""

    code = "pin_incorrect"


class PinLocked(TokenError):
    code = "pin_locked"


class IdentityMismatch(TokenError):
    """After a reconnect, the token (or a key on it) is not the one the agent started with."""

    code = "token_identity_changed"


class KeyNotFound(TokenError):
    code = "key_not_found"
    status = 404


class KeyExists(TokenError):
    code = "key_exists"
    status = 409


class UnsupportedKey(TokenError):
    code = "unsupported_key"
    status = 422


class UnsupportedMechanism(TokenError):
    """The module offers no mechanism that makes the key's signature (named in the message)."""

    code = "mechanism_unsupported"


class TokenTimeout(TokenError):
    """A token call did not return within ``[token] sign_timeout``: the circuit opens; the call is abandoned."""

    code = "token_timeout"
    status = 504


class SelfTestFailed(TokenError):
    """A key did not sign, or its signature did not verify, in the start-up/doctor self-test."""

    code = "self_test_failed"


class KeyUsageRefused(UnsupportedKey):
    """The key does not allow signing (CKA_SIGN false), or allows more than signing (decrypt, unwrap, derive)
    and the config does not accept that."""

    code = "key_usage_refused"


class Forbidden(AgentError):
    """The policy does not let this caller do this; ``rule`` names the rule that refused (for metrics)."""

    code = "forbidden"
    status = 403

    def __init__(self, message: str, *, rule: str = "default") -> None:
        super().__init__(message)
        self.rule = rule  # "default": the built-in uid check


class RateLimited(Forbidden):
    code = "rate_limited"
    status = 429


class AuditUnavailable(AgentError):
    """The audit record could not be made durable, so the signature is withheld (fail closed)."""

    code = "audit_unavailable"
    status = 503


class ListenError(AgentError):
    """The agent cannot claim its socket (a start-up error)."""

    code = "listen_error"


class DfnsError(AgentError):
    """Dfns answered a step of the flow with an error; status and message are Dfns's own.

    ``details["dfns"]`` carries Dfns's error object unchanged, so clients see exactly what Dfns said.
    """

    code = "dfns_error"
    status = 502


class DfnsUnreachable(AgentError):
    code = "dfns_unreachable"
    status = 502


class DfnsTimeout(AgentError):
    code = "dfns_timeout"
    status = 504


class DfnsNotConfigured(AgentError):
    """The credential has no [credential.dfns] settings, so the agent cannot talk to Dfns for it."""

    code = "dfns_not_configured"
    status = 422


class ExitStatus(IntEnum):
    """How ``dfns-agent`` ends, for service managers: systemd units list PIN and CONFIG in
    ``RestartPreventExitStatus=`` (a restart cannot fix them, and a PIN retried in a loop locks the token)
    and stop the socket on them, so a client waiting on it cannot start the agent again either."""

    OK = 0
    FAILURE = 1  # anything a restart may fix: the token or module unavailable, a worker that keeps dying
    CONFIG = 2  # the configuration or a secret's source is missing, unreadable or inconsistent (as usage errors)
    SOFTWARE = 70  # a worker failed unexpectedly, or left a token call stuck past stuck_limit (EX_SOFTWARE)
    PIN = 77  # the token rejected the PIN or reports it locked (EX_NOPERM)


def exit_status_for(error: AgentError) -> ExitStatus:
    if isinstance(error, (PinRejected, PinLocked)):
        return ExitStatus.PIN
    if isinstance(error, (ConfigError, SecretError)):
        return ExitStatus.CONFIG
    return ExitStatus.FAILURE
