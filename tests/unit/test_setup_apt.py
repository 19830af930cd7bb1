"""``softhsm_setup.sh``'s apt step, run against stand-ins for ``id``, ``sudo``, ``dpkg-query``, ``apt-get`` and
``apt-cache`` (a copy of the script in a temp dir, stopped by the fake ``apt-get install``): what a user who is
not root, on a fresh machine, would have it install, and how."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.dev.testing import ROOT


def _shim(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@dataclass(frozen=True)
class Setup:
    argv: list[str]
    env: dict[str, str]
    checkout: Path
    log: Path  # one line per apt-get call

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _run_setup(
    tmp_path: Path, *, missing_from_archive: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script as uid 1000 with sudo, nothing of the module suite installed and no dbus-daemon; returns
    the run and the apt-get calls it made (arguments, the DEBIAN_FRONTEND apt-get saw, then its -o options)."""
    setup = _setup(tmp_path, missing_from_archive)
    proc = subprocess.run(setup.argv, env=setup.env, capture_output=True, text=True, timeout=60)
    return proc, setup.calls()


def _setup(tmp_path: Path, missing_from_archive: tuple[str, ...] = ()) -> Setup:
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(ROOT / "softhsm_setup.sh", work / "softhsm_setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    _shim(bin_dir, "id", 'if [ "$1" = -u ]; then echo 1000; else exec /usr/bin/id "$@"; fi\n')
    # sudo's default env_reset: the command runs with a fresh environment (PATH kept for the shims)
    _shim(bin_dir, "sudo", f'exec /usr/bin/env -i PATH="{bin_dir}:/usr/bin:/bin" "$@"\n')
    _shim(bin_dir, "dpkg-query", "exit 1\n")  # nothing installed
    # logs "COMMAND ARGS… DEBIAN_FRONTEND=… OPTIONS" (the -o options moved to the end); only update succeeds
    _shim(
        bin_dir,
        "apt-get",
        'opts=""; while [ "$1" = -o ]; do opts="$opts -o $2"; shift 2; done\n'
        f'echo "$* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND-unset}}$opts" >>"{log}"\n[ "$1" = update ]\n',
    )
    missing = " ".join(missing_from_archive)
    _shim(
        bin_dir,
        "apt-cache",
        f'for p in {missing}; do [ "$2" = "$p" ] && {{ echo "  Candidate: (none)"; exit 0; }}; done\n'
        'echo "$2:"; echo "  Installed: (none)"; echo "  Candidate: 1.0-1"\n',
    )
    # PATH: the shims, then the system's tools without dbus-daemon (a fresh machine has none)
    system = tmp_path / "system"
    system.mkdir()
    for d in ("/usr/bin", "/bin"):
        for tool in os.listdir(d):
            if tool != "dbus-daemon" and not os.path.lexists(system / tool):
                (system / tool).symlink_to(Path(d) / tool)
    env = {"PATH": f"{bin_dir}:{system}", "HOME": str(tmp_path), "DEBIAN_FRONTEND": "noninteractive"}
    return Setup(["/bin/bash", str(work / "softhsm_setup.sh"), "setup"], env, work, log)


def test_apt_get_install_gets_noninteractive_through_sudo(tmp_path: Path) -> None:
    proc, calls = _run_setup(tmp_path)
    assert proc.returncode != 0  # the fake install fails, so the script stops there
    installs = [c for c in calls if c.startswith("install ")]
    assert installs, (calls, proc.stderr)
    # sudo resets the environment: the variable must reach apt-get through the command line
    assert "DEBIAN_FRONTEND=noninteractive" in installs[0].split(), installs


def test_a_module_package_the_release_lacks_is_skipped_not_fatal(tmp_path: Path) -> None:
    # Ubuntu 22.04: dbus-daemon is not a package of its own there (it is in "dbus"), swtpm may be missing.
    proc, calls = _run_setup(tmp_path, missing_from_archive=("dbus-daemon", "swtpm"))
    installs = [c for c in calls if c.startswith("install ")]
    assert installs, (calls, proc.stderr)
    packages = installs[0].split()
    assert "dbus" in packages and "dbus-daemon" not in packages, packages
    assert "swtpm" not in packages and "opencryptoki" in packages and "libtpm2-pkcs11-1" in packages, packages
    assert "swtpm is not in this release's archive" in proc.stderr


def test_on_a_release_with_every_package_all_are_installed(tmp_path: Path) -> None:
    _, calls = _run_setup(tmp_path)
    packages = next(c for c in calls if c.startswith("install ")).split()
    for pkg in ("p11-kit", "p11-kit-modules", "opencryptoki", "libtpm2-pkcs11-1", "libtpm2-pkcs11-tools", "swtpm",
                "swtpm-tools", "tpm2-tools", "tpm2-abrmd", "libtss2-tcti-tabrmd0", "dbus-daemon"):  # fmt: skip
        assert pkg in packages, (pkg, packages)


def test_apt_waits_for_another_apt_holding_the_lock(tmp_path: Path) -> None:
    """On a fresh machine unattended-upgrades holds dpkg's lock: apt-get would fail at once without a timeout."""
    _, calls = _run_setup(tmp_path)
    assert calls and all("-o DPkg::Lock::Timeout=600" in c for c in calls), calls


def test_a_second_setup_waits_for_the_first(tmp_path: Path) -> None:
    """`serve` and `dev-dfns` started together must not run apt and pip at once: the second waits."""
    setup = _setup(tmp_path)
    (setup.checkout / ".dev").mkdir()
    with (setup.checkout / ".dev" / ".setup.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a first setup still running holds
        with subprocess.Popen(setup.argv, env=setup.env, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stderr is not None
            try:
                line = proc.stderr.readline()
                assert "waiting for another ./softhsm_setup.sh" in line, line
                assert setup.calls() == [], "apt ran while another setup held the lock"
                fcntl.flock(held, fcntl.LOCK_UN)
                proc.wait(timeout=60)
            finally:
                proc.kill()
    assert any(c.startswith("install ") for c in setup.calls()), "once the lock was free, setup went on"
