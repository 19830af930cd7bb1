"""A Debian 12 container booted with systemd 252 as PID 1 (systemd-nspawn), for the end-to-end test.

The root file system is built once per machine by ``build_rootfs.sh`` (debootstrap, cached under
/var/cache/dfns-agent-ci) and copied for every run, so each run starts clean. Commands run inside with
``nsenter`` into the container's namespaces, as root or as a user (``runuser``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("DFNS_AGENT_CI_CACHE", "/var/cache/dfns-agent-ci"))
ROOTFS = CACHE / "rootfs-bookworm"


def unavailable() -> str | None:
    """Why the container cannot run here, or None."""
    if os.geteuid() != 0:
        return "the systemd end-to-end test needs root (systemd-nspawn)"
    tools = ("systemd-nspawn", "nsenter") + (() if (ROOTFS / ".complete").exists() else ("debootstrap",))
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./softhsm_setup.sh installs systemd-container and debootstrap)"
    return None


def build_rootfs() -> Path:
    subprocess.run([str(HERE / "build_rootfs.sh"), str(ROOTFS)], check=True, timeout=1800)
    return ROOTFS


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout + self.stderr


class Container:
    def __init__(self, work: Path) -> None:
        self.root = work / "root"
        self.log = work / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 120.0) -> None:
        subprocess.run(["cp", "-a", "--reflink=auto", str(ROOTFS), str(self.root)], check=True)
        with open(self.path("/etc/hosts"), "a") as hosts:  # sudo resolves the host name
            hosts.write(f"127.0.1.1 {self.path('/etc/hostname').read_text().strip()}\n")
        name = f"dfns-ci-{os.getpid()}"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    f"--machine={name}",
                    "-D",
                    str(self.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not start: {self.log.read_text(errors='replace')[-3000:]}")
            self.pid1 = self._find_init()
            time.sleep(0.1)
        while True:  # the manager's bus appears a moment after PID 1 does
            r = self.run("systemctl is-system-running --wait", timeout=timeout)
            if r.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {r.out}")
            time.sleep(0.2)

    def _find_init(self) -> int:
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if comm == "systemd" and pid != self.proc.pid:
                return pid
            todo += [int(c) for c in children]
        return 0

    def run(
        self,
        script: str,
        *,
        user: str | None = None,
        timeout: float = 120.0,
        stdin: str | None = None,
        check: bool = False,
    ) -> Result:
        """``script`` in bash inside the container: as root, or as ``user`` (a login-less runuser)."""
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "--"]
        if user is None:
            cmd += ["/bin/bash", "-euo", "pipefail", "-c", script]
        else:
            cmd += ["/usr/sbin/runuser", "-u", user, "--", "/bin/bash", "-euo", "pipefail", "-c", script]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
        r = Result(p.returncode, p.stdout, p.stderr)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {script}\n-> {r.returncode}\n{r.out[-4000:]}")
        return r

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["nsenter", "-t", str(self.pid1), "-a", "--", *argv], text=True, **kw)  # type: ignore[call-overload]

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from the host (for copying files in and reading them)."""
        return self.root / inside.lstrip("/")

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: a clean poweroff of the container
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
