"""The whole Dfns user-action flow, so clients don't have to write the three-step dance themselves.

``POST /auth/action/init`` → sign the challenge on the token → ``POST /auth/action`` → (optionally) the
real request with ``X-DFNS-USERACTION``. The body is serialized once and those exact bytes are both the
``userActionPayload`` and the body sent; bodyless mutations use ``{}`` (``dfns-protocol.md`` §1.1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.caller import Caller
from agent.config import DfnsConfig
from agent.core.policy import UNRESTRICTED, Grant
from agent.core.records import Action
from agent.core.service import SigningService
from agent.dfns import sha256_hex
from agent.dfnsapi.client import DfnsApi, Upstream, dfns_error, json_object
from agent.dfnsapi.transport import HttpTransport
from agent.errors import BadRequest, DfnsError, DfnsNotConfigured
from agent.secret import Secret

MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
DFNS_METHODS = MUTATING | {"GET"}
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})|%(?:2[eEfF]|5[cC]|00)")  # malformed, or an encoded . / \ NUL
MAX_PATH = 2048


@dataclass(frozen=True)
class Registered:
    """Dfns's answer to ``POST /auth/credentials``: its status as given (a 202 is not a 200) and its body."""

    status: int
    credential: dict[str, Any]


def serialize_payload(body: Any) -> str:
    """The one serialization of a request body: compact JSON, ``{}`` when there is no body.

    Checked before any call to Dfns is made for it: the payload must be JSON (no ``NaN`` or ``Infinity``)
    and travel as UTF-8, which has no form for a lone surrogate (``"\\ud800"`` is valid JSON syntax)."""
    try:
        payload = json.dumps({} if body is None else body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        payload.encode("utf-8")
    except ValueError as e:  # UnicodeEncodeError is one
        what = "a lone surrogate, which UTF-8 cannot carry" if isinstance(e, UnicodeEncodeError) else "NaN or Infinity"
        raise BadRequest(f"the request body holds {what}", code="invalid_json") from None
    return payload


def check_path(path: str) -> str:
    """A Dfns API path, in the one form that is both checked by the policy and sent to Dfns.

    Absolute, no scheme, host or fragment; no empty, ``.`` or ``..`` segment; no percent-encoded ``.``,
    ``/``, ``\\`` or NUL (a server or proxy that decodes them would see another path than the one checked).
    Nothing is rewritten, so the value returned is the value given: what was checked is what is sent (an HTTP
    client that removes dot segments or decodes escapes has nothing left to change).
    """
    if len(path) > MAX_PATH or not _PATH_RE.fullmatch(path):
        raise BadRequest(
            f"path must be an absolute Dfns API path like /wallets (got {path[:100]!r})", code="invalid_path"
        )
    bare = path.split("?", 1)[0]
    if _PERCENT_RE.search(path):
        raise BadRequest(
            "path must be an absolute Dfns API path without percent-encoded '.', '/', '\\' or NUL or a stray '%' "
            f"(got {path[:100]!r})",
            code="invalid_path",
        )
    segments = bare.split("/")[1:]
    if any(segment in ("", ".", "..") for segment in segments):
        raise BadRequest(
            f"path must be an absolute Dfns API path without empty, '.' or '..' segments (got {path[:100]!r})",
            code="invalid_path",
        )
    return path


@dataclass(frozen=True)
class DfnsCall:
    """One Dfns API call a client asks the agent to make (or to get a user action for)."""

    method: str  # upper case
    path: str
    body: Any = None
    credential: str | None = None  # whose Dfns identity; None: the first with Dfns settings the caller may use

    @property
    def action(self) -> Action:
        """What the policy and the audit record see of it (the payload digest comes once it is serialized)."""
        return Action(self.method, self.path)


@dataclass(frozen=True)
class UserAction:
    """A user-action token and the exact payload it was signed for (send those bytes as the body)."""

    token: str
    payload: str

    def to_json(self) -> dict[str, str]:
        return {"userAction": self.token, "payload": self.payload}


class DfnsFlow:
    """The flow for every credential that has ``[credential.dfns]`` settings, over one pooled transport."""

    def __init__(self, service: SigningService, apis: Mapping[str, DfnsApi]) -> None:
        self._service = service
        self._apis = dict(apis)

    @classmethod
    def create(
        cls, service: SigningService, http: HttpTransport, settings: Mapping[str, tuple[DfnsConfig, Secret]]
    ) -> DfnsFlow:
        """One :class:`DfnsApi` per credential with Dfns settings, each with its bearer token."""
        return cls(service, {name: DfnsApi(http, cfg, token) for name, (cfg, token) in settings.items()})

    def _api(self, credential: str | None, grant: Grant, *, besides: str | None = None) -> tuple[str, DfnsApi]:
        """The named credential's Dfns identity, else the first one the grant allows (other than ``besides``)."""
        if credential is None:
            usable = [
                c.name for c in self._service.credentials.usable(grant) if c.name in self._apis and c.name != besides
            ]
            if not usable:
                raise DfnsNotConfigured("no credential you may use has [credential.dfns] settings")
            credential = usable[0]
        self._service.credentials.resolve(credential, grant)  # 404 for a name that does not exist, 403 if not granted
        api = self._apis.get(credential)
        if api is None:
            raise DfnsNotConfigured(f"credential {credential!r} has no [credential.dfns] settings")
        return credential, api

    async def _user_action(
        self, method: str, path: str, payload: str, credential: str, api: DfnsApi, caller: Caller | None, grant: Grant
    ) -> str:
        bare = path.split("?", 1)[0]
        challenge = await api.init_user_action(method, bare, payload)
        action = Action(method, path, sha256_hex(payload.encode("utf-8")))
        assertion = await self._service.sign(challenge, credential, caller=caller, grant=grant, action=action)
        identifier = challenge.get("challengeIdentifier")
        if not isinstance(identifier, str):
            raise DfnsError("Dfns's /auth/action/init answer has no challengeIdentifier", status=502)
        return await api.complete_user_action(identifier, assertion)

    async def user_action(
        self, call: DfnsCall, *, caller: Caller | None = None, grant: Grant = UNRESTRICTED
    ) -> UserAction:
        """Get a user-action token for the call, with the exact payload to send."""
        method, path = call.method, check_path(call.path)
        if method not in MUTATING:
            raise BadRequest(f"{method} requests need no user action; only {', '.join(sorted(MUTATING))} do")
        name, api = self._api(call.credential, grant)
        payload = serialize_payload(call.body)
        token = await self._user_action(method, path, payload, name, api, caller, grant)
        return UserAction(token, payload)

    async def request(self, call: DfnsCall, *, caller: Caller | None = None, grant: Grant = UNRESTRICTED) -> Upstream:
        """Make the real Dfns call, with a user action when it mutates. Dfns's answer comes back as is."""
        method, path, body = call.method, check_path(call.path), call.body
        name, api = self._api(call.credential, grant)
        if method == "GET":
            if body is not None:
                raise BadRequest("a GET request has no body")
            return await api.send("GET", path, None, None)
        if method not in MUTATING:
            raise BadRequest(f"method must be GET or one of {', '.join(sorted(MUTATING))}")
        payload = serialize_payload(body)
        token = await self._user_action(method, path, payload, name, api, caller, grant)
        return await api.send(method, path, payload.encode("utf-8"), token)

    async def register_credential(
        self,
        credential: str,
        via: str | None,
        credential_name: str | None,
        *,
        caller: Caller | None = None,
        grant: Grant = UNRESTRICTED,
    ) -> Registered:
        """Register ``credential``'s key as a new Dfns Key credential, user-action signed by ``via``.

        ``/auth/credentials/init`` → sign ``key.create`` + attestation with the new key →
        ``POST /auth/credentials`` with a user action from the existing credential (rotation).
        """
        self._service.credentials.resolve(credential, grant)
        via_name, api = self._api(via, grant, besides=credential)
        if via_name == credential:
            raise BadRequest("a credential cannot register itself; name an existing credential in 'via'")
        challenge = await api.init_registration()
        registration = await self._service.register(
            challenge, credential, credential_name=credential_name, caller=caller, grant=grant
        )
        payload = serialize_payload(registration.to_json())
        token = await self._user_action("POST", "/auth/credentials", payload, via_name, api, caller, grant)
        answer = await api.send("POST", "/auth/credentials", payload.encode("utf-8"), token)
        if answer.status >= 400:
            raise dfns_error(answer.status, answer.content, "POST /auth/credentials")
        return Registered(answer.status, json_object(answer.status, answer.content, "POST /auth/credentials"))
