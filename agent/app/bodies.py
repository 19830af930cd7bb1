"""Request bodies: strict JSON objects with known fields, read into typed values before any work starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import jsonio
from agent.config import NAME_RULE, is_credential_name
from agent.dfnsapi.flow import DFNS_METHODS, DfnsCall, check_path
from agent.errors import BadRequest

MAX_JSON_DEPTH = 64  # Dfns payloads nest a few levels; deeper ones would only exhaust the stack later


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = jsonio.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    # A body the decoder accepts may still nest so deep that serializing it again (the Dfns payload, the
    # audit record) overflows the stack: refuse it here. Few brackets cannot nest deep, so most bodies skip
    # the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return body


def _depth(value: object) -> int:
    """How deep containers nest in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > MAX_JSON_DEPTH:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


# Fields of the /auth/action/init and /auth/credentials/init answers: a body holding them at the top level is
# a challenge posted as is, not wrapped in {"challenge": …} (the CLI's input is the bare challenge).
_CHALLENGE_FIELDS = frozenset(
    {"allowCredentials", "challengeIdentifier", "externalAuthenticationUrl", "supportedCredentialKinds"}
    | {"userVerification", "attestation", "pubKeyCredParams", "rp", "user", "kind"}
)

SIGN_SHAPE = '{"challenge": <the answer of POST /auth/action/init>, "credential"?: name}'
REGISTER_SHAPE = (
    '{"challenge": <the answer of POST /auth/credentials/init>, "credential": name, "credId"?, "credentialName"?}'
)
CALL_SHAPE = '{"method", "path", "body"?, "credential"?}'
REGISTER_CREDENTIAL_SHAPE = '{"credential": name, "via"?: name, "credentialName"?}'


def _check_fields(
    body: Mapping[str, Any], required: set[str], optional: set[str], shape: str, init: str | None = None
) -> None:
    """Exactly the known fields; an error says what the body should be (``shape``) and, for a body that is
    the ``init`` answer itself rather than wrapped in ``{"challenge": …}``, says so."""
    missing = sorted(required - set(body))
    unknown = sorted(set(body) - required - optional)
    if not missing and not unknown:
        return
    problem = f"missing field(s): {', '.join(missing)}" if missing else f"unknown field(s): {', '.join(unknown)}"
    hint = f"; the body is {shape}"
    if init is not None and _CHALLENGE_FIELDS & set(body):
        hint += f': this looks like the {init} answer itself: send it as {{"challenge": <it>}}'
    raise BadRequest(problem + hint)


def _challenge_object(body: Mapping[str, Any], init: str, shape: str) -> object:
    """The ``challenge`` field, which must be the init answer (an object), not its challenge string."""
    challenge = body["challenge"]
    if not isinstance(challenge, Mapping):
        raise BadRequest(
            f"challenge must be the JSON object {init} returned, not {_json_type(challenge)}; the body is {shape}",
            code="invalid_challenge",
        )
    return challenge


def _json_type(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "null"


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _required_str(body: Mapping[str, Any], key: str) -> str:
    value = _optional_str(body, key)
    if value is None:
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _name(key: str, value: str) -> str:
    """A credential's name. A string no credential can be called is refused here: it never reaches credential
    selection, so it is neither audited nor echoed at length (a caller could otherwise write records as long
    as its body into the audit log, twice each)."""
    if not is_credential_name(value):
        shown = repr(value[:64]) + ("…" if len(value) > 64 else "")
        raise BadRequest(f"{key} must be a credential name, {NAME_RULE} (got {shown})")
    return value


def _optional_name(body: Mapping[str, Any], key: str) -> str | None:
    value = _optional_str(body, key)
    return None if value is None else _name(key, value)


def _required_name(body: Mapping[str, Any], key: str) -> str:
    return _name(key, _required_str(body, key))


@dataclass(frozen=True)
class SignBody:
    """``POST /v1/sign``: ``{"challenge": {…}, "credential"?}``."""

    challenge: object
    credential: str | None

    @classmethod
    def parse(cls, raw: bytes) -> SignBody:
        body = json_object(raw)
        _check_fields(body, {"challenge"}, {"credential"}, SIGN_SHAPE, "/auth/action/init")
        return cls(_challenge_object(body, "/auth/action/init", SIGN_SHAPE), _optional_name(body, "credential"))


@dataclass(frozen=True)
class RegisterBody:
    """``POST /v1/register``: sign a registration challenge Dfns gave the caller."""

    challenge: object
    credential: str
    cred_id: str | None
    credential_name: str | None

    @classmethod
    def parse(cls, raw: bytes) -> RegisterBody:
        body = json_object(raw)
        _check_fields(
            body, {"challenge", "credential"}, {"credId", "credentialName"}, REGISTER_SHAPE, "/auth/credentials/init"
        )
        return cls(
            _challenge_object(body, "/auth/credentials/init", REGISTER_SHAPE),
            _required_name(body, "credential"),
            _optional_str(body, "credId"),
            _optional_str(body, "credentialName"),
        )


def dfns_call(raw: bytes) -> DfnsCall:
    """``POST /v1/user-action`` and ``/v1/request``: one Dfns call, by method, path and body."""
    body = json_object(raw)
    _check_fields(body, {"method", "path"}, {"body", "credential"}, CALL_SHAPE)
    method, path = body["method"], body["path"]
    # One of the few methods Dfns has, checked before the policy: a refusal quotes the method in its audit
    # record and log line, so a made-up one of 60,000 letters would have written 120 KB per refusal.
    if not isinstance(method, str) or method.upper() not in DFNS_METHODS:
        raise BadRequest(f"method must be one of {', '.join(sorted(DFNS_METHODS))}")
    if not isinstance(path, str):
        raise BadRequest("path must be a string", code="invalid_path")
    # Checked here, before the policy sees it: the policy and the Dfns call get this one value.
    return DfnsCall(method.upper(), check_path(path), body.get("body"), _optional_name(body, "credential"))


@dataclass(frozen=True)
class RegisterCredentialBody:
    """``POST /v1/credentials``: register a key as a new Dfns credential, user-action signed by ``via``."""

    credential: str
    via: str | None
    credential_name: str | None

    @classmethod
    def parse(cls, raw: bytes) -> RegisterCredentialBody:
        body = json_object(raw)
        _check_fields(body, {"credential"}, {"via", "credentialName"}, REGISTER_CREDENTIAL_SHAPE)
        return cls(
            _required_name(body, "credential"), _optional_name(body, "via"), _optional_str(body, "credentialName")
        )
