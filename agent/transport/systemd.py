"""systemd integration without libsystemd: the notify protocol and socket activation.

Both protocols are small and stable (sshd carries its own copy for the same reason), so the agent speaks
them directly instead of depending on a C library or a Python binding. Everything here is a no-op outside
systemd: ``notify`` returns False when ``$NOTIFY_SOCKET`` is unset and ``listen_socket`` returns None
when no socket was passed, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

from agent.errors import ListenError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # the first passed fd; fds 0-2 stay stdin, stdout and stderr
_NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> bytes | None:
    if value.startswith("@"):  # abstract namespace: systemd writes the leading NUL as "@"
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # vsock:... addresses (VMs) are not supported; the agent runs on the host it serves


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines as one datagram to ``$NOTIFY_SOCKET``; False if unset or undeliverable.

    One datagram per call, because systemd applies a message atomically (``RELOADING=1`` must arrive with
    its ``MONOTONIC_USEC``). Failures are logged, never raised: losing a notification must not stop signing.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value or not lines:
        return False
    address = _notify_address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying systemd", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(lines).encode("utf-8"))
    except OSError as e:
        log.warning("cannot notify systemd on %s: %s", value, e.strerror or e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) is complete: systemd starts dependent units and, for reloads, returns."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """A reload has begun; systemd >= 253 (Type=notify-reload) matches it by its CLOCK_MONOTONIC time."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    """Shutdown has begun (draining): systemd shows "deactivating" instead of wondering why we went quiet."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Tell systemd we are alive; without it for ``WatchdogSec=`` systemd kills and restarts the service."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout, as sd_watchdog_enabled advises), or None.

    ``WATCHDOG_PID`` names the process the watchdog is meant for; a child that inherited the environment
    must not ping on its parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


def unset_environment() -> None:
    """Forget the notify and watchdog settings, in forked workers: only the main process talks to systemd
    (``NotifyAccess=main`` drops, with a warning, what other processes send)."""
    for name in _NOTIFY_ENV:
        os.environ.pop(name, None)


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed (``dfns-agent.socket``), or None if we were not socket-activated.

    ``LISTEN_PID`` must be our pid: the variables may have been inherited from a parent that was activated.
    They are removed once read, so nothing we start later takes the fd for its own.
    """
    pid, fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return None
    try:
        ours = int(pid) == os.getpid()
        count = int(fds)
    except ValueError:
        raise ListenError(f"malformed socket activation variables LISTEN_PID={pid!r} LISTEN_FDS={fds!r}") from None
    if not ours:
        log.debug("LISTEN_PID=%s is not this process; ignoring the socket activation variables", pid)
        return None
    for name in _LISTEN_ENV:
        os.environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; using the first (fd %d), ignoring the rest", count, SD_LISTEN_FDS_START)
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ListenError(f"socket activation: fd {fd} is not open ({e.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"socket activation: fd {fd} is not a socket; check the ListenStream= of dfns-agent.socket")
    sock = socket.socket(fileno=fd)
    try:
        family, kind = sock.family, sock.type
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        sock.detach()
        raise ListenError(f"socket activation: cannot inspect fd {fd}: {e.strerror}") from None
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM or not accepting:
        sock.detach()  # not ours to close: report and leave the fd as it was
        raise ListenError(
            f"socket activation: fd {fd} is a {getattr(family, 'name', family)} {getattr(kind, 'name', kind)} socket"
            f"{'' if accepting else ' that is not listening'}; dfns-agent.socket must use ListenStream= with a"
            " Unix socket path and Accept=no"
        )
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def socket_name(sock: socket.socket) -> str:
    """The socket's address for messages: its path, or "@name" for an abstract socket."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + os.fsdecode(name[1:]) if name.startswith(b"\0") else os.fsdecode(name)
    return str(name)
