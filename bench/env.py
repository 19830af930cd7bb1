"""The benchmark's world: a fresh SoftHSM token, its keys, the agent and ssh-agent, all in one temp dir.

Every contender signs with the same two keys on the same token directory, so differences in the table
come from the serving path and not from the key material or the store.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.dev import softhsm

ROOT = Path(__file__).resolve().parent.parent
TOKEN_LABEL = "dfns-bench"
KINDS = ("ed25519", "p256")


class SetupError(RuntimeError):
    """The benchmark could not be set up (missing tools, agent did not start, ...): exit non-zero."""


def softhsm_module() -> str:
    module = softhsm.find_softhsm_module()
    if module is not None:
        return module
    raise SetupError("SoftHSM is not installed (apt-get install softhsm2, or ./softhsm_setup.sh test)")


def key_label(kind: str) -> str:
    return f"bench-{kind}"


def cred_id_for(kind: str) -> str:
    return base64.urlsafe_b64encode(f"ci-bench-{kind}".encode()).rstrip(b"=").decode()


def unix_http_get(path: str, target: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over a Unix socket; used for readiness and set-up, never inside a timed cell."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), body


@dataclass
class BenchEnv:
    """A private SoftHSM token with one Ed25519 and one P-256 key, plus an agent config that uses it."""

    dir: Path
    module: str
    pin: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)
    public_pems: dict[str, str] = field(default_factory=dict)

    @property
    def softhsm_conf(self) -> Path:
        return self.dir / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.dir / "pin"

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @classmethod
    def create(cls) -> BenchEnv:
        # Short path: Unix socket paths are limited to 107 bytes.
        env = cls(dir=Path(tempfile.mkdtemp(prefix="dfb-")), module=softhsm_module())
        try:
            env._init_token()
            env._generate_keys()
        except BaseException:
            env.cleanup()
            raise
        return env

    def environ(self) -> dict[str, str]:
        e = dict(os.environ)
        e["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        e.pop("DFNS_AGENT_CONFIG", None)
        return e

    def _init_token(self) -> None:
        self.pin_file.write_text(self.pin + "\n")
        self.pin_file.chmod(0o600)
        try:
            softhsm.create_token(self.dir, label=TOKEN_LABEL, pin=self.pin)
        except softhsm.SoftHsmError as e:
            raise SetupError(str(e)) from None

    def _generate_keys(self) -> None:
        # The agent's own generator, in a child so that this process never loads SoftHSM itself.
        keys = {key_label(kind): kind for kind in KINDS}
        try:
            by_label = softhsm.generate_keys(self.dir, module=self.module, label=TOKEN_LABEL, pin=self.pin, keys=keys)
        except softhsm.SoftHsmError as e:
            raise SetupError(str(e)) from None
        self.public_pems = {kind: by_label[key_label(kind)] for kind in KINDS}

    def write_config(
        self,
        workers: int,
        sign_threads: int | None,
        *,
        module: str | None = None,
        module_env: dict[str, str] | None = None,
        server: dict[str, int] | None = None,
    ) -> None:
        """Like agent/dev/testing.py's TokenEnv, with the agent's process and thread settings under test.

        ``sign_threads`` None leaves the agent's default; ``module``/``module_env`` put a filter module (the
        slow HSM) in front of the same token; ``server`` adds other ``[server]`` settings."""
        settings = {
            "workers": workers,
            **({} if sign_threads is None else {"sign_threads": sign_threads}),
            **(server or {}),
        }
        server_toml = "".join(f"{k} = {v}\n" for k, v in settings.items())
        creds = "".join(
            f'\n[[credential]]\nname = "{kind}"\nkey = "{key_label(kind)}"\ncred_id = "{cred_id_for(kind)}"\n'
            for kind in KINDS
        )
        extra = "".join(f'{k} = "{v}"\n' for k, v in (module_env or {}).items())
        self.config.write_text(
            f'[token]\nmodule = "{module or self.module}"\nlabel = "{TOKEN_LABEL}"\n'
            f'[token.module_env]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n{extra}'
            f'[token.pin]\nfile = "{self.pin_file}"\n'
            f"[server]\n{server_toml}"
            f"{creds}"
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
# Processes


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the agent's workers, whatever way it starts them)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants so far: server-side cost per request, by difference.
    With each process's waited-for children (cutime, cstime), so a worker that exits mid-cell keeps its
    share: a living process's own CPU is not yet in its parent's, and a reaped one is no longer listed."""
    ticks = 0
    for p in descendants(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class FsyncProbe:
    median_ms: float  # wall time of one append+fsync, the median
    cpu_us: float  # CPU time the calling thread spent per append+fsync (the system calls' own work)


def fsync_probe(directory: Path, rounds: int = 50) -> FsyncProbe:
    """Append+fsync where the token (and the agent's audit log, if any) live: how long, and how much CPU."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    times = []
    try:
        cpu0 = time.thread_time()
        for _ in range(rounds):
            t = time.perf_counter()
            os.write(fd, b"x" * 512 + b"\n")
            os.fsync(fd)
            times.append(time.perf_counter() - t)
        cpu = (time.thread_time() - cpu0) / rounds
    finally:
        os.close(fd)
        path.unlink()
    return FsyncProbe(sorted(times)[len(times) // 2] * 1000, cpu * 1e6)


def steal_ticks() -> tuple[int, int]:
    """(stolen, total) jiffies over all cores: time the hypervisor gave this machine's CPUs to others."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the process's peak resident set, in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy while the benchmark itself is idle: other work skews every number."""
    b0, t0 = _cpu_ticks()
    time.sleep(seconds)
    b1, t1 = _cpu_ticks()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class AgentProcess:
    """``python -m agent --config … serve --socket …``, started exactly as a user would."""

    def __init__(self, env: BenchEnv) -> None:
        self.env = env
        self.socket_path = env.dir / "run" / "agent.sock"
        self.log_path = env.dir / "agent.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(env.config), "serve", "--socket", str(self.socket_path)],
            env=self._environ(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip

    def _environ(self) -> dict[str, str]:
        # Agents that keep state (e.g. an audit log under $XDG_STATE_HOME) keep it in the temp dir, on the same
        # filesystem as a default install would, instead of in the machine's /var/lib or ~/.local/state.
        e = self.env.environ()
        e["XDG_STATE_HOME"] = str(self.env.dir / "state")
        return e

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"the agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if unix_http_get(str(self.socket_path), "/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise SetupError(f"the agent did not answer /v1/health within {timeout:.0f}s:\n{self.output()}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def peak_rss(self) -> dict[int, int]:
        """Peak RSS (KiB) of the agent and each of its child processes, by pid."""
        out = {}
        for pid in descendants(self.pid):
            kib = peak_rss_kib(pid)
            if kib is not None:
                out[pid] = kib
        return out

    def stop(self) -> int:
        rc = _stop(self.proc)
        self._log.close()
        return rc


class SshAgent:
    """OpenSSH ``ssh-agent -D`` holding the same token through PKCS#11 (``ssh-add -s`` with an askpass).

    ``module``/``extra_env`` load a filter module (the slow HSM) instead of SoftHSM itself; ssh-agent is then
    told to allow that module's path (``-P``), which is outside its default ``/usr/lib*/*``."""

    def __init__(self, env: BenchEnv, *, module: str | None = None, extra_env: dict[str, str] | None = None,
                 name: str = "ssh-agent") -> None:  # fmt: skip
        self.env = env
        self.module = module or env.module
        self.extra_env = dict(extra_env or {})
        self.socket_path = env.dir / f"{name}.sock"
        self.log_path = env.dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        allow = ["-P", self.module] if module else []
        e = env.environ()
        e.update(self.extra_env)
        self.proc = subprocess.Popen(
            ["ssh-agent", "-D", *allow, "-a", str(self.socket_path)],
            env=e, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def load_token(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"ssh-agent did not start:\n{self.output()}")
            time.sleep(0.02)
        askpass = self.env.dir / "askpass.sh"
        # The PIN stays in a 0700 file in a 0700 directory; it never appears on a command line.
        askpass.write_text(f"#!/bin/sh\ncat {self.env.pin_file}\n")
        askpass.chmod(0o700)
        e = self.env.environ()
        e.update(self.extra_env)
        e.update(
            SSH_AUTH_SOCK=str(self.socket_path),
            SSH_ASKPASS=str(askpass),
            SSH_ASKPASS_REQUIRE="force",
            DISPLAY=e.get("DISPLAY") or ":0",
        )
        r = subprocess.run(
            ["ssh-add", "-s", self.module], env=e, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if r.returncode != 0:
            raise SetupError(f"ssh-add -s {self.module} failed ({r.returncode}): {r.stderr.strip()}")

    def cpu_seconds(self) -> float:
        """ssh-agent plus its ssh-pkcs11-helper, which does the PKCS#11 calls."""
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> int:
        rc = _stop(self.proc)
        self._log.close()
        return rc
