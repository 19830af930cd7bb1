"""A local, in-memory Dfns-compatible API server (``dfns-protocol.md`` §1-§4, §6).

It exists so the agent's whole Dfns flow (challenge → signed clientData → user action → real call) can be
tested, and tried by hand, without a Dfns account. It is deliberately strict where Dfns is documented or
inferred to be strict (DER-only ECDSA, single-use challenges and user actions, user actions bound to
method/path/payload) and lenient where the official SDKs disagree with each other (clientData key order and
extra fields, ``""`` vs ``"{}"`` payloads, padded base64url), so that passing here means passing there.
Faults that Dfns produces on its own terms (rate limits, 5xx, slowness) only happen through
:meth:`DevDfns.inject_fault`.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import os
import re
import secrets
import signal
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.dfns import (
    KEY_CREATE,
    KEY_GET,
    PublicKey,
    b64url,
    b64url_decode,
    credential_fingerprint,
    load_public_key,
    verify_signature,
)

__all__ = ["DevDfns", "DevDfnsServer", "ServiceAccount", "run"]

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
USER_ACTION_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "GET"})
# Calls that are themselves part of obtaining a user action (or a registration challenge) cannot need one.
NO_USER_ACTION = frozenset({"/auth/action/init", "/auth/action", "/auth/credentials/init"})
POLICY_THRESHOLD = 1_000_000
RELYING_PARTY = "dfns.local"
ORIGIN = "http://localhost"

MSG_CHALLENGE = "Challenge token is not valid."
MSG_SIGNATURE = "Unable to verify signature"
MSG_USER_ACTION = "user action signature is missing or invalid"
MSG_USER_ACTION_USED = "user action has already been used"
MSG_UNAUTHORIZED = "Not Authorized."
MSG_NO_CREDENTIAL = "User does not have a credential that can be used for the application."

_ALPHABET = string.digits + string.ascii_lowercase
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_NETWORK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
_AMOUNT_RE = re.compile(r"^[0-9]{1,78}$")
_HEX_RE = re.compile(r"^(?:[0-9a-fA-F]{2})+$")

Handler = Callable[["_Call"], web.Response]


class ApiError(Exception):
    """A failure to answer with the Dfns error envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServiceAccount:
    """What a test or the CLI needs to act as a service account: its bearer token and Key credential."""

    user_id: str
    name: str
    token: str
    cred_id: str
    credential_uuid: str


@dataclass
class _Credential:
    cred_id: str
    uuid: str
    user_id: str
    name: str
    public_key_pem: str
    key: PublicKey
    date_created: str
    active: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "Key",
            "credentialId": self.cred_id,
            "credentialUuid": self.uuid,
            "dateCreated": self.date_created,
            "isActive": self.active,
            "name": self.name,
            "publicKey": self.public_key_pem,
            "relyingPartyId": RELYING_PARTY,
            "origin": ORIGIN,
        }


@dataclass
class _User:
    user_id: str
    name: str
    token: str
    token_id: str
    credential_uuid: str
    cred_id: str
    public_key_pem: str
    date_created: str
    external_id: str | None = None
    permission_id: str | None = None
    active: bool = True

    def user_info(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "credentialUuid": self.credential_uuid,
            "isServiceAccount": True,
            "isActive": self.active,
            "name": self.name,
            "kind": "Application",
            "orgId": "or-dev-dfns",
            "dateCreated": self.date_created,
            "externalId": self.external_id,
            "permissionId": self.permission_id,
        }

    def token_info(self) -> dict[str, Any]:
        """The access-token record without its secret (what listings show)."""
        return {
            "tokenId": self.token_id,
            "credId": self.cred_id,
            "publicKey": self.public_key_pem,
            "isActive": self.active,
            "dateCreated": self.date_created,
        }


@dataclass
class _Challenge:
    identifier: str
    challenge: str
    user_id: str
    kind: str  # KEY_GET (user action) or KEY_CREATE (credential registration)
    expires: float
    method: str = ""
    path: str = ""
    payload: str = ""
    used: bool = False


@dataclass
class _UserAction:
    user_id: str
    method: str
    path: str
    payload: str
    expires: float
    used: bool = False


@dataclass
class _Fault:
    path: str
    method: str | None
    status: int | None
    body: dict[str, Any] | None
    delay: float
    remaining: int


