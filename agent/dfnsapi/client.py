"""HTTP calls to the Dfns API, with retries only where a retry cannot do harm.

- ``POST /auth/action/init`` and ``POST /auth/credentials/init`` only create challenges: they are retried
  with backoff on network errors, timeouts, 429 and 5xx (honouring ``Retry-After``).
- ``POST /auth/action`` consumes a challenge and is never retried: a challenge is never replayed.
- The real request is retried only when the connection was never made (nothing reached Dfns), because
  its user action is single-use and the call itself is not idempotent.

One pooled transport (keep-alive, aiohttp's pool: ``transport.py``) serves every credential; each
:class:`DfnsApi` adds its own base URL and bearer token, which is never logged.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from agent import __version__, jsonio
from agent.config import DfnsConfig
from agent.dfns import KeyAssertion
from agent.dfnsapi.transport import (
    AiohttpTransport,
    Failure,
    HttpAnswer,
    HttpRequest,
    HttpTransport,
    Timeouts,
    TransportError,
)
from agent.errors import DfnsError, DfnsTimeout, DfnsUnreachable
from agent.secret import Secret

USER_AGENT = f"dfns-agent/{__version__}"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_PASS_HEADERS = frozenset({"content-type", "retry-after", "location"})
_NEVER_PASS = frozenset({"x-dfns-useraction", "set-cookie", "authorization"})
_MAX_RETRY_AFTER = 30.0
# The most of an answer the agent reads (decoded). Dfns's auth answers are a few KB; the real call's answer
# is passed back to the caller, and Dfns's list endpoints page at most a few hundred KB.
MAX_AUTH_ANSWER = 1 << 20
MAX_ANSWER = 8 << 20


def make_transport() -> AiohttpTransport:
    """The agent's one connection pool to Dfns (see ``transport.py`` for why aiohttp)."""
    return AiohttpTransport(user_agent=USER_AGENT, max_connections=100, keepalive_expiry=30.0)


@dataclass(frozen=True)
class Upstream:
    """Dfns's answer to the real request, passed back to the client unchanged."""

    status: int
    headers: dict[str, str]
    content: bytes


def _headers_of_interest(headers: Mapping[str, str]) -> dict[str, str]:
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
    """The one place transport failures become the agent's: timeouts are ``dfns_timeout`` (504), other
    failures ``dfns_unreachable`` (502). ``unsure``: a real call, which may have reached Dfns once its
    connection was made; the message then says it may or may not have been executed."""
    try:
        yield
    except TransportError as e:
        failure = e.failure
        if failure is Failure.TOO_LARGE:
            done = "; it was executed" if unsure and e.status is not None and e.status < 400 else ""
            raise DfnsError(
                f"Dfns answered {step} with {e.status} and a body larger than the agent reads{done}",
                status=502,
            ) from None
        if not failure.sent and (unsure or not failure.timed_out):
            raise DfnsUnreachable(f"cannot reach Dfns at {base_url} for {step}: {failure.value}") from None
        if failure.timed_out:
            maybe = "; it may or may not have been executed" if unsure else ""
            raise DfnsTimeout(f"Dfns did not answer {step} within {timeout:g}s{maybe}") from None
        if unsure:
            raise DfnsUnreachable(
                f"connection to Dfns failed during {step} ({failure.value}); it may or may not have been executed"
            ) from None
        raise DfnsUnreachable(f"cannot reach Dfns at {base_url} for {step}: {failure.value}") from None


class DfnsApi:
    """One Dfns identity (base URL + bearer token) over the shared transport."""

    def __init__(self, http: HttpTransport, cfg: DfnsConfig, token: Secret, *, backoff: float = 0.25) -> None:
        self._http = http
        self.cfg = cfg
        self._token = token
        self._backoff = backoff
        # A call gets connect_timeout to connect and timeout for the rest, in all: bytes trickling in
        # slower than that do not hold the caller's request open.
        total = cfg.connect_timeout + cfg.timeout
        self._timeouts = Timeouts(connect=cfg.connect_timeout, pool=cfg.timeout, read=cfg.timeout, total=total)

    def _request(
        self, method: str, path: str, content: bytes | None, headers: dict[str, str], max_answer: int = MAX_AUTH_ANSWER
    ) -> HttpRequest:
        headers["Authorization"] = f"Bearer {self._token.reveal()}"
        return HttpRequest(method, self.cfg.base_url + path, headers, content, self._timeouts, max_answer)

    async def _post_json(self, path: str, body: dict[str, Any]) -> HttpAnswer:
        content = jsonio.dumps(body)
        return await self._http.send(self._request("POST", path, content, {"Content-Type": "application/json"}))

    def _delay(self, attempt: int, answer: HttpAnswer | None) -> float:
        if answer is not None:
            after = answer.headers.get("retry-after")
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
            answer: HttpAnswer | None = None
            try:
                with self._mapped(step):
                    answer = await self._post_json(path, body)
            except (DfnsTimeout, DfnsUnreachable) as e:
                last = e
            else:
                if answer.status < 400:
                    return json_object(answer.status, answer.content, step)
                last = dfns_error(answer.status, answer.content, step)
                if answer.status not in _RETRY_STATUS:
                    raise last
            if attempt < self.cfg.retries:
                await asyncio.sleep(self._delay(attempt, answer))
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
            answer = await self._post_json("/auth/action", body)
        if answer.status >= 400:
            raise dfns_error(answer.status, answer.content, step)
        token = json_object(answer.status, answer.content, step).get("userAction")
        if not isinstance(token, str) or not token:
            raise DfnsError(f"Dfns answered {step} without a userAction", status=502)
        return token

    async def send(self, method: str, path: str, content: bytes | None, user_action: str | None) -> Upstream:
        """The real request. Retried only if no connection was made, so Dfns never sees it twice."""
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if user_action is not None:
            headers["X-DFNS-USERACTION"] = user_action
        step = f"{method} {path}"
        request = self._request(method, path, content, headers, MAX_ANSWER)
        with self._mapped(step, unsure=True):
            for attempt in range(1 + self.cfg.retries):
                try:
                    answer = await self._http.send(request)
                except TransportError as e:
                    if e.failure.sent or attempt >= self.cfg.retries:
                        raise
                    await asyncio.sleep(self._delay(attempt, None))  # nothing reached Dfns: safe to try again
                    continue
                return Upstream(answer.status, _headers_of_interest(answer.headers), answer.content)
        raise AssertionError("unreachable")  # pragma: no cover


def json_object(status: int, content: bytes, step: str) -> dict[str, Any]:
    """A Dfns answer's JSON object, or ``dfns_error`` 502 (not JSON, not an object, nested too deep)."""
    try:
        data = jsonio.loads(content)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise DfnsError(f"Dfns answered {step} with {status} but no JSON object", status=502)
    return data
