"""Audit records as typed values: one record per signing attempt or refusal, one ``to_json()``.

The record says who asked (the kernel's caller), with which credential and key, for which clientData
digest and which Dfns action, and how it ended. It never holds a PIN or a token. The JSON spelling is
camelCase like every other JSON the agent writes; ``seq``, ``time`` and ``prev`` are added by the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent.caller import Caller


class Event(str, Enum):
    SIGN = "sign"
    REGISTER = "register"
    REFUSED = "refused"  # the policy refused the request before any credential was used
    # Written by the log itself, not by a request (see agent/core/audit.py):
    CHECKPOINT = "checkpoint"  # a signed note over the chain's head
    REPAIR = "repair"  # a torn tail (a write cut short by a crash) was cut off before appending
    ROTATE = "rotate"  # the first record of a file that continues the chain of the previous one


class Outcome(str, Enum):
    OK = "ok"
    REFUSED = "refused"  # the request was wrong or not allowed (4xx)
    ERROR = "error"  # the agent, the token or the audit log failed (5xx)


@dataclass(frozen=True)
class Action:
    """The Dfns call a user action is for (``/v1/user-action``, ``/v1/request``)."""

    method: str
    path: str
    payload_sha256: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"method": self.method, "path": self.path}
        if self.payload_sha256 is not None:
            out["payloadSha256"] = self.payload_sha256
        return out


@dataclass
class AuditRecord:
    """Filled in as a signing attempt learns things; written once it has an outcome."""

    event: Event
    caller: Caller | None
    agent_pid: int | None = None
    endpoint: str | None = None
    action: Action | None = None
    challenge: str | None = None
    challenge_identifier_sha256: str | None = None
    credential: str | None = None
    cred_id: str | None = None
    key_fingerprint: str | None = None
    client_data_sha256: str | None = None
    signature: str | None = None
    outcome: Outcome | None = None
    latency_ms: float | None = None
    code: str | None = None
    reason: str | None = None
    # For a summary of aggregated refusals (agent/core/refusals.py): how many more refusals like this one
    # came from this caller between the first (recorded on its own) and the last.
    count: int | None = None
    first_time: str | None = None
    last_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event.value, "caller": self.caller.to_json() if self.caller else None}
        for key, value in (
            ("agentPid", self.agent_pid),
            ("endpoint", self.endpoint),
            ("action", self.action.to_json() if self.action else None),
            ("challenge", self.challenge),
            ("challengeIdentifierSha256", self.challenge_identifier_sha256),
            ("credential", self.credential),
            ("credId", self.cred_id),
            ("keyFingerprint", self.key_fingerprint),
            ("clientDataSha256", self.client_data_sha256),
            ("signature", self.signature),
            ("outcome", self.outcome.value if self.outcome else None),
            ("latencyMs", self.latency_ms),
            ("code", self.code),
            ("reason", self.reason),
            ("count", self.count),
            ("firstTime", self.first_time),
            ("lastTime", self.last_time),
        ):
            if value is not None:
                out[key] = value
        return out
