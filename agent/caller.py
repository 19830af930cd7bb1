"""Who is on the other end of a connection, as the kernel reports it (``SO_PEERCRED``).

A plain value shared by the policy (which decides), the audit log (which records) and the transport
(which reads it off the socket, see ``agent/transport/listener.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a connection. ``exe`` was read when the connection was accepted;
    ``started`` is that process's start time then (with the pid it names one process, see ``same_process``
    in ``agent/transport/listener.py``)."""

    uid: int
    gid: int
    pid: int
    exe: str | None
    started: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, object]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "exe": self.exe}