@dataclass
class _Wallet:
    data: dict[str, Any]
    user_id: str
    transfers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Call:
    """One authenticated, parsed request as a handler sees it."""

    user: _User
    method: str
    path: str
    params: dict[str, str]
    body: dict[str, Any]


# ------------------------------------------------------------------------------------------------------
# Helpers


def action_challenge(challenge: str, identifier: str, cred_ids: list[str]) -> dict[str, Any]:
    """An ``/auth/action/init`` answer as Dfns shapes it (also what tests and the benchmark send the agent)."""
    return {
        "challenge": challenge,
        "challengeIdentifier": identifier,
        "allowCredentials": {
            "key": [{"type": "public-key", "id": cred_id} for cred_id in cred_ids],
            "webauthn": [],
            "passwordProtectedKey": [],
        },
        "supportedCredentialKinds": [{"kind": "Key", "factor": "first", "requiresSecondFactor": False}],
        "userVerification": "required",
        "externalAuthenticationUrl": "",
        "attestation": "none",
    }


def _dfns_id(prefix: str) -> str:
    """An id shaped like Dfns's (``ci-3q9cc-mqh3m-87b9mc46jgh1abjl``), so clients never rely on a fake format."""
    parts = ("".join(secrets.choice(_ALPHABET) for _ in range(n)) for n in (5, 5, 16))
    return prefix + "-" + "-".join(parts)


def _jwt_like(claims: dict[str, Any]) -> str:
    """An opaque token that looks like the JWTs Dfns hands out (clients may read ``exp``, never verify it)."""
    header = {"alg": "EdDSA", "typ": "JWT"}
    return ".".join(
        (
            b64url(json.dumps(header, separators=(",", ":")).encode()),
            b64url(json.dumps(claims, separators=(",", ":")).encode()),
            b64url(secrets.token_bytes(64)),
        )
    )


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"id": _dfns_id("er"), "status": status, "message": message}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response(_error_body(status, message), status=status)


def _decode_b64url(text: Any) -> bytes | None:
    """base64url, padded or not (padding is tolerated by Dfns, §2); None if it is not base64url."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text):
        return None
    try:
        return b64url_decode(text.rstrip("="))
    except (binascii.Error, ValueError):
        return None


def _parse_client_data(encoded: Any, kind: str, challenge: str) -> bytes | None:
    """The decoded clientData bytes if they are a JSON object of this kind for this challenge, else None.

    Key order and extra fields (origin, crossOrigin) are accepted because the official SDKs all differ (§2).
    """
    data = _decode_b64url(encoded)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("type") != kind or doc.get("challenge") != challenge:
        return None
    return data


def _same_json(a: Any, b: Any) -> bool:
    """Semantic JSON equality that, unlike ``==``, does not confuse ``true`` with ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and bool(a == b)


_NOT_JSON = object()


def _parse_payload(text: str | bytes) -> Any:
    """A payload or body as JSON, where nothing at all means ``{}`` (Go/Python sign ``""`` for bodyless calls)."""
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def _payload_matches(payload: str, body: bytes) -> bool:
    signed, sent = _parse_payload(payload), _parse_payload(body)
    if signed is _NOT_JSON or sent is _NOT_JSON:
        return payload.encode("utf-8") == body
    return _same_json(signed, sent)


def _require_str(body: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key} must be a non-empty string")
    return value


def _str(body: dict[str, Any], key: str) -> str:
    value = _require_str(body, key)
    assert value is not None
    return value


# ------------------------------------------------------------------------------------------------------
# The API


