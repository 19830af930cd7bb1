"""Request bodies: strict JSON objects with known fields, read into typed values before any work starts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.dfnsapi.flow import DfnsCall
from agent.errors import BadRequest


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and they must never reach a Dfns payload.
    raise ValueError(f"{name} is not JSON")


# One decoder for every request: json.loads builds a new one per call when given parse_constant.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads does
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def _check_fields(body: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(body))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")


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


@dataclass(frozen=True)
class SignBody:
    """``POST /v1/sign``: ``{"challenge": {…}, "credential"?}``."""

    challenge: object
    credential: str | None

    @classmethod
    def parse(cls, raw: bytes) -> SignBody:
        body = json_object(raw)
        _check_fields(body, {"challenge"}, {"credential"})
        return cls(body["challenge"], _optional_str(body, "credential"))


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
        _check_fields(body, {"challenge", "credential"}, {"credId", "credentialName"})
        return cls(
            body["challenge"],
            _required_str(body, "credential"),
            _optional_str(body, "credId"),
            _optional_str(body, "credentialName"),
        )


def dfns_call(raw: bytes) -> DfnsCall:
    """``POST /v1/user-action`` and ``/v1/request``: one Dfns call, by method, path and body."""
    body = json_object(raw)
    _check_fields(body, {"method", "path"}, {"body", "credential"})
    method, path = body["method"], body["path"]
    if not isinstance(method, str) or not method.isalpha():
        raise BadRequest("method must be an HTTP method name such as POST")
    if not isinstance(path, str):
        raise BadRequest("path must be a string")
    return DfnsCall(method.upper(), path, body.get("body"), _optional_str(body, "credential"))


@dataclass(frozen=True)
class RegisterCredentialBody:
    """``POST /v1/credentials``: register a key as a new Dfns credential, user-action signed by ``via``."""

    credential: str
    via: str | None
    credential_name: str | None

    @classmethod
    def parse(cls, raw: bytes) -> RegisterCredentialBody:
        body = json_object(raw)
        _check_fields(body, {"credential"}, {"via", "credentialName"})
        return cls(_required_str(body, "credential"), _optional_str(body, "via"), _optional_str(body, "credentialName"))
