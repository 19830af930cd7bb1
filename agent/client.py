"""A small synchronous client for the agent's Unix socket, on the standard library's ``http.client``.

    from agent.client import AgentClient
    with AgentClient() as agent:
        first_factor = agent.sign(challenge)          # challenge: /auth/action/init's answer

Errors are raised as :class:`AgentClientError` with the agent's stable ``code``.

Why not httpx: a caller of ``/v1/request`` waits for it, so the client's CPU is on the path of every flow.
httpx's sync client spent about 1.5 ms of CPU per call here (request and URL models, its pool, its cookie
jar); ``http.client`` over the same kept-alive socket does the same in a fraction of that. Safe to share
between threads: each call takes its own connection from a small pool of idle ones.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.health import AgentHealth
from agent.paths import default_socket_path

_MAX_IDLE = 4  # kept-alive connections per client; each counts against the agent's per-uid limit
UNREACHABLE = "agent_unreachable"  # nothing reached the agent: safe to send again
NO_ANSWER = "agent_no_answer"  # the request reached the agent and no answer came: it may still be carried out
INVALID_JSON = "invalid_json"  # a body that is not JSON (NaN, a float beyond a double, a lone surrogate): not sent


class AgentClientError(Exception):
    """The agent answered with an error, or could not be reached (``code == UNREACHABLE``), or took the request
    and gave no answer in time (``code == NO_ANSWER``: a Dfns call may still be made; check before resending)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class DfnsResponse:
    """Dfns's answer to a request the agent made (status, selected headers, body as Dfns sent it)."""

    status: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content) if self.content else None


@dataclass(frozen=True)
class CredentialRegistration:
    """Dfns's answer to a credential registration through the agent: its status as Dfns gave it, since a 202
    (a policy awaits approval: the credential is not active yet) must not read as a 200, and its body."""

    status: int
    body: dict[str, Any]

    @property
    def pending(self) -> bool:
        return self.status == 202


@dataclass(frozen=True)
class _Answer:
    """One whole answer of the agent; header names in lower case, repeated ones joined by ``", "``."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def encode_body(body: Any) -> bytes:
    """``body`` as the compact UTF-8 JSON the agent reads, or :class:`AgentClientError` ``invalid_json``
    (nothing sent): NaN and infinities, a lone surrogate, nesting past Python's recursion limit or a value
    JSON has no spelling for would otherwise escape as a bare ValueError, UnicodeEncodeError, RecursionError
    or TypeError from the middle of a call."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        problem = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise AgentClientError(0, INVALID_JSON, f"the request body cannot be sent as JSON ({problem})") from None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("dfns-agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def reusable(self) -> bool:
        """Open, and with nothing to read: the agent closes idle connections, and a request sent on one it has
        closed would fail, when it could have gone on a new one (nothing is retried: a request may not be)."""
        if self.sock is None:
            return False
        poller = select.poll()  # not select.select: it refuses descriptors past 1023, which a daemon can have
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)  # readable: the agent closed it (EOF), or an error (POLLHUP, POLLERR)


