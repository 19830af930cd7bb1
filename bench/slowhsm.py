"""Builds ``bench/slowhsm.c``, a PKCS#11 filter in front of SoftHSM that holds each signature for a fixed
time: the benchmark's stand-in for a network HSM, whose latency, not the host's CPU, bounds throughput.
Tests also use its session cap (``CKR_SESSION_COUNT`` past N sessions, as ykcs11 and YubiHSM 2 answer).

The module is built once per source version into the user's cache (gcc and p11-kit's ``pkcs11.h``, from
Debian's ``libp11-kit-dev``, which ``./softhsm_setup.sh`` installs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("slowhsm.c")
INCLUDE = Path("/usr/include/p11-kit-1")


class BuildError(RuntimeError):
    """The filter module could not be built: the message says what is missing."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfns-agent-bench"


def build() -> Path:
    """The path of the built module (built now if this source version has not been built yet)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out = cache_dir() / f"libslowhsm-{digest}.so"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler (cc/gcc) to build the slow-HSM module: apt-get install gcc")
    if not (INCLUDE / "p11-kit" / "pkcs11.h").exists():
        raise BuildError(f"{INCLUDE}/p11-kit/pkcs11.h not found: apt-get install libp11-kit-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", f"-I{INCLUDE}", "-o", str(tmp), str(SOURCE), "-ldl",
           "-lpthread"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"building the slow-HSM module failed:\n{r.stderr.strip()}")
    tmp.replace(out)
    return out


def environ(inner_module: str, sign_ms: float, *, max_sessions: int = 0, cant_lock: bool = False) -> dict[str, str]:
    """What the process that loads the filter needs in its environment (``max_sessions``: the sessions it
    lets the process open before ``CKR_SESSION_COUNT``, 0 for no cap; ``cant_lock``: refuse
    ``CKF_OS_LOCKING_OK`` with ``CKR_CANT_LOCK``)."""
    return {
        "SLOWHSM_MODULE": inner_module,
        "SLOWHSM_SIGN_US": str(round(sign_ms * 1000)),
        "SLOWHSM_MAX_SESSIONS": str(max_sessions),
        "SLOWHSM_CANT_LOCK": "1" if cant_lock else "0",
    }
