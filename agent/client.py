"""A small synchronous client for the agent's Unix socket, on httpx.

    from agent.client import AgentClient
    with AgentClient() as agent:
        first_factor = agent.sign(challenge)          # challenge: /auth/action/init's answer

Errors are raised as :class:`AgentClientError` with the agent's stable ``code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from agent.listener import default_socket_path


class AgentClientError(Exception):
    """The agent answered with an error, or could not be reached (``code == "agent_unreachable"``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


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

    def _call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise AgentClientError(
                0, "agent_unreachable", f"cannot reach the agent at {self.socket_path}: {e}"
            ) from None
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

    def credentials(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/credentials")["credentials"])

    def health(self) -> dict[str, Any]:
        """The agent's health document; returned (not raised) when it says ``down``."""
        data = self._call("GET", "/v1/health", ok=(200, 503))
        if "error" in data:
            err = data["error"]
            raise AgentClientError(503, err.get("code", "unknown"), err.get("message", ""))
        return data
