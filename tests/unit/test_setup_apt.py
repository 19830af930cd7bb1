"""``softhsm_setup.sh``'s apt step, run against stand-ins for ``id``, ``sudo``, ``dpkg-query``, ``apt-get`` and
``apt-cache`` (a copy of the script in a temp dir, stopped by the fake ``apt-get install``): what a user who is
not root, on a fresh machine, would have it install, and how."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from agent.dev.testing import ROOT


def _shim(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run_setup(
    tmp_path: Path, *, missing_from_archive: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script as uid 1000 with sudo, nothing of the module suite installed and no dbus-daemon; returns
    the run and the apt-get calls it made (arguments, then the DEBIAN_FRONTEND apt-get saw)."""
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
    _shim(
        bin_dir,
        "apt-get",
        f'echo "$* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND-unset}}" >>"{log}"\n[ "$1" = update ]\n',
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
    proc = subprocess.run(
        ["/bin/bash", str(work / "softhsm_setup.sh"), "setup"], env=env, capture_output=True, text=True, timeout=60
    )
    return proc, log.read_text().splitlines() if log.exists() else []


def test_apt_get_install_gets_noninteractive_through_sudo(tmp_path: Path) -> None:
    proc, calls = _run_setup(tmp_path)
    assert proc.returncode != 0  # the fake install fails, so the script stops there
    installs = [c for c in calls if c.startswith("install ")]
    assert installs, (calls, proc.stderr)
    # sudo resets the environment: the variable must reach apt-get through the command line
    assert installs[0].endswith("DEBIAN_FRONTEND=noninteractive"), installs


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
