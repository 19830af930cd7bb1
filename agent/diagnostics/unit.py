"""What a systemd unit gives the agent, for ``dfns-agent doctor --unit``: its user and groups, credentials,
environment, socket and where its sandbox lets it write, read from systemd (``systemctl show``/``cat``), so
that the doctor, run by an operator outside the unit, checks the deployment the service will see instead of
the operator's own.

``agent/cli/doctor.py`` uses it to run the checks as the unit's user and groups (User=, Group=,
SupplementaryGroups=), with the unit's credentials copied into a private ``$CREDENTIALS_DIRECTORY`` (what
systemd does at start) and the unit's environment. The doctor does not run inside the unit's mount
namespace, so :class:`UnitSandbox` models the one part of it that most often stops the agent: which paths
ProtectSystem= leaves writable.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Where systemd looks up a LoadCredential= source given as a name instead of a path (systemd.exec(5)).
CREDSTORE = (Path("/etc/credstore"), Path("/run/credstore"), Path("/usr/lib/credstore"))
# Where a system unit's directories are created, each writable for the unit under any ProtectSystem=.
DIRECTORY_ROOTS = {
    "StateDirectory": Path("/var/lib"),
    "LogsDirectory": Path("/var/log"),
    "CacheDirectory": Path("/var/cache"),
    "RuntimeDirectory": Path("/run"),
}
# What ProtectSystem= makes read-only (systemd.exec(5)); "strict" is the whole tree but /dev, /proc, /sys.
READ_ONLY = {
    "yes": (Path("/usr"), Path("/boot"), Path("/efi")),
    "full": (Path("/usr"), Path("/boot"), Path("/efi"), Path("/etc")),
    "strict": (Path("/"),),
}
_API_FS = (Path("/dev"), Path("/proc"), Path("/sys"))
_PROPERTIES = (
    "LoadState",
    "User",
    "Group",
    "SupplementaryGroups",
    "Environment",
    "Triggers",
    "TriggeredBy",
    "ProtectSystem",
    "ReadWritePaths",
    *DIRECTORY_ROOTS,
)


@dataclass(frozen=True)
class UnitCredential:
    name: str
    source: Path | None  # the file systemd would copy; None: not found (systemd leaves it out, or fails)
    required: bool  # an absolute path that is missing fails the unit's start (status 243/CREDENTIALS)


@dataclass(frozen=True)
class Opening:
    """A path the unit may write below, and the setting that says so (for the doctor's detail)."""

    path: Path
    setting: str  # e.g. "StateDirectory=dfns-agent", "ReadWritePaths=-/var/lib/softhsm/tokens"


@dataclass(frozen=True)
class UnitSandbox:
    """Where the unit's mount namespace lets it write: ProtectSystem= and the paths opened again in it."""

    unit: str
    protect_system: str  # "no", "yes", "full" or "strict"
    openings: tuple[Opening, ...] = ()

    def opened_by(self, path: Path) -> str | None:
        """The setting that lets the unit write at ``path``; None when its sandbox keeps it read-only."""
        real = Path(os.path.realpath(path))
        for opening in self.openings:
            if real.is_relative_to(os.path.realpath(opening.path)):
                return opening.setting
        protected = READ_ONLY.get(self.protect_system, ())
        if not any(real.is_relative_to(p) for p in protected) or any(real.is_relative_to(p) for p in _API_FS):
            return f"outside what ProtectSystem={self.protect_system} makes read-only"
        return None


@dataclass(frozen=True)
class UnitSettings:
    name: str
    user: str | None
    environment: tuple[tuple[str, str], ...]
    credentials: tuple[UnitCredential, ...]
    socket: Path | None  # the socket unit's ListenStream= path, when the unit is socket-activated
    socket_unit: str | None
    group: str | None  # Group=; None: the user's own group
    supplementary_groups: tuple[str, ...]  # SupplementaryGroups=, added to the user's groups
    sandbox: UnitSandbox


@dataclass(frozen=True)
class UnitIds:
    """Who the unit's processes are: uid, primary gid and every supplementary gid (as systemd sets them)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str  # the user's name and home, for $USER and $HOME
    home: str


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


def parse_show(out: str) -> dict[str, str]:
    """``systemctl show`` output (``Name=value`` lines) by property name."""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _show(unit: str, *props: str) -> dict[str, str]:
    return parse_show(_systemctl("show", unit, *(f"--property={p}" for p in props)))


def _entries(value: str) -> list[tuple[str, str]]:
    """A space-separated list property's entries: each as given, and without its "-", "+" or ":" prefix."""
    return [(e, e.lstrip("-+:")) for e in value.split() if e.lstrip("-+:")]


def sandbox_from(unit: str, props: Mapping[str, str]) -> UnitSandbox:
    """The unit's writable paths from its ``systemctl show`` properties. A ReadWritePaths= entry that does
    not exist opens nothing: systemd ignores it ("-") or fails the start. PrivateTmp= opens nothing either:
    the unit's /tmp is its own, empty one, not the directory the doctor looks at."""
    openings = [
        Opening(Path(path), f"ReadWritePaths={raw}")
        for raw, path in _entries(props.get("ReadWritePaths", ""))
        if os.path.exists(path)
    ]
    for prop, root in DIRECTORY_ROOTS.items():
        for _, entry in _entries(props.get(prop, "")):
            name = entry.split(":", 1)[0]  # a "dir:symlink" entry
            openings.append(Opening(root / name, f"{prop}={name}"))
    return UnitSandbox(unit, props.get("ProtectSystem") or "no", tuple(openings))


def settings_from(
    unit: str, props: Mapping[str, str], unit_text: str, socket_unit: str | None = None, socket: Path | None = None
) -> UnitSettings:
    """The unit's settings from its ``systemctl show`` properties and ``systemctl cat`` text."""
    env = tuple((k, v) for k, _, v in (i.partition("=") for i in props.get("Environment", "").split()) if v or k)
    return UnitSettings(
        name=unit,
        user=props.get("User") or None,
        environment=env,
        credentials=load_credentials(unit_text),
        socket=socket,
        socket_unit=socket_unit,
        group=props.get("Group") or None,
        supplementary_groups=tuple(props.get("SupplementaryGroups", "").split()),
        sandbox=sandbox_from(unit, props),
    )


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
    props = _show(unit, *_PROPERTIES)
    if props.get("LoadState") != "loaded":
        raise UnitError(f"{unit} is {props.get('LoadState', 'unknown')}: install the unit files first")
    socket_unit = next((u for u in props.get("TriggeredBy", "").split() if u.endswith(".socket")), None)
    socket: Path | None = None
    if socket_unit is not None:
        listen = _show(socket_unit, "Listen").get("Listen", "")
        m = re.match(r"(/\S+) \(Stream\)", listen)
        socket = Path(m.group(1)) if m else None
    return settings_from(unit, props, _systemctl("cat", unit), socket_unit, socket)


def _gid(group: str) -> int:
    import grp

    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def unit_ids(settings: UnitSettings) -> UnitIds:
    """The ids systemd gives the unit: User='s uid, Group='s gid (else the user's), and the user's groups
    (as initgroups) plus SupplementaryGroups=. Raises UnitError for a user or group that does not exist."""
    import pwd

    user = settings.user
    try:  # User= may be a name or a number (systemd.exec(5))
        entry = pwd.getpwuid(int(user)) if user and user.isdigit() else pwd.getpwnam(user or "root")
        gid = _gid(settings.group) if settings.group else entry.pw_gid
        extra = [_gid(g) for g in settings.supplementary_groups]
    except KeyError as e:
        raise UnitError(f"{settings.name}: no such user or group {e.args[0]}") from None
    listed = os.getgrouplist(entry.pw_name, gid) if settings.user else [gid]
    return UnitIds(entry.pw_uid, gid, tuple(dict.fromkeys([*listed, *extra])), entry.pw_name, entry.pw_dir)


def as_unit_user(ids: UnitIds) -> None:
    """In a child process: become the unit's user with its primary and supplementary groups."""
    os.setgroups(list(ids.groups))
    os.setgid(ids.gid)
    os.setuid(ids.uid)