class DevDfns:
    """In-memory state + aiohttp app of a local Dfns-compatible API.

    State is shared between the server's event loop thread and the test (or CLI) thread that creates
    accounts and injects faults, so every access to it holds one lock; handlers never await while holding it.
    """

    def __init__(
        self,
        *,
        challenge_ttl: float = 300.0,
        user_action_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
        latency: float = 0.0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.latency = latency  # seconds every request waits before it is handled: a distant API, for benchmarks
        self.challenge_ttl = challenge_ttl
        self.user_action_ttl = user_action_ttl
        self.clock = clock
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._users: dict[str, _User] = {}
        self._tokens: dict[str, str] = {}  # bearer token -> user id
        self._credentials: dict[str, _Credential] = {}  # credId -> credential
        self._challenges: dict[str, _Challenge] = {}
        self._user_actions: dict[str, _UserAction] = {}
        self._wallets: dict[str, _Wallet] = {}
        self._faults: list[_Fault] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        for method, pattern, handler in (
            ("POST", "/auth/action/init", self._action_init),
            ("POST", "/auth/action", self._action),
            ("POST", "/auth/credentials/init", self._credentials_init),
            ("POST", "/auth/credentials", self._credentials_create),
            ("GET", "/auth/credentials", self._credentials_list),
            ("PUT", "/auth/credentials/activate", self._credential_activate),
            ("PUT", "/auth/credentials/deactivate", self._credential_deactivate),
            ("POST", "/auth/service-accounts", self._service_account_create),
            ("GET", "/auth/service-accounts", self._service_account_list),
            ("GET", "/auth/service-accounts/{id}", self._service_account_get),
            ("PUT", "/auth/service-accounts/{id}/activate", self._service_account_activate),
            ("PUT", "/auth/service-accounts/{id}/deactivate", self._service_account_deactivate),
            ("POST", "/wallets", self._wallet_create),
            ("GET", "/wallets", self._wallet_list),
            ("GET", "/wallets/{walletId}", self._wallet_get),
            ("POST", "/wallets/{walletId}/transfers", self._transfer_create),
            ("GET", "/wallets/{walletId}/transfers", self._transfer_list),
            ("GET", "/wallets/{walletId}/transfers/{transferId}", self._transfer_get),
        ):
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
            self._routes.append((method, regex, handler))

    # -- public API ----------------------------------------------------------------------------------

    def create_service_account(
        self, name: str, public_key_pem: str, *, cred_id: str | None = None, token: str | None = None
    ) -> ServiceAccount:
        """Create an active service account with one Key credential; raises ValueError on a bad key or clash.

        ``token`` fixes the bearer token (e.g. one a dev config already names); default: a fresh random one.
        """
        key = load_public_key(public_key_pem)
        with self._lock:
            if token is not None and (not token or token in self._tokens):
                raise ValueError("token must be non-empty and unused")
            if any(u.name == name for u in self._users.values()):
                raise ValueError(f"a service account named {name!r} already exists")
            if cred_id is None:
                cred_id = b64url(_dfns_id("ci").encode())
            elif not cred_id or not _B64URL_RE.fullmatch(cred_id):
                raise ValueError("cred_id must be non-empty base64url text")
            if cred_id in self._credentials:
                raise ValueError(f"credId {cred_id} is already registered")
            now = self._now_iso()
            user = _User(
                user_id=_dfns_id("us"),
                name=name,
                token=token or _jwt_like({"iss": "dfns.local", "jti": _dfns_id("to"), "iat": int(self.clock())}),
                token_id=_dfns_id("to"),
                credential_uuid=_dfns_id("cr"),
                cred_id=cred_id,
                public_key_pem=public_key_pem,
                date_created=now,
            )
            self._users[user.user_id] = user
            self._tokens[user.token] = user.user_id
            self._credentials[cred_id] = _Credential(
                cred_id=cred_id,
                uuid=user.credential_uuid,
                user_id=user.user_id,
                name=name,
                public_key_pem=public_key_pem,
                key=key,
                date_created=now,
            )
            return ServiceAccount(user.user_id, name, user.token, cred_id, user.credential_uuid)

    def inject_fault(
        self,
        path: str,
        *,
        method: str | None = None,
        status: int | None = None,
        body: dict[str, Any] | None = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` requests to ``path`` (optionally only ``method``) slow and/or fail.

        With ``status`` None the request is delayed and then handled normally, which is how timeouts are tested.
        """
        if times < 1 or delay < 0 or (status is not None and not 100 <= status <= 599):
            raise ValueError("times must be >= 1, delay >= 0 and status an HTTP status")
        with self._lock:
            self._faults.append(_Fault(path, method.upper() if method else None, status, body, delay, times))

    def app(self) -> web.Application:
        """An aiohttp app serving this state; every route (known or not) goes through one dispatcher."""
        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", self._dispatch)
        return application

    # -- dispatch ------------------------------------------------------------------------------------

    def _now_iso(self) -> str:
        return datetime.fromtimestamp(self.clock(), tz=timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.path == path and (fault.method is None or fault.method == method):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _dispatch(self, request: web.Request) -> web.Response:
        method, path = request.method.upper(), request.path
        with self._lock:
            self.requests.append(
                {"method": method, "path": path, "user_action": "X-DFNS-USERACTION" in request.headers}
            )
            fault = self._take_fault(method, path)
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                if fault.body is not None:
                    return web.json_response(fault.body, status=fault.status)
                message = "exceeded the API rate limits" if fault.status == 429 else HTTPStatus(fault.status).phrase
                return _error(fault.status, message)
        try:
            raw = await request.read()
        except web.HTTPException as e:  # e.g. body larger than client_max_size
            return _error(e.status, e.reason)
        with self._lock:
            try:
                return self._handle(method, path, request.headers.get("Authorization"), request.headers, raw)
            except ApiError as e:
                return _error(e.status, e.message)
            except Exception:
                log.exception("dev-dfns: unexpected error on %s %s", method, path)
                return _error(500, "Internal Server Error")

    def _handle(
        self, method: str, path: str, authorization: str | None, headers: Mapping[str, str], raw: bytes
    ) -> web.Response:
        user = self._authenticate(authorization)
        handler, params = self._route(method, path)
        body: dict[str, Any] = {}
        if method != "GET" and raw.strip():
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, "request body is not valid JSON") from e
            if not isinstance(parsed, dict):
                raise ApiError(400, "request body must be a JSON object")
            body = parsed
        if method in MUTATING and path not in NO_USER_ACTION:
            self._consume_user_action(user, method, path, headers.get("X-DFNS-USERACTION"), raw)
        return handler(_Call(user=user, method=method, path=path, params=params, body=body))

    def _authenticate(self, authorization: str | None) -> _User:
        if authorization is None:
            raise ApiError(401, MSG_UNAUTHORIZED)
        scheme, _, token = authorization.partition(" ")
        user_id = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        user = self._users.get(user_id) if user_id else None
        if user is None or not user.active:
            raise ApiError(401, MSG_UNAUTHORIZED)
        return user

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        path_matched = False
        for route_method, regex, handler in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            path_matched = True
            if route_method == method:
                return handler, m.groupdict()
        if path_matched:
            raise ApiError(405, f"Method {method} not allowed on {path}")
        raise ApiError(404, f"Route {path} not found")

    def _consume_user_action(self, user: _User, method: str, path: str, token: str | None, raw: bytes) -> None:
        """Enforce §1.4: a single-use user action of this user, bound to method, path and payload."""
        action = self._user_actions.get(token) if token else None
        if action is None or action.user_id != user.user_id or self.clock() >= action.expires:
            raise ApiError(403, MSG_USER_ACTION)
        if action.used:
            raise ApiError(400, MSG_USER_ACTION_USED)
        if action.method != method or action.path != path or not _payload_matches(action.payload, raw):
            raise ApiError(403, MSG_USER_ACTION)
        action.used = True

    def _new_challenge(self, user: _User, kind: str, method: str = "", path: str = "", payload: str = "") -> _Challenge:
        expires = self.clock() + self.challenge_ttl
        challenge = b64url(_dfns_id("ch").encode())
        ident = _jwt_like({"iss": "dfns.local", "sub": user.user_id, "jti": _dfns_id("ch"), "exp": int(expires)})
        ch = _Challenge(ident, challenge, user.user_id, kind, expires, method=method, path=path, payload=payload)
        self._challenges[ident] = ch
        return ch

    def _take_challenge(self, user: _User, identifier: Any, kind: str) -> _Challenge:
        """The caller's unexpired, unused challenge of this kind, marked used (one attempt per challenge)."""
        ch = self._challenges.get(identifier) if isinstance(identifier, str) else None
        if ch is None or ch.user_id != user.user_id or ch.kind != kind or ch.used or self.clock() >= ch.expires:
            raise ApiError(400, MSG_CHALLENGE)
        ch.used = True
        return ch

    def _active_credentials(self, user: _User) -> list[_Credential]:
        return [c for c in self._credentials.values() if c.user_id == user.user_id and c.active]

    # -- /auth/action --------------------------------------------------------------------------------

    def _action_init(self, call: _Call) -> web.Response:
        body = call.body
        method = body.get("userActionHttpMethod")
        if method not in USER_ACTION_METHODS:
            raise ApiError(400, "userActionHttpMethod must be one of POST, PUT, DELETE, PATCH, GET")
        path = body.get("userActionHttpPath")
        if not isinstance(path, str) or not path.startswith("/") or "?" in path:
            raise ApiError(400, "userActionHttpPath must be a path starting with / and without a query string")
        payload = body.get("userActionPayload")
        if not isinstance(payload, str):
            raise ApiError(400, "userActionPayload must be a string")
        if body.get("userActionServerKind") not in (None, "Api", "Staff"):
            raise ApiError(400, "userActionServerKind must be Api or Staff")
        creds = self._active_credentials(call.user)
        if not creds:
            raise ApiError(401, MSG_NO_CREDENTIAL)
        ch = self._new_challenge(call.user, KEY_GET, method=method, path=path, payload=payload)
        return web.json_response(action_challenge(ch.challenge, ch.identifier, [c.cred_id for c in creds]))

    def _action(self, call: _Call) -> web.Response:
        ch = self._take_challenge(call.user, call.body.get("challengeIdentifier"), KEY_GET)
        factor = call.body.get("firstFactor")
        if not isinstance(factor, dict) or factor.get("kind") != "Key":
            raise ApiError(400, "firstFactor must be a Key credential assertion")
        assertion = factor.get("credentialAssertion")
        if not isinstance(assertion, dict):
            raise ApiError(400, "firstFactor.credentialAssertion must be an object")
        for key in ("credId", "clientData", "signature"):
            if not isinstance(assertion.get(key), str):
                raise ApiError(400, f"firstFactor.credentialAssertion.{key} must be a string")
        cred = self._credentials.get(assertion["credId"])
        if cred is None or cred.user_id != call.user.user_id or not cred.active:
            raise ApiError(401, MSG_SIGNATURE)
        data = _parse_client_data(assertion["clientData"], KEY_GET, ch.challenge)
        signature = _decode_b64url(assertion["signature"])
        if data is None or signature is None:
            raise ApiError(401, MSG_SIGNATURE)
        if not verify_signature(cred.key, signature, data, assertion.get("algorithm")):
            raise ApiError(401, MSG_SIGNATURE)
        expires = self.clock() + self.user_action_ttl
        token = _jwt_like({"iss": "dfns.local", "sub": call.user.user_id, "jti": _dfns_id("ua"), "exp": int(expires)})
        self._user_actions[token] = _UserAction(call.user.user_id, ch.method, ch.path, ch.payload, expires)
        return web.json_response({"userAction": token})

    # -- /auth/credentials ---------------------------------------------------------------------------

    def _credentials_init(self, call: _Call) -> web.Response:
        if call.body.get("kind") != "Key":
            raise ApiError(400, "kind must be Key (the only credential kind this server supports)")
        ch = self._new_challenge(call.user, KEY_CREATE)
        return web.json_response(
            {
                "kind": "Key",
                "challengeIdentifier": ch.identifier,
                "challenge": ch.challenge,
                "user": {"id": call.user.user_id, "name": call.user.name, "displayName": call.user.name},
                "attestation": "none",
                "pubKeyCredParams": [],
                "rp": None,
            }
        )

    def _credentials_create(self, call: _Call) -> web.Response:
        body = call.body
        if body.get("credentialKind") != "Key":
            raise ApiError(400, "credentialKind must be Key")
        ch = self._take_challenge(call.user, body.get("challengeIdentifier"), KEY_CREATE)
        info = body.get("credentialInfo")
        if not isinstance(info, dict):
            raise ApiError(400, "credentialInfo must be an object")
        cred_id = info.get("credId")
        if not isinstance(cred_id, str) or not cred_id or len(cred_id) > 1024 or not _B64URL_RE.fullmatch(cred_id):
            raise ApiError(400, "credentialInfo.credId must be non-empty base64url text")
        name = _str(body, "credentialName")
        data = _parse_client_data(info.get("clientData"), KEY_CREATE, ch.challenge)
        if data is None:
            raise ApiError(401, MSG_SIGNATURE)
        attestation_raw = _decode_b64url(info.get("attestationData"))
        try:
            attestation = json.loads(attestation_raw) if attestation_raw is not None else None
        except (ValueError, UnicodeDecodeError):
            attestation = None
        if not isinstance(attestation, dict):
            raise ApiError(401, MSG_SIGNATURE)
        pem, sig_hex = attestation.get("publicKey"), attestation.get("signature")
        if not isinstance(pem, str) or not isinstance(sig_hex, str) or not _HEX_RE.fullmatch(sig_hex):
            raise ApiError(401, MSG_SIGNATURE)
        try:
            key = load_public_key(pem)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        fingerprint = credential_fingerprint(data, pem)
        if not verify_signature(key, bytes.fromhex(sig_hex), fingerprint, attestation.get("algorithm")):
            raise ApiError(401, MSG_SIGNATURE)
        if cred_id in self._credentials:
            raise ApiError(409, "a credential with this credId already exists")
        cred = _Credential(cred_id, _dfns_id("cr"), call.user.user_id, name, pem, key, self._now_iso())
        self._credentials[cred_id] = cred
        return web.json_response(cred.to_json())

    def _credentials_list(self, call: _Call) -> web.Response:
        items = [c.to_json() for c in self._credentials.values() if c.user_id == call.user.user_id]
        return web.json_response({"items": items})

    def _set_credential_active(self, call: _Call, active: bool) -> web.Response:
        uuid = _str(call.body, "credentialUuid")
        for cred in self._credentials.values():
            if cred.uuid == uuid and cred.user_id == call.user.user_id:
                cred.active = active
                return web.json_response({"message": "success"})
        raise ApiError(404, f"credential {uuid} not found")

    def _credential_activate(self, call: _Call) -> web.Response:
        return self._set_credential_active(call, True)

    def _credential_deactivate(self, call: _Call) -> web.Response:
        return self._set_credential_active(call, False)

    # -- /auth/service-accounts ----------------------------------------------------------------------

    def _service_account_json(self, user: _User, *, with_token: bool = False) -> dict[str, Any]:
        token = user.token_info()
        if with_token:
            token = {"accessToken": user.token, **token}
        return {"userInfo": user.user_info(), "accessTokens": [token]}

    def _service_account_create(self, call: _Call) -> web.Response:
        body = call.body
        name, pem = _str(body, "name"), _str(body, "publicKey")
        permission_id = _require_str(body, "permissionId", optional=True)
        external_id = _require_str(body, "externalId", optional=True)
        days = body.get("daysValid")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 730):
            raise ApiError(400, "daysValid must be an integer from 1 to 730")
        if any(u.name == name for u in self._users.values()):
            raise ApiError(409, f"a service account named {name!r} already exists")
        try:
            account = self.create_service_account(name, pem)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        user = self._users[account.user_id]
        user.permission_id, user.external_id = permission_id, external_id
        return web.json_response(self._service_account_json(user, with_token=True))

    def _service_account_list(self, call: _Call) -> web.Response:
        return web.json_response({"items": [self._service_account_json(u) for u in self._users.values()]})

    def _service_account(self, call: _Call) -> _User:
        user = self._users.get(call.params["id"])
        if user is None:
            raise ApiError(404, f"service account {call.params['id']} not found")
        return user

    def _service_account_get(self, call: _Call) -> web.Response:
        return web.json_response(self._service_account_json(self._service_account(call)))

    def _service_account_activate(self, call: _Call) -> web.Response:
        user = self._service_account(call)
        user.active = True
        return web.json_response(self._service_account_json(user))

    def _service_account_deactivate(self, call: _Call) -> web.Response:
        user = self._service_account(call)
        user.active = False
        return web.json_response(self._service_account_json(user))

    # -- /wallets ------------------------------------------------------------------------------------

    def _wallet_create(self, call: _Call) -> web.Response:
        network = call.body.get("network")
        if not isinstance(network, str) or not _NETWORK_RE.fullmatch(network):
            raise ApiError(400, "network must be a Dfns network name such as EthereumSepolia")
        name = _require_str(call.body, "name", optional=True)
        wallet: dict[str, Any] = {
            "id": _dfns_id("wa"),
            "network": network,
            "name": name,
            "status": "Active",
            "address": "0x" + secrets.token_hex(20),
            "dateCreated": self._now_iso(),
        }
        self._wallets[wallet["id"]] = _Wallet(wallet, call.user.user_id)
        return web.json_response(wallet)

    def _wallet_list(self, call: _Call) -> web.Response:
        items = [w.data for w in self._wallets.values() if w.user_id == call.user.user_id]
        return web.json_response({"items": items})

    def _wallet(self, call: _Call) -> _Wallet:
        wallet = self._wallets.get(call.params["walletId"])
        if wallet is None or wallet.user_id != call.user.user_id:
            raise ApiError(404, f"wallet {call.params['walletId']} not found")
        return wallet

    def _wallet_get(self, call: _Call) -> web.Response:
        return web.json_response(self._wallet(call).data)

    def _transfer_create(self, call: _Call) -> web.Response:
        wallet = self._wallet(call)
        body = call.body
        if body.get("kind") != "Native":
            raise ApiError(400, "kind must be Native")
        _str(body, "to")
        amount = body.get("amount")
        if not isinstance(amount, str) or not _AMOUNT_RE.fullmatch(amount):
            raise ApiError(400, "amount must be a decimal string of the amount in minimum units")
        pending = int(amount) > POLICY_THRESHOLD  # a policy needing approval, answered with 202 (§1.4)
        transfer = {
            "id": _dfns_id("xfr"),
            "walletId": wallet.data["id"],
            "network": wallet.data["network"],
            "status": "PendingApproval" if pending else "Broadcasted",
            "requestBody": body,
            "dateRequested": self._now_iso(),
        }
        wallet.transfers.append(transfer)
        return web.json_response(transfer, status=202 if pending else 200)

    def _transfer_list(self, call: _Call) -> web.Response:
        return web.json_response({"items": list(self._wallet(call).transfers)})

    def _transfer_get(self, call: _Call) -> web.Response:
        for transfer in self._wallet(call).transfers:
            if transfer["id"] == call.params["transferId"]:
                return web.json_response(transfer)
        raise ApiError(404, f"transfer {call.params['transferId']} not found")


# ------------------------------------------------------------------------------------------------------
# Serving


class ClientProtocolErrors(logging.Filter):
    """aiohttp logs every malformed request (the client's fault, already answered 400) at ERROR with a
    traceback; that lets anyone flood the log. Keep one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info, record.exc_text = f"bad request: {exc.message}", (), None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_CLIENT_PROTOCOL_ERRORS = ClientProtocolErrors()


def install_log_filter() -> None:
    """Put :class:`ClientProtocolErrors` on aiohttp's server logger (once, however often it is called)."""
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_PROTOCOL_ERRORS)


class DevDfnsServer:
    """Runs a DevDfns on 127.0.0.1 in a background thread with its own event loop (for tests and the CLI)."""

    def __init__(self, dfns: DevDfns, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dfns = dfns
        self.host = host
        self.port = port
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving and return the base URL (with the real port when ``port`` was 0)."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        install_log_filter()
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def setup() -> None:
            # A short shutdown timeout: a request parked in an injected delay must not hold up stop().
            runner = web.AppRunner(self.dfns.app(), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self._runner = runner
            self.port = runner.addresses[0][1]

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="dev-dfns", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> DevDfnsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_token(path: Path, token: str) -> None:
    """Write a bearer token readable by the owner only, even if the file already existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode("ascii"))
    finally:
        os.close(fd)


def run(
    host: str,
    port: int,
    service_accounts: list[tuple[str, Path, str | None]],
    tokens_dir: Path,
    out: TextIO,
    *,
    latency: float = 0.0,
) -> None:
    """Serve a DevDfns until SIGINT/SIGTERM (``dfns-agent dev-dfns``); tokens go to files, never to ``out``.

    A token file that already exists in ``tokens_dir`` is reused, so an agent config that names it keeps
    working across restarts of this server.
    """
    install_log_filter()
    dfns = DevDfns(latency=latency)
    tokens_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    accounts: list[tuple[ServiceAccount, Path]] = []
    for name, pem_path, cred_id in service_accounts:
        token_path = tokens_dir / f"{name}.token"
        existing = token_path.read_text().strip() if token_path.exists() else ""
        account = dfns.create_service_account(name, pem_path.read_text(), cred_id=cred_id, token=existing or None)
        _write_token(token_path, account.token)
        accounts.append((account, token_path))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(dfns.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            actual_port = runner.addresses[0][1]
            print(f"dev-dfns listening on http://{host}:{actual_port}", file=out)
            for account, token_path in accounts:
                print(f"{account.name}: credId={account.cred_id} token file={token_path}", file=out)
            out.flush()
            await stop.wait()
        finally:
            await runner.cleanup()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(serve())
