"""The paths the agent creates: its Unix socket (and whatever already answers on it), its audit log, and,
for ``doctor --unit``, whether the unit's sandbox lets it write where it must.

Nothing is written: no socket is bound and no audit record is made, the checks only look and connect.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import AuditConfig, TokenConfig
from agent.diagnostics.results import Check, failed, passed
from agent.diagnostics.unit import DIRECTORY_ROOTS, UnitSandbox
from agent.transport.listener import OPEN_TO_OTHERS, own_directory_advice

# SoftHSM's config file when SOFTHSM2_CONF is not set (Debian's and the upstream default build's).
SOFTHSM_DEFAULT_CONF = Path("/etc/softhsm/softhsm2.conf")

_MAX_SUN_PATH = 107  # bytes of sun_path usable for a path (agent/transport/listener.py refuses longer ones)


def check_socket(path: Path, *, managed_by: str | None = None) -> Check:
    """The socket path `serve` would use: length, a private directory of ours, and what is on it now.
    ``managed_by``: a systemd socket unit holds it; it makes the directory (root's, traversable) and the
    socket file, whose owner and mode then decide who may connect."""
    if managed_by is not None:
        return _check_unit_socket(path, managed_by)
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        return failed(
            "socket",
            f"{path} is {len(os.fsencode(path))} bytes; Unix sockets allow {_MAX_SUN_PATH}",
            "set a shorter [server] socket (or --socket), e.g. under $XDG_RUNTIME_DIR",
        )
    directory = path.parent
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        parent = existing_ancestor(directory)
        if not os.access(parent, os.W_OK | os.X_OK):
            return failed(
                "socket",
                f"{directory} does not exist and cannot be created ({parent} is not writable for this user)",
                "create it (mode 0700, owned by the agent's user) or set [server] socket elsewhere",
            )
        return passed("socket", f"{path}; {directory} will be created with mode 0700 when the agent starts")
    if not stat.S_ISDIR(st.st_mode):
        return failed("socket", f"{directory} is not a directory (or is a symlink)", "use a real directory, mode 0700")
    if st.st_uid != os.geteuid():
        return failed(
            "socket",
            f"{directory} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})",
            "run the agent as the directory's owner or set [server] socket in a directory of your own",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & OPEN_TO_OTHERS:  # what the agent refuses at start-up (it never changes an existing directory's mode)
        return failed(
            "socket",
            f"{directory} has mode {mode:04o}; other users could reach the socket in it, so the agent will not "
            "start there",
            own_directory_advice(directory),
        )
    return _check_socket_file(path, f"{directory} is yours, mode {mode:04o}")


def _check_unit_socket(path: Path, unit: str) -> Check:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return failed(
            "socket",
            f"{path} does not exist: {unit} is not listening",
            f"systemctl enable --now {unit} (after a rejected PIN or a config error the agent stops it: fix "
            f"that first; journalctl -u {unit.removesuffix('.socket')}.service says which)",
        )
    if not stat.S_ISSOCK(st.st_mode):
        return failed("socket", f"{path} is not a socket", f"move {path} away and restart {unit}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or mode & 0o007:
        return failed(
            "socket",
            f"{path} belongs to uid {st.st_uid} with mode {mode:04o}; the agent's user ({os.geteuid()}) should own "
            "it and others should not reach it",
            f"set SocketUser= to the service's user and SocketMode=0600 (or 0660 with SocketGroup=) in {unit}",
        )
    return _check_socket_file(path, f"held by {unit}, mode {mode:04o}")


def existing_ancestor(p: Path) -> Path:
    """The nearest directory that exists: the one whose permissions decide whether ``p`` can be created."""
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_socket_file(path: Path, dir_detail: str) -> Check:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return passed("socket", f"{path}; {dir_detail}; no agent running")
    if not stat.S_ISSOCK(st.st_mode):
        return failed("socket", f"{path} exists and is not a socket", f"move {path} away; the agent never replaces it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return failed(
                "socket",
                f"{path} is a stale socket file (nothing answers on it)",
                "remove it or just start the agent, which replaces it",
            )
        return failed("socket", f"cannot connect to {path}: {e.strerror}", "check its owner and mode (0600)")
    finally:
        probe.close()
    return _running_agent(path, dir_detail)


def _running_agent(path: Path, dir_detail: str) -> Check:
    """Something listens: it must be an agent, and a healthy one; if not, say what the agent itself says."""
    from agent.client import AgentClient, AgentClientError

    try:
        with AgentClient(path, timeout=5.0) as client:
            health = client.health()
    except AgentClientError as e:
        return failed(
            "socket",
            f"something answers on {path} but not as the agent does ({e.code}: {e.message})",
            "find what listens there (ss -xlp) and stop it, or use another [server] socket",
        )
    about = (
        f"an agent is running on it: status {health.status.value}, "
        f"token {health.identity.label!r} serial {health.identity.serial}"
    )
    if health.ok:
        return passed("socket", f"{path}; {dir_detail}; {about}")
    return failed(
        "socket",
        f"{path}: {about} ({health.reason or 'no reason given'})",
        "see the agent's log (journalctl -u dfns-agent); a rejected or locked PIN needs an operator, then a "
        "restart; a token fault recovers by itself once the device is back",
    )


def check_audit(audit: AuditConfig) -> Check:
    """The audit log can be opened for appending, without writing a record; and, when it rotates, files can
    be made beside it (a rotation creates the next file in its directory)."""
    from agent.paths import audit_path_for

    if not audit.enabled:
        return passed("audit log", "disabled ([audit] enabled = false)", "signatures will not be recorded")
    path = audit_path_for(audit)
    if path.exists():
        if not path.is_file():
            return failed("audit log", f"{path} is not a regular file", "set [audit] file to a file path")
        if not os.access(path, os.W_OK):
            return failed(
                "audit log",
                f"{path} is not writable by this user; the agent would refuse to sign",
                f"chown {path} to the agent's user (keep it mode 0600)",
            )
        rotates = bool(audit.rotate_bytes or audit.rotate_age)
        if rotates and not os.access(path.parent, os.W_OK | os.X_OK):
            return failed(
                "audit log",
                f"{path} is writable but its directory {path.parent} is not: the first rotation would fail",
                f"chown {path.parent} to the agent's user (mode 0700)",
            )
        return passed("audit log", f"{path} (writable)")
    parent = existing_ancestor(path.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        return failed(
            "audit log",
            f"{path} cannot be created: {parent} is not writable by this user",
            f"create {path.parent} owned by the agent's user (mode 0700), or set [audit] file elsewhere",
        )
    return passed("audit log", f"{path} (will be created, mode 0600)")


@dataclass(frozen=True)
class WritePath:
    """A directory the agent writes in, and what for (the doctor names both)."""

    path: Path
    what: str


def softhsm_token_dir(token: TokenConfig, unit_env: Sequence[tuple[str, str]]) -> Path | None:
    """SoftHSM's directories.tokendir (it rewrites its token files there, even when only signing), from the
    softhsm2.conf the agent will use: [token.module_env]'s, else the unit's environment's, else the default.
    None for other modules, or when the file does not say."""
    if "softhsm" not in os.path.basename(token.module).lower():
        return None
    conf = token.module_env.get("SOFTHSM2_CONF") or dict(unit_env).get("SOFTHSM2_CONF")
    try:
        text = Path(conf).read_text() if conf else SOFTHSM_DEFAULT_CONF.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir" and os.path.isabs(value.strip()):
            return Path(value.strip())
    return None


def check_audit_in_unit(audit: AuditConfig, sandbox: UnitSandbox) -> Check | None:
    """The audit log's failure when the unit's sandbox keeps its directory read-only: the doctor runs
    outside the unit's mount namespace, so :func:`check_audit` finds it writable when the agent will not."""
    from agent.paths import audit_path_for

    if not audit.enabled:
        return None
    path = audit_path_for(audit)
    return _read_only("audit log", sandbox, [WritePath(path.parent, f"audit log {path}")])


def check_sandbox(sandbox: UnitSandbox, writes: Sequence[WritePath]) -> Check:
    """Every directory the agent writes in besides the audit log's lies in a path the unit may write to."""
    problem = _read_only("sandbox", sandbox, writes)
    if problem is not None:
        return problem
    if sandbox.protect_system == "no":
        return passed("sandbox", f"{sandbox.unit} has ProtectSystem=no: the file system is not made read-only")
    where = ", ".join(f"{w.what} {w.path} ({sandbox.opened_by(w.path)})" for w in writes) or "nothing to write"
    return passed("sandbox", f"{sandbox.unit} has ProtectSystem={sandbox.protect_system}; writable: {where}")


def _read_only(name: str, sandbox: UnitSandbox, writes: Sequence[WritePath]) -> Check | None:
    blocked = [w for w in writes if sandbox.opened_by(w.path) is None]
    if not blocked:
        return None
    listed = ", ".join(f"{w.path} ({w.what})" for w in blocked)
    return failed(
        name,
        f"{sandbox.unit} has ProtectSystem={sandbox.protect_system}, which leaves {listed} read-only for it: "
        "the agent's writes there fail with 'Read-only file system'",
        "; ".join(_opening_fix(sandbox.unit, w.path) for w in blocked)
        + f" (a drop-in: sudo systemctl edit {sandbox.unit}; then restart it)",
    )


def _opening_fix(unit: str, path: Path) -> str:
    """The setting that opens ``path``: a directory systemd makes for the unit where there is one."""
    for prop, root in DIRECTORY_ROOTS.items():
        if path.is_relative_to(root) and path != root:
            return (
                f"add {prop}={path.relative_to(root)} to [Service] (systemd creates {path} for the unit's "
                f"user), or ReadWritePaths={path} once {path} exists"
            )
    create = "" if os.path.exists(path) else f"create {path} (owned by the unit's user, mode 0700), then "
    return f"{create}add ReadWritePaths={path} to [Service]"