class AgentClient:
    """``timeout``: seconds to wait for the agent's answer to a signature, a health check and the like.
    ``flow_timeout``: for the calls in which the agent talks to Dfns (``request``, ``user_action``,
    ``register_credential``): several Dfns calls, each with its own timeout and retries, so far longer."""

    def __init__(
        self, socket_path: str | Path | None = None, *, timeout: float = 30.0, flow_timeout: float = 300.0
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self._timeout = timeout
        self._flow_timeout = flow_timeout
        self._idle: list[_UnixConnection] = []
        self._lock = threading.Lock()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connection(self) -> _UnixConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.reusable():
                    return conn
                conn.close()
        return _UnixConnection(self.socket_path, self._timeout)

    def _release(self, conn: _UnixConnection, response: http.client.HTTPResponse) -> None:
        with self._lock:
            if not response.will_close and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _send(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> _Answer:
        headers = {"Accept": "application/json"}
        content = None
        if body is not None:
            content = encode_body(body)
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, path, body=content, headers=headers)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AgentClientError(
                0,
                UNREACHABLE,
                f"cannot reach the agent at {self.socket_path}: {type(e).__name__}: {e}; start it with "
                "`dfns-agent serve`, or point this client at the socket it listens on (--socket, or [server] "
                "socket in the config)",
            ) from None
        try:
            assert conn.sock is not None
            conn.sock.settimeout(self._timeout if timeout is None else timeout)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AgentClientError(
                0,
                NO_ANSWER,
                f"the agent at {self.socket_path} took {method} {path} and gave no answer "
                f"({type(e).__name__}: {e}); it may still carry it out, so check before sending it again",
            ) from None
        answer_headers: dict[str, str] = {}
        for k, v in response.getheaders():
            name = k.lower()
            answer_headers[name] = f"{answer_headers[name]}, {v}" if name in answer_headers else v
        self._release(conn, response)
        return _Answer(response.status, answer_headers, data)

    def _call(
        self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,), timeout: float | None = None
    ) -> dict[str, Any]:
        return self._check(self._send(method, path, body, timeout=timeout), ok)

    @staticmethod
    def _check(r: _Answer, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AgentClientError(r.status, "bad_response", f"agent answered {r.status} without a JSON object")
        if r.status not in ok:
            raise _refusal(r.status, data.get("error"), r.text)
        return data

    def sign(self, challenge: dict[str, Any], credential: str | None = None) -> dict[str, Any]:
        """Sign an ``/auth/action/init`` challenge; returns ``firstFactor`` for ``POST /auth/action``."""
        body: dict[str, Any] = {"challenge": challenge}
        if credential is not None:
            body["credential"] = credential
        return self._call("POST", "/v1/sign", body)

    def register(
        self,
        challenge: dict[str, Any],
        credential: str,
        *,
        cred_id: str | None = None,
        credential_name: str | None = None,
    ) -> dict[str, Any]:
        """Sign an ``/auth/credentials/init`` challenge; returns the body for ``POST /auth/credentials``."""
        body: dict[str, Any] = {"challenge": challenge, "credential": credential}
        if cred_id is not None:
            body["credId"] = cred_id
        if credential_name is not None:
            body["credentialName"] = credential_name
        return self._call("POST", "/v1/register", body)

    def user_action(self, method: str, path: str, body: Any = None, *, credential: str | None = None) -> dict[str, str]:
        """A single-use user-action token for ``method path body``, and the exact payload to send with it."""
        result = self._call(
            "POST", "/v1/user-action", _flow_body(method, path, body, credential), timeout=self._flow_timeout
        )
        return {"userAction": str(result["userAction"]), "payload": str(result["payload"])}

    def request(self, method: str, path: str, body: Any = None, *, credential: str | None = None) -> DfnsResponse:
        """Have the agent make the Dfns call (user action included when it mutates); Dfns's answer as is."""
        r = self._send("POST", "/v1/request", _flow_body(method, path, body, credential), timeout=self._flow_timeout)
        if r.headers.get("x-dfns-agent-upstream") != "dfns":
            self._check(r)  # an error of the agent's own (or of the user-action steps): raises
        headers = {k: v for k, v in r.headers.items() if k not in ("content-length", "date", "server")}
        return DfnsResponse(r.status, headers, r.content)

    def register_credential(
        self, credential: str, *, via: str | None = None, credential_name: str | None = None
    ) -> dict[str, Any]:
        """Register ``credential``'s key with Dfns, user-action signed by the ``via`` credential; Dfns's body
        (:meth:`credential_registration` also gives its status)."""
        return self.credential_registration(credential, via=via, credential_name=credential_name).body

    def credential_registration(
        self, credential: str, *, via: str | None = None, credential_name: str | None = None
    ) -> CredentialRegistration:
        """As :meth:`register_credential`, with Dfns's status: a 202 means approval is pending."""
        body: dict[str, Any] = {"credential": credential}
        if via is not None:
            body["via"] = via
        if credential_name is not None:
            body["credentialName"] = credential_name
        r = self._send("POST", "/v1/credentials", body, timeout=self._flow_timeout)
        return CredentialRegistration(r.status, self._check(r, ok=(200, 201, 202)))

    def credentials(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/credentials")["credentials"])

    def metrics(self) -> str:
        """The Prometheus text the agent exposes (all worker processes)."""
        r = self._send("GET", "/v1/metrics")
        if r.status != 200:
            self._check(r)
        return r.text

    def health(self) -> AgentHealth:
        """The agent's health; returned (not raised) when it says ``degraded`` or ``down``."""
        r = self._send("GET", "/v1/health")
        data = self._check(r, ok=(200, 503))
        if "error" in data:
            raise _refusal(503, data["error"], r.text)
        try:
            return AgentHealth.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            problem = f"the health answer is not the agent's ({type(e).__name__}: {e})"
            raise AgentClientError(r.status, "bad_response", problem) from None


def _refusal(status: int, error: object, fallback: str) -> AgentClientError:
    """The agent's ``{"error": {"code", "message"}}`` as an exception; anything else on the socket (a proxy, a
    server that is not the agent) gives ``bad_response`` instead of an AttributeError from its shape."""
    if not isinstance(error, dict):
        shown = fallback[:200] + ("…" if len(fallback) > 200 else "")
        return AgentClientError(status, "bad_response", f"agent answered {status} without an error object: {shown}")
    code, message = error.get("code", "unknown"), error.get("message", fallback)
    return AgentClientError(status, str(code), str(message))


def _flow_body(method: str, path: str, body: Any, credential: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        out["body"] = body
    if credential is not None:
        out["credential"] = credential
    return out
