"""Creating the agent's Unix socket safely.

The socket lives in a directory only the agent's user can enter (0700) and is itself 0600, set by the
umask at ``bind`` time so there is no window in which it is wider. A socket file left by a crashed agent
is replaced; one that still answers belongs to a live agent and is a start-up error, never clobbered.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path

from agent.caller import Caller
from agent.errors import ListenError

_MAX_SUN_PATH = 107


_UCRED = struct.Struct("3i")
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+: a pidfd of the process that connected


def peer_of(sock: socket.socket) -> Caller:
    """The kernel's word on who is connected (``SO_PEERCRED``), and the executable it runs when readable.

    The executable is read once, here, at accept, and only trusted if the process that connected was still
    alive when it was read: a pidfd of that very process (``SO_PEERPIDFD``, else ``pidfd_open``) must
    still signal after the read, so a pid that was recycled in between never lends its executable. The
    process's start time is kept so that later requests can check that the pid still names it.
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    pidfd = _pidfd_of(sock, pid)
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
        started = process_start_time(pid)
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, 0)  # raises if that process is gone (its pid may be reused)
    except OSError:
        exe, started = None, None  # another user's process when we are not root, or already gone
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Caller(uid=uid, gid=gid, pid=pid, exe=exe, started=started)


def _pidfd_of(sock: socket.socket, pid: int) -> int | None:
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4), sys.byteorder)
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)  # older kernels: the pid as it is now (the start time check covers reuse)
    except (OSError, AttributeError):
        return None


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, ``/proc/PID/stat`` field 22): with the pid, it names
    one process for good (an ``exec`` keeps both, a new process with a recycled pid does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()
    return int(fields[19])


def same_process(caller: Caller) -> bool:
    """Is ``caller.pid`` still the process that connected, running the executable read at accept?"""
    if caller.started is None or caller.exe is None:
        return False
    try:
        exe = os.readlink(f"/proc/{caller.pid}/exe")
    except OSError:
        return False
    return exe == caller.exe and process_start_time(caller.pid) == caller.started


OPEN_TO_OTHERS = 0o077  # mode bits through which group or others reach what is in a directory


def own_directory_advice(directory: Path) -> str:
    """What to do about a socket directory others can reach (the agent at start-up and doctor say the same)."""
    return (
        "give the socket a directory of its own (a path in a directory that does not exist yet: the agent "
        f"creates it with mode 0700), or `chmod 700 {directory}` if the directory is the agent's alone"
    )


def prepare_directory(directory: Path) -> None:
    """Create the socket's directory with mode 0700, or check that an existing one is already private to
    this user. An existing directory's mode is never changed: it may be shared (``--socket /tmp/agent.sock``
    run as root would otherwise make /tmp 0700 for every user of the machine)."""
    created = False
    try:
        directory.mkdir(mode=0o700, parents=True)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise ListenError(f"cannot create socket directory {directory}: {e.strerror}") from None
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ListenError(f"socket directory {directory} is not a directory (or is a symlink)")
    if st.st_uid != os.geteuid():
        raise ListenError(f"socket directory {directory} belongs to uid {st.st_uid}, not to this user")
    mode = stat.S_IMODE(st.st_mode)
    if created and mode != 0o700:
        os.chmod(directory, 0o700)  # the umask took bits from mkdir's mode; this directory is the agent's own
    elif mode & OPEN_TO_OTHERS:
        raise ListenError(
            f"socket directory {directory} has mode {mode:04o}: other users can reach what is in it, and the "
            f"agent does not change the mode of a directory it did not create; {own_directory_advice(directory)}"
        )


def _agent_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ListenError(f"cannot tell whether {path} is in use: {e.strerror}") from None
    finally:
        probe.close()


def bind_unix_socket(path: Path, *, backlog: int = 512) -> socket.socket:
    """Bind and listen on ``path`` (mode 0600, directory 0700), replacing a stale socket file."""
    path = Path(os.path.abspath(path))
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise ListenError(f"socket path {path} is longer than the {_MAX_SUN_PATH} bytes Unix sockets allow")
    prepare_directory(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{path} exists and is not a socket; not replacing it")
        if _agent_answers(path):
            raise ListenError(
                f"another agent is already listening on {path}: stop it first (`dfns-agent status --socket {path}` "
                "shows it), or give this one another socket with --socket or [server] socket"
            )
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def socket_inode(path: Path) -> int:
    return os.lstat(path).st_ino


def remove_socket(path: Path, inode: int) -> None:
    """Remove the socket file if it is still the one we bound (another agent may have replaced it)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
