"""HTTP calls to the Dfns API, with retries only where a retry cannot do harm.

- ``POST /auth/action/init`` and ``POST /auth/credentials/init`` only create challenges: they are retried
  with backoff on network errors, timeouts, 429 and 5xx (honouring ``Retry-After``).
- ``POST /auth/action`` consumes a challenge and is never retried: a challenge is never replayed.
- The real request is retried only when the connection was never made (nothing reached Dfns), because
  its user action is single-use and the call itself is not idempotent.

One pooled :class:`httpx.AsyncClient` (keep-alive, over aiohttp's pool: ``transport.py``) serves every
credential; each :class:`DfnsApi` adds its own base URL and bearer token, which is never logged.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from agent import __version__
from agent.config import DfnsConfig
from agent.dfns import KeyAssertion
from agent.dfnsapi.transport import AiohttpTransport
from agent.errors import DfnsError, DfnsTimeout, DfnsUnreachable
from agent.secret import Secret

USER_AGENT = f"dfns-agent/{__version__}"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_PASS_HEADERS = frozenset({"content-type", "retry-after", "location"})
_NEVER_PASS = frozenset({"x-dfns-useraction", "set-cookie", "authorization"})
_MAX_RETRY_AFTER = 30.0


def make_http_client() -> httpx.AsyncClient:
    """The agent's one client for Dfns: httpx's API over aiohttp's pool (see ``transport.py`` for why)."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections=100, keepalive_expiry=30.0),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        trust_env=False,  # the transport reads the proxy and CA settings from the environment itself
    )


@dataclass(frozen=True)
class Upstream:
    """Dfns's answer to the real request, passed back to the client unchanged."""

    status: int
    headers: dict[str, str]
    content: bytes


def _headers_of_interest(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if (k in _PASS_HEADERS or k.startswith("x-")) and k not in _NEVER_PASS}


def dfns_error(status: int, content: bytes, step: str) -> DfnsError:
    """Dfns's error answer as an agent error that keeps Dfns's status, message and error object."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    text = content[:500].decode("utf-8", "replace")
    if isinstance(err, dict):
        message = str(err.get("message") or "error")
        detail: dict[str, Any] = err
    else:
        message, detail = (text or "error"), {"body": text}
    e = DfnsError(f"Dfns answered {step} with {status}: {message}", status=status)
    e.details["dfns"] = detail
    return e


@contextmanager
def mapped_errors(base_url: str, step: str, timeout: float, *, unsure: bool = False) -> Iterator[None]:
    """The one place httpx's exceptions become the agent's: timeouts are ``dfns_timeout`` (504), other
    transport failures ``dfns_unreachable`` (502). ``unsure``: a real call, which may have reached Dfns once
    its connection was made; the message then says it may or may not have been executed."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        if not unsure and isinstance(e, httpx.TimeoutException):
            raise DfnsTimeout(f"Dfns did not answer {step} within {timeout:g}s") from None
        raise DfnsUnreachable(f"cannot reach Dfns at {base_url} for {step}: {type(e).__name__}") from None
    except httpx.TimeoutException:
        maybe = "; it may or may not have been executed" if unsure else ""
        raise DfnsTimeout(f"Dfns did not answer {step} within {timeout:g}s{maybe}") from None
    except httpx.TransportError as e:
        if unsure:
            raise DfnsUnreachable(
                f"connection to Dfns failed during {step} ({type(e).__name__}); it may or may not have been executed"
            ) from None
        raise DfnsUnreachable(f"cannot reach Dfns at {base_url} for {step}: {type(e).__name__}") from None


class DfnsApi:
    """One Dfns identity (base URL + bearer token) over the shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, cfg: DfnsConfig, token: Secret, *, backoff: float = 0.25) -> None:
        self._http = http
        self.cfg = cfg
        self._token = token
        self._backoff = backoff
        self._timeout = httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}", **(extra or {})}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            if after is not None:
                try:
                    return min(max(float(after), 0.0), _MAX_RETRY_AFTER)
                except ValueError:
                    pass
        return float(min(self._backoff * 2**attempt, 10.0) * random.uniform(0.5, 1.5))

    def _mapped(self, step: str, *, unsure: bool = False) -> AbstractContextManager[None]:
        return mapped_errors(self.cfg.base_url, step, self.cfg.timeout, unsure=unsure)

    async def _create_challenge(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a challenge-creating call, retrying network errors, 429 and 5xx with backoff."""
        step = f"POST {path}"
        last: Exception | None = None
        for attempt in range(1 + self.cfg.retries):
            response: httpx.Response | None = None
            try:
                with self._mapped(step):
                    response = await self._http.post(
                        self.cfg.base_url + path, json=body, headers=self._headers(), timeout=self._timeout
                    )
            except (DfnsTimeout, DfnsUnreachable) as e:
                last = e
            else:
                if response.status_code < 400:
                    return _json_object(response, step)
                last = dfns_error(response.status_code, response.content, step)
                if response.status_code not in _RETRY_STATUS:
                    raise last
            if attempt < self.cfg.retries:
                await asyncio.sleep(self._delay(attempt, response))
        assert last is not None
        raise last

    async def init_user_action(self, method: str, path: str, payload: str) -> dict[str, Any]:
        body = {
            "userActionHttpMethod": method,
            "userActionHttpPath": path,
            "userActionPayload": payload,
            "userActionServerKind": "Api",
        }
        return await self._create_challenge("/auth/action/init", body)

    async def init_registration(self) -> dict[str, Any]:
        return await self._create_challenge("/auth/credentials/init", {"kind": "Key"})

    async def complete_user_action(self, challenge_identifier: str, assertion: KeyAssertion) -> str:
        """Trade the signed challenge for a user-action token. Never retried: the challenge is spent."""
        step = "POST /auth/action"
        body = {"challengeIdentifier": challenge_identifier, "firstFactor": assertion.to_json()}
        with self._mapped(step):
            r = await self._http.post(
                self.cfg.base_url + "/auth/action", json=body, headers=self._headers(), timeout=self._timeout
            )
        if r.status_code >= 400:
            raise dfns_error(r.status_code, r.content, step)
        token = _json_object(r, step).get("userAction")
        if not isinstance(token, str) or not token:
            raise DfnsError(f"Dfns answered {step} without a userAction", status=502)
        return token

    async def send(self, method: str, path: str, content: bytes | None, user_action: str | None) -> Upstream:
        """The real request. Retried only if no connection was made, so Dfns never sees it twice."""
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if user_action is not None:
            headers["X-DFNS-USERACTION"] = user_action
        step = f"{method} {path}"
        with self._mapped(step, unsure=True):
            for attempt in range(1 + self.cfg.retries):
                try:
                    r = await self._http.request(
                        method,
                        self.cfg.base_url + path,
                        content=content,
                        headers=self._headers(headers),
                        timeout=self._timeout,
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    if attempt >= self.cfg.retries:
                        raise
                    await asyncio.sleep(self._delay(attempt, None))  # nothing reached Dfns: safe to try again
                    continue
                return Upstream(r.status_code, _headers_of_interest(r.headers), r.content)
        raise AssertionError("unreachable")  # pragma: no cover


def _json_object(r: httpx.Response, step: str) -> dict[str, Any]:
    try:
        data = r.json()
    except (ValueError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise DfnsError(f"Dfns answered {step} with {r.status_code} but no JSON object", status=502)
    return data
