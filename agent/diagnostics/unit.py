"""What a systemd unit gives the agent, for ``dfns-agent doctor --unit``: its user and groups, credentials,
environment and socket, read from systemd (``systemctl show``/``cat``), so that the doctor, run by an
operator outside the unit, checks the deployment the service will see instead of the operator's own.

``agent/cli/doctor.py`` uses it to run the checks as the unit's user, with the unit's credentials copied
into a private ``$CREDENTIALS_DIRECTORY`` (what systemd does at start) and the unit's environment.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Where systemd looks up a LoadCredential= source given as a name instead of a path (systemd.exec(5)).
CREDSTORE = (Path("/etc/credstore"), Path("/run/credstore"), Path("/usr/lib/credstore"))


@dataclass(frozen=True)
class UnitCredential:
    name: str
    source: Path | None  # the file systemd would copy; None: not found (systemd leaves it out, or fails)
    required: bool  # an absolute path that is missing fails the unit's start (status 243/CREDENTIALS)


@dataclass(frozen=True)
class UnitSettings:
    name: str
    user: str | None
    environment: tuple[tuple[str, str], ...]
    credentials: tuple[UnitCredential, ...]
    socket: Path | None  # the socket unit's ListenStream= path, when the unit is socket-activated
    socket_unit: str | None


class UnitError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _systemctl(*args: str) -> str:
    try:
        r = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UnitError(f"cannot run systemctl: {e}") from None
    if r.returncode != 0:
        raise UnitError(f"systemctl {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _show(unit: str, *props: str) -> dict[str, str]:
    out = _systemctl("show", unit, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _resolve(name: str, source: str) -> UnitCredential:
    if source.startswith("/"):
        path = Path(source)
        return UnitCredential(name, path if path.exists() else None, required=True)
    for directory in CREDSTORE:
        if (directory / source).exists():
            return UnitCredential(name, directory / source, required=False)
    return UnitCredential(name, None, required=False)


def load_credentials(unit_text: str) -> tuple[UnitCredential, ...]:
    """The unit's LoadCredential= lines (with drop-ins, as `systemctl cat` prints them; an empty one resets)."""
    found: dict[str, UnitCredential] = {}
    for line in unit_text.splitlines():
        m = re.match(r"\s*LoadCredential=(.*)$", line)
        if m is None:
            continue
        value = m.group(1).strip()
        if not value:
            found.clear()
            continue
        name, _, source = value.partition(":")
        found[name] = _resolve(name, source or name)
    return tuple(found.values())


def read_unit(unit: str) -> UnitSettings:
    props = _show(unit, "LoadState", "User", "Environment", "Triggers", "TriggeredBy")
    if props.get("LoadState") != "loaded":
        raise UnitError(f"{unit} is {props.get('LoadState', 'unknown')}: install the unit files first")
    env = tuple((k, v) for k, _, v in (i.partition("=") for i in props.get("Environment", "").split()) if v or k)
    socket_unit = next((u for u in props.get("TriggeredBy", "").split() if u.endswith(".socket")), None)
    socket: Path | None = None
    if socket_unit is not None:
        listen = _show(socket_unit, "Listen").get("Listen", "")
        m = re.match(r"(/\S+) \(Stream\)", listen)
        socket = Path(m.group(1)) if m else None
    return UnitSettings(
        name=unit,
        user=props.get("User") or None,
        environment=env,
        credentials=load_credentials(_systemctl("cat", unit)),
        socket=socket,
        socket_unit=socket_unit,
    )


def user_ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def as_unit_user(settings: UnitSettings) -> None:
    """In a child process: become the unit's user with its groups (initgroups, as systemd does)."""
    if settings.user is None:
        return
    uid, gid = user_ids(settings.user)
    os.initgroups(settings.user, gid)
    os.setgid(gid)
    os.setuid(uid)
