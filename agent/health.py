"""Health as typed values: what the token reports, what the agent answers on ``GET /v1/health``.

One definition for the producer (the token and the signing service) and every reader (``dfns-agent
status``, ``doctor``, the tests), so a key spelled one way on one side and another way on the other
cannot happen again. The JSON spelling (camelCase, as every other answer of the agent) lives only in
:meth:`AgentHealth.to_json` and :meth:`AgentHealth.from_json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TokenState(str, Enum):
    """``degraded``: the token failed and the agent is reconnecting by itself; ``down``: it needs an operator
    (PIN rejected or locked, a different token, the audit log unwritable)."""

    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True)
class TokenIdentity:
    """What the token says it is; checked again after every reconnect."""

    label: str
    serial: str
    manufacturer: str
    model: str


@dataclass(frozen=True)
class TokenHealth:
    """The token's state, whether the logged-in anchor session is there, and how often it reconnected."""

    state: TokenState
    present: bool
    logged_in: bool
    reconnects: int
    reason: str | None = None


@dataclass(frozen=True)
class AgentHealth:
    """The answer of ``GET /v1/health``: the token, each credential's key, the audit log, in one status."""

    status: TokenState
    identity: TokenIdentity
    token: TokenHealth
    keys: Mapping[str, bool] = field(default_factory=dict)
    uptime_seconds: float = 0.0
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is TokenState.OK

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status.value,
            "token": {
                "label": self.identity.label,
                "serial": self.identity.serial,
                "manufacturer": self.identity.manufacturer,
                "model": self.identity.model,
                "present": self.token.present,
                "loggedIn": self.token.logged_in,
                "reconnects": self.token.reconnects,
            },
            "keys": dict(self.keys),
            "uptimeSeconds": self.uptime_seconds,
        }
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentHealth:
        """Read an agent's answer back (``dfns-agent status``, ``doctor``). Raises KeyError/ValueError on
        a shape that is not the agent's."""
        t = data["token"]
        status = TokenState(data["status"])
        return cls(
            status=status,
            identity=TokenIdentity(t["label"], t["serial"], t["manufacturer"], t["model"]),
            token=TokenHealth(status, bool(t["present"]), bool(t["loggedIn"]), int(t["reconnects"])),
            keys={str(k): bool(v) for k, v in data.get("keys", {}).items()},
            uptime_seconds=float(data.get("uptimeSeconds", 0.0)),
            reason=data.get("reason"),
        )
