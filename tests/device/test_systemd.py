"""systemd integration: the notify protocol, socket activation, and the agent started the way systemd starts it.

No systemd is needed: the tests play its part. They bind the notify socket and read what the agent sends
(with the sender's pid, as systemd checks for NotifyAccess=main), and they create the listening socket and
hand it over as fd 3 with LISTEN_FDS/LISTEN_PID. Anything touching fd 3 runs in a child process, never in
pytest's own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.dev.testing import (
    PIN,
    ROOT,
    Notifications,
    TokenEnv,
    check_assertion,
    cred_id_for,
    key_label,
    make_challenge,
)

# ------------------------------------------------------------------------------------------------------
# Helpers


def listening_socket(path: Path) -> socket.socket:
    """What systemd does for ListenStream=PATH, SocketMode=0600, DirectoryMode=0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


# Runs in a child: puts the socket described by argv[1] on fd 3, sets the activation variables the way
# systemd does (argv[2] = "self" for our pid, or a pid), calls listen_socket() and reports.
LISTEN_CHILD = r"""
import json, logging, os, socket, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
kind, listen_pid, count = sys.argv[1], sys.argv[2], sys.argv[3]
path = sys.argv[4]
if kind != "closed":
    family = socket.AF_INET if kind == "inet" else socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0) if kind == "inet" else path)
    if kind in ("stream", "inet"):
        sock.listen(8)
    if sock.fileno() != 3:
        os.dup2(sock.fileno(), 3)
        sock.close()
    if count == "2":
        os.dup2(3, 4)
else:
    try:
        os.close(3)
    except OSError:
        pass
os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
os.environ["LISTEN_FDS"] = count
os.environ["LISTEN_FDNAMES"] = ":".join(["agent"] * int(count))
from agent.transport import systemd
from agent.errors import ListenError
try:
    got = systemd.listen_socket()
except ListenError as e:
    print(json.dumps({"error": e.message}))
    sys.exit(0)
left = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
if got is None:
    print(json.dumps({"socket": None, "env": left}))
    sys.exit(0)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(path)
print(json.dumps({
    "socket": got.fileno(), "family": int(got.family), "blocking": got.getblocking(),
    "inheritable": got.get_inheritable(), "name": systemd.socket_name(got), "env": left,
}))
"""


def listen_child(short_dir: Path, kind: str, listen_pid: str = "self", count: str = "1") -> tuple[dict[str, Any], str]:
    path = short_dir / f"s-{secrets.token_hex(3)}"
    r = subprocess.run(
        [sys.executable, "-c", LISTEN_CHILD, kind, listen_pid, count, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    result["path"] = str(path)
    return result, r.stderr


# ------------------------------------------------------------------------------------------------------
# The notify protocol


# ------------------------------------------------------------------------------------------------------
# Socket activation (each case in a child process, which owns its fd 3)


def test_listen_socket_takes_fd_3_and_clears_the_variables(short_dir: Path) -> None:
    result, _ = listen_child(short_dir, "stream")
    assert result["socket"] == 3
    assert result["family"] == socket.AF_UNIX
    assert result["blocking"] is False and result["inheritable"] is False
    assert result["name"] == result["path"]
    assert result["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_socket_uses_the_first_of_several_with_a_warning(short_dir: Path) -> None:
    result, stderr = listen_child(short_dir, "stream", count="2")
    assert result["socket"] == 3
    assert "systemd passed 2 sockets; using the first (fd 3)" in stderr


def test_listen_socket_ignores_variables_meant_for_another_process(short_dir: Path) -> None:
    result, _ = listen_child(short_dir, "stream", listen_pid="1")
    assert result["socket"] is None
    assert result["env"]["LISTEN_PID"] == "1", "another process's variables are left alone"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bound", "AF_UNIX SOCK_STREAM socket that is not listening"),
        ("dgram", "AF_UNIX SOCK_DGRAM socket that is not listening"),
        ("inet", "AF_INET SOCK_STREAM socket"),
        ("closed", "fd 3 is not open"),
    ],
)
def test_listen_socket_refuses_what_it_cannot_serve(short_dir: Path, kind: str, message: str) -> None:
    result, _ = listen_child(short_dir, kind)
    assert message in result["error"]


# ------------------------------------------------------------------------------------------------------
# The agent, started the way systemd starts it

# exec()s the agent with the socket on fd 3; the pid stays the same across exec, so LISTEN_PID is right.
LAUNCH = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_FDNAMES'] = 'dfns-agent.socket'\n"
    "if 'WATCHDOG_USEC' in os.environ:\n"
    "    os.environ['WATCHDOG_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'agent'] + sys.argv[2:])\n"
)


