"""A small synchronous client for the agent's Unix socket, on httpx.

    from agent.client import AgentClient
    with AgentClient() as agent:
        first_factor = agent.sign(challenge)          # challenge: /auth/action/init's answer

Errors are raised as :class:`AgentClientError` with the agent's stable ``code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.health import AgentHealth
from agent.paths import default_socket_path


class AgentClientError(Exception):
    """The agent answered with an error, or could not be reached (``code == "agent_unreachable"``)."""

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


class AgentClient:
    def __init__(self, socket_path: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://dfns-agent",
            timeout=timeout,
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise AgentClientError(
                0,
                "agent_unreachable",
                f"cannot reach the agent at {self.socket_path}: {e}; start it with `dfns-agent serve`, or point "
                "this client at the socket it listens on (--socket, or [server] socket in the config)",
            ) from None

    def _call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        return self._check(self._send(method, path, body), ok)

    @staticmethod
    def _check(r: httpx.Response, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AgentClientError(
                r.status_code, "bad_response", f"agent answered {r.status_code} without a JSON object"
            )
        if r.status_code not in ok:
            err = data.get("error", {})
            raise AgentClientError(r.status_code, err.get("code", "unknown"), err.get("message", r.text))
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
        result = self._call("POST", "/v1/user-action", _flow_body(method, path, body, credential))
        return {"userAction": str(result["userAction"]), "payload": str(result["payload"])}

    def request(self, method: str, path: str, body: Any = None, *, credential: str | None = None) -> DfnsResponse:
        """Have the agent make the Dfns call (user action included when it mutates); Dfns's answer as is."""
        r = self._send("POST", "/v1/request", _flow_body(method, path, body, credential))
        if r.headers.get("x-dfns-agent-upstream") != "dfns":
            self._check(r)  # an error of the agent's own (or of the user-action steps): raises
        headers = {k: v for k, v in r.headers.items() if k not in ("content-length", "date", "server")}
        return DfnsResponse(r.status_code, headers, r.content)

    def register_credential(
        self, credential: str, *, via: str | None = None, credential_name: str | None = None
    ) -> dict[str, Any]:
        """Register ``credential``'s key with Dfns, user-action signed by the ``via`` credential."""
        body: dict[str, Any] = {"credential": credential}
        if via is not None:
            body["via"] = via
        if credential_name is not None:
            body["credentialName"] = credential_name
        return self._call("POST", "/v1/credentials", body)

    def credentials(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/credentials")["credentials"])

    def metrics(self) -> str:
        """The Prometheus text the agent exposes (all worker processes)."""
        r = self._send("GET", "/v1/metrics")
        if r.status_code != 200:
            self._check(r)
        return r.text

    def health(self) -> AgentHealth:
        """The agent's health; returned (not raised) when it says ``degraded`` or ``down``."""
        r = self._send("GET", "/v1/health")
        data = self._check(r, ok=(200, 503))
        if "error" in data:
            err = data["error"]
            raise AgentClientError(503, err.get("code", "unknown"), err.get("message", ""))
        try:
            return AgentHealth.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            problem = f"the health answer is not the agent's ({type(e).__name__}: {e})"
            raise AgentClientError(r.status_code, "bad_response", problem) from None


def _flow_body(method: str, path: str, body: Any, credential: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        out["body"] = body
    if credential is not None:
        out["credential"] = credential
    return out
