"""The paths the agent creates: its Unix socket (and whatever already answers on it) and its audit log.

Nothing is written: no socket is bound and no audit record is made, the checks only look and connect.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from agent.config import AuditConfig
from agent.diagnostics.results import Check, failed, passed
from agent.transport.listener import OPEN_TO_OTHERS, own_directory_advice

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
    """The audit log can be opened for appending, without writing a record."""
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
        return passed("audit log", f"{path} (writable)")
    parent = existing_ancestor(path.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        return failed(
            "audit log",
            f"{path} cannot be created: {parent} is not writable by this user",
            f"create {path.parent} owned by the agent's user (mode 0700), or set [audit] file elsewhere",
        )
    return passed("audit log", f"{path} (will be created, mode 0600)")