class ActivatedAgent:
    """``dfns-agent serve`` under a make-believe systemd: our socket on fd 3, our notify socket."""

    def __init__(self, te: TokenEnv, directory: Path, *, watchdog_usec: int | None = None) -> None:
        self.socket_path = directory / "run" / "agent.sock"
        self.listener = listening_socket(self.socket_path)
        self.inode = os.lstat(self.socket_path).st_ino
        self.notifications = Notifications(str(directory / "notify"))
        env = te.env()
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env["NOTIFY_SOCKET"] = str(directory / "notify")
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log_path = te.dir / f"agent-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        fd = self.listener.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(fd), "--config", str(te.config), "serve"],
            env=env,
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://agent")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float = 30.0) -> list[str]:
        try:
            return self.notifications.wait_for(line, self.proc, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.output()}") from None

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.notifications.close()
        self.listener.close()


@pytest.fixture
def activated(token_env: TokenEnv, short_dir: Path) -> Iterator[Any]:
    started: list[ActivatedAgent] = []

    def start(**kw: Any) -> ActivatedAgent:
        a = ActivatedAgent(token_env, short_dir, **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        a.close()
        out = a.output()
        assert PIN not in out
        assert "cannot notify systemd" not in out and "Traceback" not in out, out


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activated_agent_notifies_and_leaves_systemds_socket_alone(
    token_env: TokenEnv, template_keys: dict[str, str], activated: Any, workers: int
) -> None:
    token_env.write_config(server=f"workers = {workers}\n")
    agent: ActivatedAgent = activated()
    ready = agent.wait_for("READY=1")
    # READY=1 means serving: the very next request on the passed socket is answered.
    assert agent.http.get("/v1/health").status_code == 200
    assert any(line.startswith("STATUS=") and str(agent.socket_path) in line for line in ready), ready
    assert f"listening on {agent.socket_path}" in agent.output()

    challenge = make_challenge(cred_id_for("ed25519"))
    r = agent.http.post("/v1/sign", json={"challenge": challenge})
    assert r.status_code == 200, r.text
    check_assertion(r.json(), challenge, template_keys[key_label("ed25519")], cred_id_for("ed25519"))

    agent.proc.send_signal(signal.SIGHUP)
    reloading = agent.wait_for("RELOADING=1", timeout=15)
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading), reloading
    agent.wait_for("READY=1", timeout=15)
    assert agent.http.get("/v1/health").status_code == 200

    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for("STOPPING=1", timeout=15)
    assert agent.proc.wait(30) == 0, agent.output()

    # Only the main process talked to systemd (NotifyAccess=main drops the rest).
    assert {pid for pid, _ in agent.notifications.seen} == {agent.proc.pid}, agent.notifications.seen
    # systemd's socket is still there, still the same file, and still accepts connections for the next agent.
    st = os.lstat(agent.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_ino == agent.inode
    assert stat.S_IMODE(st.st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(agent.socket_path))


@pytest.mark.parametrize("workers", [1, 2])
def test_watchdog_pings(token_env: TokenEnv, activated: Any, workers: int) -> None:
    token_env.write_config(server=f"workers = {workers}\n")
    agent: ActivatedAgent = activated(watchdog_usec=1_000_000)
    agent.wait_for("READY=1")
    start = time.monotonic()
    for _ in range(2):
        agent.wait_for("WATCHDOG=1", timeout=1.5)
    assert time.monotonic() - start < 2.5
    assert {pid for pid, _ in agent.notifications.seen} == {agent.proc.pid}
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0, agent.output()


def test_agent_refuses_a_passed_socket_it_cannot_serve(token_env: TokenEnv, short_dir: Path) -> None:
    """A datagram socket on fd 3 (a wrong ListenDatagram= in the .socket unit) is a clear start-up error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "dgram"))
    try:
        r = subprocess.run(
            [sys.executable, "-c", LAUNCH, str(sock.fileno()), "--config", str(token_env.config), "serve"],
            env=token_env.env(),
            pass_fds=(sock.fileno(),),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        sock.close()
    assert r.returncode != 0
    assert "fd 3 is a AF_UNIX SOCK_DGRAM socket that is not listening" in r.stdout + r.stderr
