"""The outcome of the last reload, where ``dfns-agent reload`` (the units' ``ExecReload=``) finds it.

systemd 252 has no ``Type=notify-reload``: ``systemctl reload`` waits only for the ``ExecReload=`` command.
So that command sends SIGHUP and waits here for the agent's answer, given once every worker has applied
the new configuration (or one has refused it), and exits non-zero on a refusal: ``systemctl reload`` then
fails instead of returning 0 while the old configuration stays in force.

One small file per agent process, ``reload.PID`` in the agent's state directory (``$XDG_STATE_HOME/dfns-agent``,
``/var/lib/dfns-agent`` under the shipped unit): ``SEQ ok|failed MESSAGE``, replaced atomically.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.paths import default_audit_path


@dataclass(frozen=True)
class ReloadOutcome:
    seq: int  # reloads this agent has finished, counting refused ones
    ok: bool
    message: str


def status_path(pid: int) -> Path:
    return default_audit_path().parent / f"reload.{pid}"


def write(pid: int, outcome: ReloadOutcome) -> None:
    """Best effort: a state directory that cannot be written costs the reload command its answer, not the
    reload (the command then says it could not learn the outcome)."""
    path = status_path(pid)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = f"{outcome.seq} {'ok' if outcome.ok else 'failed'} {outcome.message}".replace("\n", " ")
        tmp.write_text(line + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def read(pid: int) -> ReloadOutcome | None:
    try:
        seq, verdict, message = status_path(pid).read_text(encoding="utf-8").rstrip("\n").split(" ", 2)
        return ReloadOutcome(int(seq), verdict == "ok", message)
    except (OSError, ValueError):
        return None


def remove(pid: int) -> None:
    with contextlib.suppress(OSError):
        status_path(pid).unlink()
