"""The whole Dfns user-action flow, so clients don't have to write the three-step dance themselves.

``POST /auth/action/init`` → sign the challenge on the token → ``POST /auth/action`` → (optionally) the
real request with ``X-DFNS-USERACTION``. The body is serialized once and those exact bytes are both the
``userActionPayload`` and the body sent; bodyless mutations use ``{}`` (``dfns-protocol.md`` §1.1).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

from agent.caller import Caller
from agent.core.policy import UNRESTRICTED, Grant
from agent.core.service import SigningService, sha256_hex
from agent.dfnsapi.client import DfnsApi, Upstream, dfns_error
from agent.errors import BadRequest, DfnsError, DfnsNotConfigured

T = TypeVar("T")
MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")
MAX_PATH = 2048


async def in_pool(executor: Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking token call on the signing threads, or right here when there are none (a fast local
    token: the hop to a thread costs more than the call)."""
    if executor is None:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, lambda: fn(*args, **kwargs))


def serialize_payload(body: Any) -> str:
    """The one serialization of a request body: compact JSON, ``{}`` when there is no body."""
    return json.dumps({} if body is None else body, separators=(",", ":"), ensure_ascii=False)


def check_path(path: str) -> str:
    """A Dfns API path: absolute, no scheme or host, no fragment, no whitespace."""
    if len(path) > MAX_PATH or not _PATH_RE.fullmatch(path) or "/../" in path or path.endswith("/.."):
        raise BadRequest(f"path must be an absolute Dfns API path like /wallets (got {path[:100]!r})")
    return path


class DfnsFlow:
    def __init__(self, service: SigningService, executor: Executor | None, apis: Mapping[str, DfnsApi]) -> None:
        self._service = service
        self._executor = executor
        self._apis = dict(apis)

    def _api(self, credential: str | None, grant: Grant) -> tuple[str, DfnsApi]:
        if credential is None:
            usable = [n for n in self._apis if grant.credentials is None or n in grant.credentials]
            if not usable:
                raise DfnsNotConfigured("no credential you may use has [credential.dfns] settings")
            credential = usable[0]
        self._service.credential(credential)  # 404 for a name that does not exist at all
        grant.require_credential(credential)
        api = self._apis.get(credential)
        if api is None:
            raise DfnsNotConfigured(f"credential {credential!r} has no [credential.dfns] settings")
        return credential, api

    async def _in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await in_pool(self._executor, fn, *args, **kwargs)

    async def _user_action(
        self, method: str, path: str, payload: str, credential: str, api: DfnsApi, caller: Caller | None, grant: Grant
    ) -> str:
        bare = path.split("?", 1)[0]
        challenge = await api.init_user_action(method, bare, payload)
        action = {"method": method, "path": path, "payloadSha256": sha256_hex(payload.encode("utf-8"))}
        attempt = await self._in_pool(
            self._service.sign_attempt, challenge, credential, caller=caller, grant=grant, action=action
        )
        first_factor = await self._service.finish_async(attempt)
        identifier = challenge.get("challengeIdentifier")
        if not isinstance(identifier, str):
            raise DfnsError("Dfns's /auth/action/init answer has no challengeIdentifier", status=502)
        return await api.complete_user_action(identifier, first_factor)

    async def user_action(
        self,
        method: str,
        path: str,
        body: Any,
        credential: str | None,
        *,
        caller: Caller | None = None,
        grant: Grant | None = None,
    ) -> dict[str, str]:
        """Get a user-action token for ``method path body``; returns it with the exact payload to send."""
        method = method.upper()
        if method not in MUTATING:
            raise BadRequest(f"{method} requests need no user action; only {', '.join(sorted(MUTATING))} do")
        check_path(path)
        grant = grant or UNRESTRICTED
        name, api = self._api(credential, grant)
        payload = serialize_payload(body)
        token = await self._user_action(method, path, payload, name, api, caller, grant)
        return {"userAction": token, "payload": payload}

    async def request(
        self,
        method: str,
        path: str,
        body: Any,
        credential: str | None,
        *,
        caller: Caller | None = None,
        grant: Grant | None = None,
    ) -> Upstream:
        """Make the real Dfns call, with a user action when it mutates. Dfns's answer comes back as is."""
        method = method.upper()
        check_path(path)
        grant = grant or UNRESTRICTED
        name, api = self._api(credential, grant)
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
        grant: Grant | None = None,
    ) -> Any:
        """Register ``credential``'s key as a new Dfns Key credential, user-action signed by ``via``.

        ``/auth/credentials/init`` → sign ``key.create`` + attestation with the new key →
        ``POST /auth/credentials`` with a user action from the existing credential (rotation).
        """
        self._service.credential(credential)
        grant = grant or UNRESTRICTED
        via_name, api = self._api(via, grant)
        if via_name == credential:
            raise BadRequest("a credential cannot register itself; name an existing credential in 'via'")
        challenge = await api.init_registration()
        attempt = await self._in_pool(
            self._service.register_attempt, challenge, credential, credential_name=credential_name, caller=caller
        )
        body = await self._service.finish_async(attempt)
        payload = serialize_payload(body)
        token = await self._user_action("POST", "/auth/credentials", payload, via_name, api, caller, grant)
        answer = await api.send("POST", "/auth/credentials", payload.encode("utf-8"), token)
        if answer.status >= 400:
            raise dfns_error(answer.status, answer.content, "POST /auth/credentials")
        try:
            return json.loads(answer.content)
        except ValueError:
            raise DfnsError("Dfns answered POST /auth/credentials without JSON", status=502) from None
