"""The outcome of the last reload, where ``dfns-agent reload`` (the units' ``ExecReload=``) finds it.

systemd 252 has no ``Type=notify-reload``: ``systemctl reload`` waits only for the ``ExecReload=`` command.
So that command sends SIGHUP and waits here for the agent's answer, given once every worker has applied
the new configuration (or one has refused it), and exits non-zero on a refusal: ``systemctl reload`` then
fails instead of returning 0 while the old configuration stays in force.

One small file per agent process, ``reload.PID`` in the agent's state directory (``$XDG_STATE_HOME/dfns-agent``,
``/var/lib/dfns-agent`` under the shipped unit): ``SEQ ok|failed MESSAGE``, replaced atomically.

Beside it, while a reload with several workers runs, ``reload.PID.toml`` (mode 0600, in the 0700 state
directory): the config text the supervisor read and validated, which every worker applies, so that none
applies what the file holds by the time it gets to it. It holds only what the config file holds (never the
PIN or a Dfns token read from elsewhere) and is removed when the reload ends.
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


def staged_path(pid: int) -> Path:
    return status_path(pid).with_name(f"reload.{pid}.toml")


_STAGED = b"# dfns-agent reload "


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole, atomically (a reader sees the old file or the new one), mode 0600, in the 0700
    state directory; a link planted where the temporary file goes is not followed. Raises OSError."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def stage(pid: int, seq: int, text: bytes) -> None:
    """Hand reload ``seq``'s config text to the workers of supervisor ``pid``; raises OSError."""
    _replace(staged_path(pid), _STAGED + str(seq).encode() + b"\n" + text)


def read_staged(pid: int) -> tuple[int, bytes]:
    """The reload sequence number and the config text supervisor ``pid`` staged; raises OSError or
    ValueError (nothing staged: no reload is under way)."""
    header, _, text = staged_path(pid).read_bytes().partition(b"\n")
    if not header.startswith(_STAGED):
        raise ValueError(f"{staged_path(pid)} is not a staged configuration")
    return int(header[len(_STAGED) :]), text


def unstage(pid: int) -> None:
    with contextlib.suppress(OSError):
        staged_path(pid).unlink()


def write(pid: int, outcome: ReloadOutcome) -> None:
    """Best effort: a state directory that cannot be written costs the reload command its answer, not the
    reload (the command then says it could not learn the outcome)."""
    line = f"{outcome.seq} {'ok' if outcome.ok else 'failed'} {outcome.message}".replace("\n", " ")
    with contextlib.suppress(OSError):
        _replace(status_path(pid), (line + "\n").encode("utf-8"))


def read(pid: int) -> ReloadOutcome | None:
    try:
        seq, verdict, message = status_path(pid).read_text(encoding="utf-8").rstrip("\n").split(" ", 2)
        return ReloadOutcome(int(seq), verdict == "ok", message)
    except (OSError, ValueError):
        return None


def remove(pid: int) -> None:
    with contextlib.suppress(OSError):
        status_path(pid).unlink()
    unstage(pid)
